"""nn.LSTM's maths with the recurrence in the C++ kernel, as an nn.LSTM subclass that accelerate() puts in
place of a model's nn.LSTM.

torch's CPU LSTM spreads every time step's small GEMM over all threads; the kernel instead gives each
thread its share of the batch, for all time steps of every layer and for the weight gradients, so the
threads meet once per pass through a stack of layers. Anything the kernel does not compute (another
device or dtype, autocast, projections, a given initial state, the kernel switched off or not built)
goes to nn.LSTM unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernel

_switch = {"on": True}


def enable(on: bool = True) -> None:
    """Turn the kernel's LSTM on or off in this process (the benchmark measures both)."""
    _switch["on"] = on


def applies(lstm: nn.LSTM, x: torch.Tensor) -> bool:
    """Whether the kernel computes lstm(x) (otherwise nn.LSTM does)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3 and lstm.bias and lstm.batch_first
            and not lstm.proj_size and not torch.is_autocast_enabled("cpu") and _switch["on"]
            and kernel.load() is not None)


class _Stack(torch.autograd.Function):
    """A unidirectional stack of LSTM layers: x (B, T, F) -> hs (B, T, H) of the last layer, c_n, h_n
    (L, B, H). weights: w_ih, w_hh and b_ih + b_hh of each layer. Each layer's output is dropped out with
    probability `dropout` (the masks dropout_mask would make from `seeds`) as the next layer reads it, so
    dropout costs no tensor of its own, and a classifier that reads only h_n sends no (B, T, H) gradient
    of zeros into the backward pass."""

    @staticmethod
    def forward(ctx, x, dropout, seeds, *weights):
        hs, c_n, h_n, layout, *kept = kernel.load().forward(x, list(weights), True, dropout, seeds)
        ctx.save_for_backward(layout, *kept, *weights)
        ctx.set_materialize_grads(False)
        ctx.dropout, ctx.seeds, ctx.layers = dropout, seeds, len(weights) // 3
        return hs, c_n, h_n

    @staticmethod
    def backward(ctx, d_hs, d_c_n, d_h_n):
        layout, *saved = ctx.saved_tensors
        kept, weights = saved[:4 * ctx.layers], saved[4 * ctx.layers:]
        d_x, *d_weights = kernel.load().backward(d_hs, d_c_n, d_h_n, layout, kept, weights, ctx.needs_input_grad[0],
                                                 ctx.dropout, ctx.seeds)
        return (d_x if ctx.needs_input_grad[0] else None, None, None, *d_weights)


def dropout_seed() -> int:
    """A seed for the kernel's dropout masks, drawn from torch's generator: reproducible under
    torch.manual_seed like F.dropout (a resumed run draws the same masks)."""
    return int(torch.randint(0, 2**62, (1,)))


def dropout_mask(shape: torch.Size, p: float, seed: int | None = None) -> torch.Tensor:
    """A dropout mask (0 or 1/(1-p)) from the kernel's hash generator, far cheaper on a CPU than
    bernoulli_ (bidirectional layers' outputs); _Stack drops a layer's input with the same mask for the
    same shape and seed."""
    return kernel.load().dropout_mask(shape.numel(), p, dropout_seed() if seed is None else seed).view(shape)


def run(lstm: nn.LSTM, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """lstm(x) in the kernel, where applies(lstm, x): out (B, T, D*H), (h_n, c_n) (layers*D, B, H)."""
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
        return kernel.load().forward(seq, weights, False, dropout, seeds)

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


class LSTM(nn.LSTM):
    """nn.LSTM computed by the kernel where it applies: the same parameters, state_dict and results."""

    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTM's own argument names
        if hx is None and applies(self, input):
            return run(self, input)
        return super().forward(input, hx)

