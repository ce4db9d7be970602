"""Run directories: create, list, read status, write atomically, save and load checkpoints.

    run = create_run(config)                 # saves/runs/20261123-153412-a1b2c3/ with config.json
    history = fit(config, [RunRecorder(run)])
    model, config = load_model(run.path)     # rebuilt from the stored config, weights_only=True

A run directory holds config.json, metrics.jsonl (one JSON event per line), status.json, best.pt,
last.pt, final_state_dict.pth, eval.json and curves.svg.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, TrainConfig, from_dict
from .models import build_model
from .plotfile import curves_svg
from .train import Callback, FitState, History

CHECKPOINT_FORMAT = 1
STATES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
LIVE_STATES = ("queued", "running")
PROGRESS_SECONDS = 1.0      # the most often a run writes its progress (metrics lines and status heartbeat)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunError(ValueError):
    """A run id, path or checkpoint that cannot be used; the message says why."""


# -- paths -------------------------------------------------------------------------------------
def saves_root(root: str | Path | None = None) -> Path:
    """The saves root: `root` if given, else $LSTM_SAVES, else saves/ beside the lstm_core package."""
    chosen = root or os.environ.get("LSTM_SAVES") or Path(__file__).resolve().parent.parent / "saves"
    return Path(chosen).expanduser().resolve()


def check_saves(root: str | Path | None = None, write: bool = True) -> Path:
    """The saves root, refused with one RunError naming the path and the problem when it is a file, or
    (`write`) when this process cannot create files in it. Commands call it before anything starts."""
    path = saves_root(root)
    if path.exists() and not path.is_dir():
        raise RunError(f"the saves folder {path} is a file, not a folder: point --saves (or $LSTM_SAVES) at a folder")
    if not write:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RunError(f"cannot write to the saves folder {path}: {reason}"
                       f"{' (' + str(exc.filename) + ')' if exc.filename and str(exc.filename) != str(path) else ''}"
                       ": choose another with --saves (or $LSTM_SAVES)") from None
    return path


def safe_name(name: str, what: str = "run id") -> str:
    """A user-given run id or study name, refused when it could reach outside its folder."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise RunError(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' only "
                       "(no '/', no '..', at most 128 characters)")
    return name


def runs_dir(root: str | Path | None = None) -> Path:
    return saves_root(root) / "runs"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


# -- atomic files ------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: readers see the
    old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=float) + "\n").encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()   # checkpoints are megabytes: serialise in memory, then one atomic write
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def append_jsonl(path: Path, *records: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(record, default=float) + "\n" for record in records))
        f.flush()


def repair_jsonl(path: Path) -> None:
    """Cut a torn last line (a writer killed mid-line) off a JSON-lines file, so that the next append starts
    a line of its own instead of gluing onto it."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(max(0, size - 2**20))
            tail = f.read()
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
    except FileNotFoundError:
        pass


def read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON line; a torn or corrupt line (a killed writer) is skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file's value, or `default` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def read_json_object(path: Path) -> dict:
    value = read_json(path, {})
    return value if isinstance(value, dict) else {}


# -- processes ---------------------------------------------------------------------------------
def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a live run from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def process_alive(pid: int | None, start_time: str | None = None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user: the start time below still tells a reused pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "Z":  # exited, waiting for its parent to reap it
            return False
    except OSError:
        return True  # no /proc (macOS): os.kill said it exists
    return start_time is None or process_start_time(pid) == start_time


# -- the run directory -------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.json")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    eval_path = property(lambda self: self.path / "eval.json")
    best_path = property(lambda self: self.path / "best.pt")
    last_path = property(lambda self: self.path / "last.pt")
    final_path = property(lambda self: self.path / "final_state_dict.pth")
    plot_path = property(lambda self: self.path / "curves.svg")

    def config(self) -> TrainConfig:
        data = read_json(self.config_path)
        if data is None:
            raise RunError(f"{self.path} has no readable config.json")
        return from_dict(data)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def epochs(self) -> list[dict]:
        return [r for r in self.metrics() if r.get("event") == "epoch"]

    def eval(self) -> dict | None:
        return read_json(self.eval_path)

    def status(self) -> dict:
        """status.json, with a live state whose process is gone turned into `interrupted` (and saved)."""
        status = read_json_object(self.status_path)
        if status.get("state") in LIVE_STATES and status.get("host", socket.gethostname()) == socket.gethostname():
            if status.get("pid") and not process_alive(status["pid"], status.get("pid_start")):
                status = {**status, "state": "interrupted", "ended_at": status.get("heartbeat_at"),
                          "error": "the training process ended without finishing (killed or crashed)"}
                try:
                    atomic_write_json(self.status_path, status)
                except OSError:
                    pass  # a read-only saves root: still report it as interrupted
        return status

    def write_status(self, **changes: Any) -> dict:
        status = {**read_json_object(self.status_path), **changes}
        atomic_write_json(self.status_path, status)
        return status


def create_run(config: TrainConfig, root: str | Path | None = None, path: str | Path | None = None,
               state: str = "queued") -> Run:
    """A new run directory with config.json and status.json (state `queued`, this process's pid)."""
    if path is None:
        base = runs_dir(root)
        base.mkdir(parents=True, exist_ok=True)
        path = base / new_run_id()
    run = Run(Path(path))
    run.path.mkdir(parents=True, exist_ok=False)
    atomic_write_json(run.config_path, config.to_dict())
    pid = os.getpid()
    run.write_status(state=state, pid=pid, pid_start=process_start_time(pid), host=socket.gethostname(),
                     created_at=time.time(), started_at=None, ended_at=None, heartbeat_at=time.time(),
                     device=None, error=None)
    return run


def open_run(run_id: str, root: str | Path | None = None) -> Run:
    """A run by id, inside the saves root's runs/ (an id with '/' or '..' is refused)."""
    run = Run(runs_dir(root) / safe_name(str(run_id)))
    if not run.config_path.exists():
        raise RunError(f"no run {str(run_id)!r} in {runs_dir(root)}")
    return run


def run_at(path: str | Path) -> Run:
    """A run directory named by the operator (the CLI), wherever it is."""
    run = Run(Path(path).resolve())
    if not run.config_path.exists():
        raise RunError(f"{run.path} is not a run directory (no config.json)")
    return run


def list_runs(root: str | Path | None = None) -> list[dict]:
    """One summary per run directory, newest first: id, state, arch and key hyperparameters,
    best validation accuracy, test accuracy, duration and device."""
    base = runs_dir(root)
    if not base.is_dir():
        return []
    out = []
    for path in base.iterdir():
        if path.is_dir() and (path / "config.json").exists():
            out.append(summarize(Run(path)))
    when = lambda r: r["created_at"] if isinstance(r["created_at"], (int, float)) else 0.0  # noqa: E731
    return sorted(out, key=lambda r: (when(r), r["id"]), reverse=True)


def list_trials(root: str | Path | None = None) -> list[dict]:
    """The run directories of every tuning trial (SAVES/studies/<study>/trial_<n>/), as run summaries
    whose id is "<study>/trial_<n>"."""
    base = saves_root(root) / "studies"
    rows = []
    for path in sorted(base.glob("*/trial_*")) if base.is_dir() else []:
        if (path / "config.json").exists():
            rows.append({**summarize(Run(path)), "id": f"{path.parent.name}/{path.name}", "kind": "trial"})
    return rows


def list_models(root: str | Path | None = None) -> list[dict]:
    """Every run and tuning trial with a usable best.pt (finished, or stopped by the user), best
    validation accuracy first: what the Draw page can predict with."""
    rows = [{**r, "kind": "run"} for r in list_runs(root)] + list_trials(root)
    # a cancelled run counts once it has finished an epoch (before that its weights are barely trained)
    usable = [r for r in rows if (r["state"] == "completed" or (r["state"] == "cancelled" and r["epochs_done"]))
              and (Path(r["path"]) / "best.pt").exists()]
    return sorted(usable, key=lambda r: -(r["best_val_accuracy"] or 0.0))


def format_seconds(s: float) -> str:
    """A duration as m:ss, or h:mm:ss from an hour on."""
    s = max(int(s), 0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def describe_model(row: dict) -> str:
    """A run's model in a few words: "LSTM 1x128, rows", "BiLSTM 2x128, rows", "CNN"."""
    if row.get("arch") == "cnn":
        return "CNN"
    kind = "BiLSTM" if row.get("bidirectional") else "LSTM"
    return f"{kind} {row.get('num_layers')}x{row.get('hidden_size')}, {row.get('seq_mode')}"


def summarize(run: Run) -> dict:
    status = run.status()
    cfg = read_json_object(run.config_path)
    epochs = run.epochs()
    evaluation = read_json_object(run.eval_path)
    started, ended = status.get("started_at"), status.get("ended_at") or status.get("heartbeat_at")
    return {
        "id": run.id, "path": str(run.path), "state": status.get("state", "unknown"),
        "arch": cfg.get("arch"), "seq_mode": cfg.get("seq_mode"), "hidden_size": cfg.get("hidden_size"),
        "num_layers": cfg.get("num_layers"), "bidirectional": cfg.get("bidirectional"),
        "optimizer": cfg.get("optimizer"), "lr": cfg.get("lr"), "batch_size": cfg.get("batch_size"),
        "epochs_done": len(epochs), "epochs": cfg.get("epochs"),
        "best_val_accuracy": max((e["val_accuracy"] for e in epochs if isinstance(e.get("val_accuracy"), (int, float))),
                                 default=None),
        "test_accuracy": evaluation.get("test_accuracy"), "macro_f1": evaluation.get("macro_f1"),
        "duration_s": (ended - started) if started and ended else None,
        "device": status.get("device"), "created_at": status.get("created_at"),
    }


# -- checkpoints -------------------------------------------------------------------------------
def on_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it (in dicts, lists and tuples) copied to the CPU: a file saved from a GPU
    run must load with a plain torch.load on a machine that has none."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def rng_state(device: torch.device) -> dict:
    """Every random stream a run draws from: torch's CPU generator and, on a GPU, that GPU's (dropout)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def checkpoint_dict(state: FitState, partial: bool = False) -> dict:
    """Tensors (on the CPU) and plain values only, so that torch.load(weights_only=True) reads it back anywhere."""
    return on_cpu({
        "format": CHECKPOINT_FORMAT,
        "config": state.config.to_dict(),
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "epoch": state.epoch,                  # epochs finished
        "partial": partial,                    # True: saved mid-epoch by a stop
        "history": [dict(r) for r in state.history.epochs],
        "best_epoch": state.history.best_epoch,
        "best_val_loss": state.history.best_val_loss,
        "best_val_accuracy": state.history.best_val_accuracy,
        "bad_epochs": state.bad_epochs,
        "rng": {**rng_state(state.device), "generator": state.generator.get_state()},
        "scaler": state.scaler.state_dict() if state.scaler is not None and state.scaler.is_enabled() else None,
    })


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by this project; anything else (corrupt, truncated, a pickle with code in
    it, another format) is refused with a RunError and nothing in it is executed."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"no checkpoint at {path}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for bad files
        raise RunError(f"{path} is not a readable checkpoint ({load_failure(exc)})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise RunError(f"{path} is not an LSTM Studio checkpoint (no config and model inside)")
    if not isinstance(ckpt.get("format", 0), int) or not isinstance(ckpt["model"], dict):
        raise RunError(f"{path} is not an LSTM Studio checkpoint (bad format field or weights)")
    if ckpt.get("format", 0) > CHECKPOINT_FORMAT:
        raise RunError(f"{path} was written by a newer LSTM Studio (format {ckpt['format']})")
    return ckpt


def load_failure(exc: Exception) -> str:
    """Why torch.load refused a file, in one line. Never torch's own first line for weights_only: it
    advises re-running with weights_only=False, which would execute a hostile file's code."""
    text = str(exc)
    if text.startswith("Weights only load failed"):
        blocked = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), None)
        if blocked:
            return ("refused, nothing in it was run: it holds Python objects besides tensors and plain values: "
                    f"{blocked[:200]}")
        return "corrupt, or not a file written by torch.save"
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else 'unreadable'}"


def resume_checkpoint(run: Run) -> dict:
    """last.pt with the best weights so far (from best.pt), ready for fit(resume=...)."""
    ckpt = load_checkpoint(run.last_path)
    if ckpt.get("partial") or not ckpt.get("optimizer"):
        raise RunError(f"run {run.id} stopped before finishing its first epoch: there is nothing to resume; "
                       "start it again")
    ckpt["best_model"] = load_checkpoint(run.best_path)["model"] if run.best_path.exists() else None
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """A model ready for inference from a run directory (its best.pt) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    ckpt = load_checkpoint(path)
    try:
        config = from_dict(ckpt["config"])
    except ConfigError as exc:
        raise RunError(f"{path} holds an invalid config: {exc}") from None
    model = build_model(config)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError) as exc:
        raise RunError(f"{path}: the weights do not fit the {config.arch} model its config describes "
                       f"({str(exc).splitlines()[0][:200]})") from None
    return model.to(device).eval(), config


# -- the callback that writes a run directory --------------------------------------------------
class RunRecorder(Callback):
    """Writes every event of `fit` into a run directory: status, metrics.jsonl, checkpoints, eval,
    plot. The state reaches `running`, then `completed`, `cancelled` or `failed`."""

    def __init__(self, run: Run, progress_seconds: float = PROGRESS_SECONDS):
        self.run = run
        self.progress_seconds = progress_seconds
        self.pending: list[dict] = []        # progress records not written yet
        self.written_at = -math.inf

    def heartbeat(self, **changes: Any) -> None:
        self.run.write_status(heartbeat_at=time.time(), **changes)

    def flush(self) -> None:
        """Write the progress records held back, in one append."""
        if self.pending:
            append_jsonl(self.run.metrics_path, *self.pending)
            self.pending.clear()

    def on_run_start(self, state: FitState) -> None:
        repair_jsonl(self.run.metrics_path)       # a resumed run's log may end in a line torn by the kill
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
        self.flush()
        append_jsonl(self.run.metrics_path, record)
        self.heartbeat()

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
            "best_epoch": history.best_epoch, "best_val_loss": finite(history.best_val_loss),
            "best_val_accuracy": history.best_val_accuracy, "stopped": history.stopped,
            "train_seconds": history.train_seconds, "n_test": test.get("n")})
        atomic_write_bytes(self.run.plot_path, curves_svg(history.epochs, title=f"run {self.run.id}").encode())
        append_jsonl(self.run.metrics_path, {"event": "end", "time": time.time(), **history.summary()})
        self.heartbeat(state="cancelled" if history.stopped == "cancelled" else "completed", ended_at=time.time())

    def on_exception(self, state: FitState, exc: BaseException) -> None:
        self.flush()
        cancelled = isinstance(exc, KeyboardInterrupt)
        self.heartbeat(state="cancelled" if cancelled else "failed", ended_at=time.time(),
                       error=None if cancelled else f"{type(exc).__name__}: {exc}")


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
