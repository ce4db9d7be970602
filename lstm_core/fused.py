"""A faster LSTM for CPUs in fp32: nn.LSTM's maths with the recurrence in a small C++ kernel (lstm_cpu.cpp).

    out, (h_n, c_n) = run_lstm(model.lstm, x)      # same results as model.lstm(x), same parameters

torch's CPU LSTM spreads every time step's small GEMM over all threads; the kernel instead gives each
thread its share of the batch, for all time steps of every layer and for the weight gradients, so the
threads meet once per pass through a stack of layers. On a 2-core AVX-512 CPU this trains 1.6x (bilstm)
to 3x (pixel) faster than torch's (`make bench`, README). Everything else, CUDA (cuDNN), MPS, autocast
(bf16/fp16) and any machine where the kernel cannot be built (no C++ compiler), goes to nn.LSTM
unchanged; LSTM_STUDIO_FUSED=0 forces that path.

The kernel is compiled once per machine and torch version (about 30 s, by `make` at setup or on first
use) into torch's extension cache, ~/.cache/torch_extensions.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch
from torch import nn

from .devices import CUDNN_LSTM_AUTOCAST_DTYPE, cpu_has_bf16

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("lstm_cpu.cpp")
_lock = threading.Lock()
_state: dict = {}


def _flags() -> list[str]:
    flags = ["-O3", "-ffast-math", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ["-march=native", "-mprefer-vector-width=512"]
    return flags


def _build_name() -> str:
    """One build per CPU model and torch: -march=native code must not reach a different CPU."""
    try:
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    key = hashlib.sha1(f"{cpu}|{torch.__version__}|{platform.machine()}".encode()).hexdigest()[:10]
    return f"lstm_studio_cpu_{key}"


def kernel():
    """The compiled kernel module, or None when it cannot be built here (then nn.LSTM is used)."""
    if "kernel" not in _state:
        with _lock:
            if "kernel" not in _state:
                _state["kernel"] = None
                if os.environ.get("LSTM_STUDIO_FUSED", "1") != "0":
                    try:
                        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA" noise
                        from torch.utils import cpp_extension
                        _state["kernel"] = cpp_extension.load(_build_name(), [str(SOURCE)], extra_cflags=_flags())
                    except Exception as exc:  # noqa: BLE001 - no compiler, no OpenMP: fall back, say why once
                        lines = str(exc).strip().splitlines() or [""]
                        _state["error"] = next((line for line in lines if "error" in line.lower()), lines[-1])[:300]
                        log.warning("fused CPU LSTM unavailable, using torch's nn.LSTM (%s)", _state["error"])
    return _state["kernel"]


def available() -> bool:
    return kernel() is not None


def flush_denormals() -> bool:
    """Treat denormal floats as zero on all of torch's CPU threads (training processes call this): the
    vanishing gradients of long sequences are denormal, and x86 CPUs compute on them ~100x slower."""
    torch.set_flush_denormal(True)                              # this thread
    return kernel().flush_denormals() if available() else False  # and the pool's


def enable(on: bool = True) -> None:
    """Turn the fused path on or off in this process (the benchmark measures both)."""
    _state["off"] = not on


def applies(lstm: nn.LSTM, x: torch.Tensor) -> bool:
    """Whether run_lstm takes the fused path for this input (otherwise it calls nn.LSTM)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and lstm.bias and lstm.batch_first
            and not lstm.proj_size and not torch.is_autocast_enabled("cpu") and not _state.get("off")
            and available())


class _Stack(torch.autograd.Function):
    """A unidirectional stack of LSTM layers: x (B, T, F) -> hs (B, T, H) of the last layer, c_n, h_n
    (L, B, H). weights: w_ih, w_hh and b_ih + b_hh of each layer. Each layer's output is dropped out with
    probability `dropout` as the next layer reads it (the masks dropout_mask would make from `seeds`), so
    dropout costs no tensor of its own, and a classifier that reads only h_n sends no (B, T, H) gradient
    of zeros into the backward pass."""

    @staticmethod
    def forward(ctx, x, dropout, seeds, *weights):
        hs, c_n, h_n, layout, *kept = kernel().forward(x, list(weights), True, dropout, seeds)
        ctx.save_for_backward(layout, *kept, *weights)
        ctx.set_materialize_grads(False)
        ctx.dropout, ctx.seeds, ctx.layers = dropout, seeds, len(weights) // 3
        return hs, c_n, h_n

    @staticmethod
    def backward(ctx, d_hs, d_c_n, d_h_n):
        layout, *saved = ctx.saved_tensors
        kept, weights = saved[:4 * ctx.layers], saved[4 * ctx.layers:]
        d_x, *d_weights = kernel().backward(d_hs, d_c_n, d_h_n, layout, kept, weights, ctx.needs_input_grad[0],
                                            ctx.dropout, ctx.seeds)
        return (d_x if ctx.needs_input_grad[0] else None, None, None, *d_weights)


def dropout_seed() -> int:
    """A seed for the kernel's dropout masks, drawn from torch's generator: reproducible under
    torch.manual_seed like F.dropout."""
    return int(torch.randint(0, 2**62, (1,)))


def dropout_mask(shape: torch.Size, p: float, seed: int | None = None) -> torch.Tensor:
    """A dropout mask (0 or 1/(1-p)) from the kernel's hash generator, far cheaper on a CPU than
    bernoulli_; _Stack drops a layer's input with the same mask for the same shape and seed."""
    return kernel().dropout_mask(shape.numel(), p, dropout_seed() if seed is None else seed).view(shape)


class Dropout(nn.Dropout):
    """nn.Dropout, with the mask from dropout_mask on a CPU in fp32 (the head's dropout: bernoulli_ took
    a fifteenth of a training step of the default model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and 0 < self.p < 1 and x.device.type == "cpu" and x.dtype == torch.float32
                and not _state.get("off") and available()):
            return x * dropout_mask(x.shape, self.p)
        return super().forward(x)


def outside_autocast(dtype: torch.dtype) -> bool:
    """Whether a CUDA LSTM under autocast to `dtype` runs in fp32 outside it: under bf16, cuDNN's LSTM would
    compute in fp16 (devices.CUDNN_LSTM_AUTOCAST_DTYPE) with no loss scaling, so it keeps fp32 (TF32) instead."""
    return dtype == torch.bfloat16 and CUDNN_LSTM_AUTOCAST_DTYPE != torch.bfloat16


def run_lstm(lstm: nn.LSTM, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """lstm(x) for a batch_first nn.LSTM: out (B, T, D*H), (h_n, c_n) (layers*D, B, H); fused where it applies."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not cpu_has_bf16():
        # oneDNN has no bf16 LSTM on CPUs without AVX-512 BF16 or AMX (it raises): this layer runs in fp32
        with torch.autocast("cpu", enabled=False):
            return run_lstm(lstm, x.float())
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and outside_autocast(torch.get_autocast_dtype("cuda")):
        with torch.autocast("cuda", enabled=False):
            return lstm(x.float())
    if not applies(lstm, x):
        return lstm(x)
    # autograd needs every step's state; inference only the outputs (and the kernel then keeps no more)
    keep = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in lstm.parameters()))

    def stack(seq, layers, suffix, dropout):
        weights = []
        for layer in layers:
            w_ih, w_hh, b_ih, b_hh = (getattr(lstm, f"{name}_l{layer}{suffix}")
                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            weights += [w_ih, w_hh, b_ih + b_hh]
        seeds = [dropout_seed() for _ in layers[1:]] if dropout else []
        if keep:
            return _Stack.apply(seq, dropout, seeds, *weights)
        return kernel().forward(seq, weights, False, dropout, seeds)

    dropout = lstm.dropout if lstm.training and lstm.num_layers > 1 else 0.0
    if not lstm.bidirectional:           # the whole stack in one call: each thread takes its rows through all layers
        hs, c_n, h_n = stack(x, range(lstm.num_layers), "", dropout)
        return hs, (h_n, c_n)
    layer_in = x                                                               # (B, T, F)
    finals_h, finals_c = [], []
    for layer in range(lstm.num_layers):  # both directions read each layer's output, one of them flipped
        outs = []
        for direction, suffix in enumerate(("", "_reverse")):
            hs, c_n, h_n = stack(layer_in.flip(1) if direction else layer_in, [layer], suffix, 0.0)
            finals_h.append(h_n[0])
            finals_c.append(c_n[0])
            outs.append(hs.flip(1) if direction else hs)
        layer_in = torch.cat(outs, 2)                                          # (B, T, 2H)
        if dropout and layer < lstm.num_layers - 1:
            layer_in = layer_in * dropout_mask(layer_in.shape, dropout)
    return layer_in, (torch.stack(finals_h), torch.stack(finals_c))


if __name__ == "__main__":  # `make` builds the kernel at setup, so nobody waits for it later
    print("fused CPU LSTM:", "built" if available() else f"not available ({_state.get('error')})")
