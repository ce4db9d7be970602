"""The training loop. It prints and saves nothing: callbacks see every event, and `fit` returns a History.

    history = fit(preset("default"), callbacks=[RunRecorder(run)], stop=threading.Event())
    history.test["accuracy"]

Events, in order: on_run_start(state); on_batch(state, record) every `log_every` batches;
on_epoch_end(state, record); on_train_end(state) when the loop ends for any reason, before the best
weights are restored; on_run_end(state, history) after the final test evaluation; on_exception(state, exc).
A stop (the `stop` event or callable, or a callback setting state.should_stop) is honoured between batches.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from . import cpu
from .config import TrainConfig
from .data import MNIST, Splits, batch_input, load_mnist, make_splits, to_device
from .devices import AmpPolicy, policy_for, resolve_device
from .evaluate import autocast, evaluate
from .models import build_model

PER_BATCH_SCHEDULERS = ("onecycle", "cosine")


class Callback:
    """Hooks with no-op defaults; override the ones you need."""

    def on_run_start(self, state: "FitState") -> None: ...
    def on_batch(self, state: "FitState", record: dict) -> None: ...
    def on_epoch_end(self, state: "FitState", record: dict) -> None: ...
    def on_train_end(self, state: "FitState") -> None: ...
    def on_run_end(self, state: "FitState", history: "History") -> None: ...
    def on_exception(self, state: "FitState", exc: BaseException) -> None: ...


@dataclass
class History:
    config: TrainConfig
    device: str
    epochs: list[dict] = field(default_factory=list)   # one record per finished epoch
    best_epoch: int = 0                                # 1-based; 0 = no epoch finished
    best_val_loss: float = math.inf
    best_val_accuracy: float = 0.0
    stopped: str = "completed"                         # completed | early_stopped | cancelled | pruned
    train_seconds: float = 0.0
    test: dict | None = None                           # evaluate() on the test set, best weights

    def summary(self) -> dict[str, Any]:
        return {"stopped": self.stopped, "epochs": len(self.epochs), "best_epoch": self.best_epoch,
                "best_val_loss": self.best_val_loss, "best_val_accuracy": self.best_val_accuracy,
                "train_seconds": self.train_seconds, "device": self.device,
                "test_accuracy": self.test["accuracy"] if self.test else None,
                "macro_f1": self.test["macro_f1"] if self.test else None}


@dataclass
class FitState:
    """What callbacks may read (and `should_stop` they may set)."""
    config: TrainConfig
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    history: History
    steps_per_epoch: int
    n_train: int
    epoch: int = 0                       # epochs finished
    batch: int = 0                       # batches finished in the current epoch
    improved: bool = False               # the last finished epoch set a new best validation loss
    best_state: dict | None = None       # a detached copy of the best weights
    bad_epochs: int = 0                  # epochs since the last improvement
    should_stop: bool = False
    stop_reason: str = "cancelled"      # what a callback's stop means: cancelled, pruned, ...
    generator: torch.Generator | None = None
    amp: AmpPolicy | None = None          # the mixed-precision policy (devices.amp_policy)
    scaler: Any = None                    # torch.amp.GradScaler, enabled when the policy has fp16 in it
    gradients: "GradientHealth | None" = None   # gradient norms and clipping between progress records
    started: float = field(default_factory=time.perf_counter)


def layer_name(param: str) -> str:
    """The layer a parameter belongs to, as gradient health reports it: 'lstm.weight_ih_l1_reverse' ->
    'lstm 2 backward', 'lstm.bias_hh_l0' -> 'lstm 1', 'head.weight' -> 'head', 'features.3.bias' -> 'features.3'."""
    match = re.fullmatch(r"(.*)\.(?:weight|bias)_(?:ih|hh)_l(\d+)(_reverse)?", param)
    if match:
        return f"{match[1]} {int(match[2]) + 1}" + (" backward" if match[3] else "")
    return param.rpartition(".")[0] or param


STEP_POINTS = 28      # points on the time axis of the gradient reaching each step: one per row, or per 28 pixels
PROBE_SAMPLES = 64    # validation images the gradient over time is measured on, the same ones every time


def step_gradient_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        points: int = STEP_POINTS) -> list[float | None]:
    """How much of the loss's gradient reaches each time step of the input x (B, T, F): the root mean square
    over the batch of |dL/dx_t|, averaged over `points` equal spans of the sequence, first step first (None
    where non-finite). This is what vanishing gradients are: an LSTM whose early steps get orders of
    magnitude less than its last cannot learn from them. Measured in fp32 with the model in eval mode (no
    dropout, so no random numbers drawn: a resumed run stays identical); the weights' gradients are untouched."""
    was_training = model.training
    model.eval()
    x = x.detach().float().requires_grad_()
    # cuDNN's LSTM has no backward in eval mode; torch's own LSTM on the GPU has, for these few samples
    off = torch.backends.cudnn.flags(enabled=False) if x.device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.enable_grad(), off:
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x).float(), y), x)
    finally:
        model.train(was_training)
    per_step = grad.square().sum(2).mean(0)                                    # (T,)
    spans = torch.stack([span.mean() for span in per_step.tensor_split(points)]).sqrt()
    return [v if math.isfinite(v) else None for v in spans.tolist()]


class GradientHealth:
    """The gradients' norm before clipping, in all and per layer, and how often clipping fired: the signal
    that shows an LSTM's gradients exploding (norms jumping, clipping firing on most steps, non-finite
    steps). Summed on the device between progress records, so a step never waits for the device;
    record() reads and resets the sums. Given a `probe` batch (an LSTM's), each record also has the
    gradient reaching each time step (step_gradient_norms), where vanishing gradients show."""

    def __init__(self, model: torch.nn.Module, device: torch.device,
                 probe: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.model, self.probe = model, probe
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        names = [layer_name(name) for name, _ in named]
        self.layers = list(dict.fromkeys(names))
        # (layers, params): 1 where a parameter belongs to a layer, to sum squared norms per layer in one op
        self.members = torch.tensor([[float(n == layer) for n in names] for layer in self.layers], device=device)
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = lambda *shape: torch.zeros(shape, device=self.device)  # noqa: E731
        self.total_sum, self.total_max, self.layer_sum = zero(), zero(), zero(len(self.layers))
        self.finite, self.clipped, self.steps = zero(), zero(), 0

    def measure(self, max_norm: float) -> torch.Tensor:
        """This step's total gradient norm (gradients already unscaled), added to the sums."""
        squares = torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float32).square() if p.grad is not None
                               else torch.zeros((), device=self.device) for p in self.params])
        total = squares.sum().sqrt()
        ok = torch.isfinite(total)
        kept = torch.where(ok, total, 0.0)                 # a non-finite step counts only in `finite`
        self.total_sum += kept
        self.layer_sum += torch.where(ok, (self.members @ squares).sqrt(), 0.0)
        torch.maximum(self.total_max, kept, out=self.total_max)
        self.finite += ok
        if max_norm:
            self.clipped += total > max_norm
        self.steps += 1
        return total

    def record(self, max_norm: float) -> dict:
        """The means since the last record (over steps with finite gradients), then the sums start again."""
        # one copy from the device for all the sums
        finite, clipped, total_sum, total_max, *layer_sums = torch.cat(
            [torch.stack([self.finite, self.clipped, self.total_sum, self.total_max]), self.layer_sum]).tolist()
        finite, n = int(finite), max(int(finite), 1)
        out = {"grad_norm": total_sum / n if finite else None,
               "grad_norm_max": total_max if finite else None,
               "layer_grad_norms": {name: s / n for name, s in zip(self.layers, layer_sums)} if finite else {},
               "clip_fraction": clipped / self.steps if max_norm and self.steps else None,
               "nonfinite_steps": self.steps - finite}
        if self.probe is not None:
            out["step_grad_norms"] = step_gradient_norms(self.model, *self.probe)
        self.reset()
        return out


def make_optimizer(config: TrainConfig, params: Iterable[torch.nn.Parameter],
                   device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    # one fused kernel for all parameters instead of a dozen ops each (CPU and CUDA have them)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if config.optimizer in ("adam", "adamw"):
        kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        return kind(params, config.lr, weight_decay=config.weight_decay, **fused)
    if config.optimizer == "sgd":
        sgd = torch.optim.SGD(params, config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                              nesterov=config.momentum > 0, **fused)
        if config.momentum:
            # fused SGD makes its momentum buffers with empty_like on its first step and fills them in the
            # kernel, which skips a step that overflowed under loss scaling: they would keep whatever memory
            # was there. Zeros from the start give the same first step (buf = grad: no dampening) and stay
            # zeros when it is skipped
            for group in sgd.param_groups:
                for p in group["params"]:
                    sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return sgd
    return torch.optim.RMSprop(params, config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    if config.scheduler == "onecycle":
        if total < 4:      # OneCycleLR divides by zero without two steps in each phase: a constant lr
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        # a quarter of the steps warm up (at least two, for short runs)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                                   pct_start=max(0.25, 2 / total))
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
    return None


def should_stop(stop: Any, state: FitState) -> bool:
    if state.should_stop:
        return True
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return stop.is_set()
    return bool(stop())


def fit(config: TrainConfig, callbacks: Iterable[Callback] = (), stop: Any = None,
        data: MNIST | None = None, resume: dict | None = None, device: str | torch.device | None = None) -> History:
    """Train `config`, early-stop on validation loss, restore the best weights, evaluate on the test set.
    `stop`: a threading/multiprocessing Event or a callable; when it is set the run ends as cancelled.
    `resume`: a checkpoint saved at the end of an epoch (checkpoints.checkpoint_dict) plus `best_model`, the best
    weights so far; training goes on from the next epoch exactly as if it had never stopped.
    `device`: where to train, when the caller has chosen (a GPU it holds the lock of); else config.device."""
    callbacks = list(callbacks)
    state, splits = prepare(config, data, device)
    model, dtype = state.model, state.amp.dtype
    if resume is not None:
        restore(state, resume)
    emit = lambda hook, *args: [getattr(cb, hook)(state, *args) for cb in callbacks]  # noqa: E731
    try:
        emit("on_run_start")
        for epoch in range(state.epoch + 1, config.epochs + 1):
            train = train_epoch(state, splits, emit, stop)
            if train is None:
                state.history.stopped = state.stop_reason if state.should_stop else "cancelled"
                break
            record = end_epoch(state, splits, train)
            emit("on_epoch_end", record)
            if should_stop(stop, state):
                state.history.stopped = state.stop_reason if state.should_stop else "cancelled"
                break
            if config.patience and state.bad_epochs >= config.patience:
                state.history.stopped = "early_stopped"
                break
        state.history.train_seconds = time.perf_counter() - state.started
        emit("on_train_end")
        if state.best_state is not None:
            model.load_state_dict(state.best_state)
        state.history.test = evaluate(model, splits.test_x, splits.test_y, config, amp_dtype=dtype)
        emit("on_run_end", state.history)
    except BaseException as exc:
        for cb in callbacks:
            cb.on_exception(state, exc)
        raise
    return state.history


def prepare(config: TrainConfig, data: MNIST | None = None,
            device: str | torch.device | None = None) -> tuple[FitState, Splits]:
    """Everything a run needs before its first step: the device set up, seeds, data splits on the device,
    model, optimizer, schedule, mixed-precision policy and loss scaler."""
    device = resolve_device(str(device) if device is not None else config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    policy = policy_for(config.amp, device, config.arch)   # an amp this device can't run well fails here
    if device.type == "cuda":
        torch.cuda.set_device(device)          # cuDNN's and autocast's per-device state follow the current GPU
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        # fp32 on a GPU means TF32 tensor cores for matmuls and cuDNN, as on every framework's default
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        cpu.prepare_process()
    torch.manual_seed(config.seed)
    splits = make_splits(data or load_mnist(), config, device)
    model = build_model(config).to(device)
    if device.type == "cpu":
        cpu.accelerate(model)
    optimizer = make_optimizer(config, model.parameters(), device)
    n_train = len(splits.train_y)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    state = FitState(config, device, model, optimizer, make_scheduler(config, optimizer, steps_per_epoch),
                     History(config, str(device)), steps_per_epoch, n_train,
                     generator=torch.Generator().manual_seed(config.seed), amp=policy,
                     scaler=torch.amp.GradScaler(device.type, enabled=policy.grad_scaler),
                     gradients=GradientHealth(model, device, gradient_probe(config, splits)))
    return state, splits


def gradient_probe(config: TrainConfig, splits: Splits) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first validation images as an LSTM reads them, for the gradient over time; None for a CNN,
    which has no time steps."""
    if config.arch != "lstm":
        return None
    idx = torch.arange(min(PROBE_SAMPLES, len(splits.val_y)), device=splits.val_y.device)
    return batch_input(splits.val_x, idx, config), splits.val_y[idx]


def train_epoch(state: FitState, splits: Splits, emit: Callable, stop: Any) -> dict | None:
    """One pass over the training set: its mean loss and accuracy, or None when a stop came first."""
    config = state.config
    state.model.train()
    state.batch = 0
    perm = to_device(torch.randperm(state.n_train, generator=state.generator), state.device)
    if state.device.type == "cuda":
        reseed_cudnn_dropout(state.device)
    # running sums stay on the device: one host sync per `log_every` batches, not per batch
    loss_sum = torch.zeros((), device=state.device)
    correct = torch.zeros((), device=state.device, dtype=torch.long)
    seen, window_start = 0, time.perf_counter()
    epoch_loss, epoch_correct = 0.0, 0
    for start in range(0, state.n_train, config.batch_size):
        if should_stop(stop, state):
            return None
        idx = perm[start:start + config.batch_size]
        loss, n_correct = train_step(state, splits, idx)
        loss_sum += loss * len(idx)
        correct += n_correct
        seen += len(idx)
        state.batch += 1
        if state.batch % config.log_every == 0 or state.batch == state.steps_per_epoch:
            window_loss, window_correct = loss_sum.item(), correct.item()   # waits for the window's batches
            now = time.perf_counter()
            epoch_loss, epoch_correct = epoch_loss + window_loss, epoch_correct + window_correct
            emit("on_batch", batch_record(state, window_loss / seen, window_correct / seen,
                                          seen / max(now - window_start, 1e-9)))
            loss_sum.zero_(), correct.zero_()
            # the next window starts after the record: samples/s times training alone, not the record's
            # gradient-over-time probe (a backward through every time step, without cuDNN on a GPU) nor what
            # the callbacks write
            seen, window_start = 0, time.perf_counter()
    return {"loss": epoch_loss / state.n_train, "accuracy": epoch_correct / state.n_train}


def train_step(state: FitState, splits: Splits, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the training samples `idx`: (mean loss, correct predictions), both left on the
    device. Nothing in it waits for the device (tests/test_cuda.py holds it to that), so a GPU never idles
    while Python catches up."""
    config, model, optimizer, scaler = state.config, state.model, state.optimizer, state.scaler
    x = batch_input(splits.train_x, idx, config, state.generator, augment_batch=True)
    y = splits.train_y[idx]
    with autocast(state.device, state.amp.dtype):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)                        # the true gradients, for their norms and for clipping
    norm = state.gradients.measure(config.grad_clip)
    if config.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(state.gradients.params, config.grad_clip, norm)
    if scaler.is_enabled() and not optimizer.defaults.get("fused"):
        # GradScaler skips an overflowed step of an optimizer without a fused step (RMSprop) by reading
        # found_inf on the host, a sync every step: skip it on the device instead. found_inf is set when an
        # unscaled gradient is not finite, and then neither is their norm (which also skips the rare step
        # of finite gradients whose norm overflows fp32)
        step_if_finite(optimizer, torch.isfinite(norm))
    else:
        scaler.step(optimizer)                        # a fused step reads found_inf on the device
    scaler.update()
    if config.scheduler in PER_BATCH_SCHEDULERS:
        state.scheduler.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step(), undone on the device where `finite` (a bool tensor) is False, so that the host never
    waits to learn which: the parameters and their state buffers (RMSprop's square and gradient averages and
    momentum) get back their values from before the step; buffers the step created, on the first step, go
    back to the zeros RMSprop starts them at. RMSprop's step count still counts the step: its update does
    not read it."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    def tensors() -> list[torch.Tensor]:
        return [t for p in params for t in (p, *optimizer.state[p].values())
                if isinstance(t, torch.Tensor) and t.shape == p.shape]

    before = {id(t): t.detach().clone() for t in tensors()}
    optimizer.step()
    with torch.no_grad():
        for t in tensors():
            old = before.get(id(t))
            torch.where(finite, t, old if old is not None else torch.zeros((), dtype=t.dtype, device=t.device),
                        out=t)


def reseed_cudnn_dropout(device: torch.device) -> None:
    """Make cuDNN draw its dropout state afresh from the CUDA generator before the next LSTM call. cuDNN
    keeps that state (for dropout between stacked layers) per process and seeds it once; a resumed run in
    a new process would otherwise drop other units than the uninterrupted run. Setting the generator's state
    (to itself) is what tells torch to reseed it, so each epoch's masks follow from the saved RNG state."""
    torch.cuda.set_rng_state(torch.cuda.get_rng_state(device), device)


def batch_record(state: FitState, loss: float, accuracy: float, samples_per_s: float) -> dict:
    done = state.epoch * state.steps_per_epoch + state.batch
    total = state.config.epochs * state.steps_per_epoch
    elapsed = time.perf_counter() - state.started
    return {"event": "batch", "epoch": state.epoch + 1, "batch": state.batch, "batches": state.steps_per_epoch,
            "step": done, "steps": total, "loss": loss, "accuracy": accuracy, "samples_per_s": samples_per_s,
            "lr": state.optimizer.param_groups[0]["lr"], "elapsed": elapsed,
            "eta": elapsed / done * (total - done), "time": time.time(),
            **(state.gradients.record(state.config.grad_clip) if state.gradients else {})}


def end_epoch(state: FitState, splits: Splits, train: dict) -> dict:
    """Validate, step the plateau scheduler, keep a copy of the best weights, build the epoch record."""
    config, history = state.config, state.history
    val = evaluate(state.model, splits.val_x, splits.val_y, config, detailed=False, amp_dtype=state.amp.dtype)
    if config.scheduler == "plateau":
        state.scheduler.step(val["loss"])
    state.epoch += 1
    state.improved = val["loss"] < history.best_val_loss
    if state.improved:
        history.best_val_loss, history.best_val_accuracy, history.best_epoch = val["loss"], val["accuracy"], state.epoch
        # a copy, not a live reference: later steps must not change the weights we restore
        state.best_state = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1
    elapsed = time.perf_counter() - state.started
    record = {"event": "epoch", "epoch": state.epoch, "epochs": config.epochs,
              "train_loss": train["loss"], "train_accuracy": train["accuracy"], "train_error": 1 - train["accuracy"],
              "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_error": val["error"],
              "lr": state.optimizer.param_groups[0]["lr"], "epoch_seconds": elapsed - sum_epoch_seconds(history),
              "elapsed": elapsed, "eta": elapsed / state.epoch * (config.epochs - state.epoch),
              "best_epoch": history.best_epoch, "improved": state.improved, "time": time.time()}
    history.epochs.append(record)
    return record


def sum_epoch_seconds(history: History) -> float:
    return sum(r["epoch_seconds"] for r in history.epochs)



def restore(state: FitState, ckpt: dict) -> None:
    """Put a run back where an end-of-epoch checkpoint left it: weights, optimizer, scheduler, grad
    scaler, random streams, history and early-stopping state."""
    if ckpt.get("partial"):
        raise ValueError("this checkpoint was saved in the middle of an epoch; resume needs one from an epoch's end")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scheduler is not None and ckpt.get("scheduler"):
        state.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") and state.scaler is not None:
        state.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if state.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], state.device)
    state.generator.set_state(ckpt["rng"]["generator"])
    history = state.history
    history.epochs = [dict(r) for r in ckpt["history"]]
    history.best_epoch, history.best_val_loss = ckpt["best_epoch"], ckpt["best_val_loss"]
    history.best_val_accuracy = ckpt["best_val_accuracy"]
    state.epoch, state.bad_epochs = ckpt["epoch"], ckpt["bad_epochs"]
    if ckpt.get("best_model") is not None:
        state.best_state = {k: v.to(state.device) for k, v in ckpt["best_model"].items()}
    elapsed = history.epochs[-1]["elapsed"] if history.epochs else 0.0
    state.started = time.perf_counter() - elapsed          # times and ETAs continue from where they were
