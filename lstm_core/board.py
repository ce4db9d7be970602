"""TensorBoard event files in a run folder, written while `fit` trains, so a run (or a tuning trial) shows in
TensorBoard beside any other experiment with its hyperparameters:

    tensorboard --logdir saves          # every run (saves/runs/<id>) and trial (saves/studies/<s>/trial_<n>)

RunRecorder hands each event of fit to a BoardWriter (board.writer_for(run folder)); where TensorBoard is
not installed (a bare GPU host) there is none, and the run folder is the same without its event files.
Steps are global optimizer steps: batch windows at their step, epochs at the step that ends them, so the
running and the per-epoch curves share one axis.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from .runs import write_error
from .train import Callback, FitState, History

FLUSH_SECONDS = 5           # the writer's thread writes at least this often: a live run shows within seconds


def first_to_last(norms: list | None) -> float | None:
    """The gradient reaching the first time step over the last's (train.step_gradient_norms): one scalar in
    which vanishing gradients show, near 0 (0 when none reaches the first step at all). None without it."""
    if not norms or not norms[-1] or norms[0] is None:
        return None
    return norms[0] / norms[-1]


def writer_for(folder: Path) -> "BoardWriter | None":
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    quiet_writer_threads()
    try:
        return BoardWriter(SummaryWriter(str(folder), flush_secs=FLUSH_SECONDS), Path(folder))
    except OSError as exc:
        raise write_error(exc, Path(folder) / "events.out.tfevents") from None


def quiet_writer_threads() -> None:
    """Keep tensorboard's writer thread from printing a traceback when a write fails (a full disk): it raises
    the error in the thread, where Python prints it, and again in the training loop's next call to the
    writer, where the recorder fails the run with one line that says it."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args):
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


class BoardWriter(Callback):
    """Scalars per progress record and per epoch, the config and final metrics as hparams at the end."""

    def __init__(self, writer, folder: Path):
        self.writer = writer
        self.folder = folder

    @contextlib.contextmanager
    def writing(self):
        """A failed write names no file (the writer thread's OSError): name this run's events file."""
        try:
            yield
        except OSError as exc:
            events = max(self.folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime,
                         default=self.folder / "events.out.tfevents")
            raise write_error(exc, events) from None

    def scalars(self, step: int, values: dict) -> None:
        with self.writing():
            for tag, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(tag, value, step)

    def on_batch(self, state: FitState, record: dict) -> None:
        self.scalars(record["step"], {
            "train/running_loss": record["loss"], "train/running_accuracy": record["accuracy"],
            "train/lr": record["lr"], "train/samples_per_s": record["samples_per_s"],
            "gradients/norm": record.get("grad_norm"), "gradients/norm_max": record.get("grad_norm_max"),
            "gradients/clipped_fraction": record.get("clip_fraction"),
            "gradients/nonfinite_steps": record.get("nonfinite_steps"),
            **{f"gradients/layer/{name}": norm for name, norm in (record.get("layer_grad_norms") or {}).items()},
            "gradients/first_to_last_step": first_to_last(record.get("step_grad_norms"))})

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        self.scalars(record["epoch"] * state.steps_per_epoch, {
            "loss/train": record["train_loss"], "loss/validation": record["val_loss"],
            "accuracy/train": record["train_accuracy"], "accuracy/validation": record["val_accuracy"],
            "epoch": record["epoch"]})
        with self.writing():
            self.writer.flush()

    def on_run_end(self, state: FitState, history: History) -> None:
        test = history.test or {}
        metrics = {"hparam/test_accuracy": test.get("accuracy"), "hparam/test_loss": test.get("loss"),
                   "hparam/macro_f1": test.get("macro_f1"), "hparam/best_val_accuracy": history.best_val_accuracy,
                   "hparam/epochs": len(history.epochs)}
        # run_name ".": the hparams go into this run's own folder, not a timestamped one beside it
        with self.writing():
            self.writer.add_hparams(state.config.to_dict(), {k: v for k, v in metrics.items() if v is not None},
                                    run_name=".")
            self.writer.close()

    def on_exception(self, state: FitState, exc: BaseException) -> None:
        with contextlib.suppress(OSError):     # the run has failed already; the events file is what it is
            self.writer.close()
