"""The callback that writes a run directory while `fit` trains: status, metrics.jsonl, checkpoints,
eval.json, curves.svg and TensorBoard's event files (board.py).

    run = create_run(config)
    history = fit(config, [RunRecorder(run)])
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from typing import Any

from . import board
from .checkpoints import atomic_torch_save, checkpoint_dict, on_cpu
from .devices import environment
from .plotfile import curves_svg
from .runs import (Run, append_jsonl, atomic_write_bytes, atomic_write_json, os_error_text, process_start_time,
                   repair_jsonl)
from .train import Callback, FitState, History

PROGRESS_SECONDS = 1.0      # the most often a run writes its progress (metrics lines and status heartbeat)


class RunRecorder(Callback):
    """Writes every event of `fit` into a run directory: status, metrics.jsonl, checkpoints, eval,
    plot. The state reaches `running`, then `completed`, `cancelled` or `failed`; a file that cannot be
    written (a full disk) fails the run, its status saying which file, why, and what last.pt still holds."""

    def __init__(self, run: Run, progress_seconds: float = PROGRESS_SECONDS):
        self.run = run
        self.board = board.writer_for(run.path)      # None where TensorBoard is not installed
        self.progress_seconds = progress_seconds
        self.pending: list[dict] = []        # progress records not written yet
        self.written_at = -math.inf
        self.checkpointed = 0                # the epoch last.pt ends at: where a resume would go on from

    def heartbeat(self, **changes: Any) -> None:
        self.run.write_status(heartbeat_at=time.time(), **changes)

    def flush(self) -> None:
        """Write the progress records held back, in one append."""
        if self.pending:
            append_jsonl(self.run.metrics_path, *self.pending)
            self.pending.clear()

    def on_run_start(self, state: FitState) -> None:
        self.checkpointed = state.epoch
        repair_jsonl(self.run.metrics_path)       # a resumed run's log may end in a line torn by the kill
        atomic_write_json(self.run.environment_path, environment(state.device))   # a resume records its own
        pid = os.getpid()
        self.heartbeat(state="running", pid=pid, pid_start=process_start_time(pid), host=socket.gethostname(),
                       started_at=time.time(), device=str(state.device))
        append_jsonl(self.run.metrics_path, {"event": "start", "time": time.time(), "device": str(state.device),
                                             "n_train": state.n_train, "steps_per_epoch": state.steps_per_epoch,
                                             "resumed_after_epoch": state.epoch})
        logged = {r.get("epoch") for r in self.run.epochs()}
        for record in state.history.epochs:   # resumed: epochs the checkpoint has but the log lost to a kill
            if record["epoch"] not in logged:
                append_jsonl(self.run.metrics_path, record)

    def on_batch(self, state: FitState, record: dict) -> None:
        if self.board:
            self.board.on_batch(state, record)
        # by time, not by batch: a GPU finishes `log_every` batches many times a second, and each status
        # write is an fsync
        self.pending.append(record)
        now = time.monotonic()
        if now - self.written_at >= self.progress_seconds:
            self.flush()
            self.heartbeat()
            self.written_at = now

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        # checkpoints first: a kill between the two writes loses a log line (restored on resume), never
        # leaves a logged epoch that resume would train again
        ckpt = checkpoint_dict(state)
        if state.improved:
            atomic_torch_save({**ckpt, "optimizer": None, "scheduler": None}, self.run.best_path)
        atomic_torch_save(ckpt, self.run.last_path)
        self.checkpointed = state.epoch
        self.flush()
        append_jsonl(self.run.metrics_path, record)
        self.heartbeat()
        if self.board:
            self.board.on_epoch_end(state, record)

    def on_train_end(self, state: FitState) -> None:
        self.flush()
        # stopped mid-epoch: last.pt stays at the last epoch's end (what --resume continues from); a run
        # stopped in its first epoch keeps its weights as a partial checkpoint
        if state.batch and state.batch < state.steps_per_epoch and not self.run.last_path.exists():
            atomic_torch_save(checkpoint_dict(state, partial=True), self.run.last_path)
        if not self.run.best_path.exists():                     # no epoch finished: the current weights
            atomic_torch_save({**checkpoint_dict(state, partial=True), "optimizer": None, "scheduler": None},
                              self.run.best_path)

    def on_run_end(self, state: FitState, history: History) -> None:
        atomic_torch_save(on_cpu(state.model.state_dict()), self.run.final_path)
        test = history.test or {}
        atomic_write_json(self.run.eval_path, {
            "test_accuracy": test.get("accuracy"), "test_loss": test.get("loss"), "test_error": test.get("error"),
            "macro_precision": test.get("macro_precision"), "macro_recall": test.get("macro_recall"),
            "macro_f1": test.get("macro_f1"), "per_class": test.get("per_class"),
            "confusion_matrix": test.get("confusion_matrix"), "misclassified": test.get("misclassified"),
            "best_epoch": history.best_epoch, "best_val_loss": history.best_val_loss,
            "best_val_accuracy": history.best_val_accuracy, "stopped": history.stopped,
            "train_seconds": history.train_seconds, "n_test": test.get("n")})
        atomic_write_bytes(self.run.plot_path, curves_svg(history.epochs, title=f"run {self.run.id}").encode())
        append_jsonl(self.run.metrics_path, {"event": "end", "time": time.time(), **history.summary()})
        if self.board:
            self.board.on_run_end(state, history)
        self.heartbeat(state="cancelled" if history.stopped == "cancelled" else "completed", ended_at=time.time())

    def on_exception(self, state: FitState, exc: BaseException) -> None:
        with contextlib.suppress(OSError):      # the disk that failed the run may refuse these lines too
            self.flush()
        if self.board:
            self.board.on_exception(state, exc)
        cancelled = isinstance(exc, KeyboardInterrupt)
        self.heartbeat(state="cancelled" if cancelled else "failed", ended_at=time.time(),
                       error=None if cancelled else self.failure(exc))

    def failure(self, exc: BaseException) -> str:
        """What ended the run, in one line: for a file that could not be written, which file, why, and the
        checkpoint that survives ("no space left on device writing .../last.pt; the run is stopped with its
        last complete checkpoint at epoch 3")."""
        if not isinstance(exc, OSError):
            return f"{type(exc).__name__}: {exc}"
        kept = (f"its last complete checkpoint at epoch {self.checkpointed}" if self.checkpointed
                else "no complete checkpoint (it had not finished an epoch)")
        return f"{os_error_text(exc)}; the run is stopped with {kept}"
