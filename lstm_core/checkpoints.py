"""Checkpoints: what a run saves of its training state, and loading it back without running anything.

    ckpt = checkpoint_dict(state)            # tensors (on the CPU) and plain values only
    model, config = load_model(run.path)     # best.pt, rebuilt from its stored config, weights_only=True
    fit(config, callbacks, resume=resume_checkpoint(run))

recorder.RunRecorder decides when each file is written; this module decides what is in it.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ConfigError, TrainConfig, from_dict
from .models import build_model
from .runs import Run, RunError, atomic_write_bytes

if TYPE_CHECKING:     # the annotation only: loading a model must not import the training loop
    from .train import FitState

CHECKPOINT_FORMAT = 1


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()   # checkpoints are megabytes: serialise in memory, then one atomic write
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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
