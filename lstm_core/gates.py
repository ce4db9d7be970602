"""The gates at work: a recurrent module's gate activations at every step of one input, recomputed from its
weights with the cell's own equations (torch's nn.LSTM and nn.GRU compute them but keep none of them).

    layers = recompute(model.recurrent, x)            # every layer, step by step; None for a plain RNN
    last = last_layer(model.recurrent, x, out)        # the last layer only, fast; out = model.hidden_states(x)
    last.values["forget gate"]                        # (B, T, D*H), in (0, 1)

Shapes: B batch, T time steps, F features per step, H hidden size, D directions (1 or 2). x is (B, T, F), as
the models read it (batch_first). A bidirectional layer's values hold the forward direction's H units, then
the backward one's, as the layer's output does; the backward direction reads the sequence from its end, and
its steps are reported in input order (step t is where it has read the input from T back to t).

Eval-mode semantics: no dropout between layers. Computed in fp32 on the module's device. nn.RNN (tanh or
ReLU) has no gates: its state is rewritten at every step, so there is nothing to show and both functions
return None.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# what each cell gives: its gates in the order of torch's weight rows (the LSTM's candidate g left out), and
# the LSTM's cell state
LSTM_VALUES = ("input gate", "forget gate", "output gate", "cell state")
GRU_VALUES = ("reset gate", "update gate")
Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]     # w_ih, w_hh, b_ih, b_hh


@dataclass(frozen=True)
class LayerGates:
    """One layer's gates at every step of the input."""
    values: dict[str, torch.Tensor]   # name -> (B, T, D*H): LSTM "input gate", "forget gate", "output gate" and
                                      # "cell state" (c_t); GRU "reset gate" and "update gate". Gates in (0, 1)
    h: torch.Tensor                   # (B, T, D*H) the layer's output, recomputed from these values


def cell_of(module: nn.Module) -> str | None:
    """The module's cell, "lstm" or "gru", or None for one without gates (nn.RNN). isinstance, not type:
    cpu.accelerate swaps a model's nn.LSTM for a subclass with the same parameters."""
    if isinstance(module, nn.LSTM):
        if module.proj_size:
            raise ValueError("an LSTM with projections (proj_size) is not supported")
        return "lstm"
    if isinstance(module, nn.GRU):
        return "gru"
    return None


@torch.no_grad()
def recompute(module: nn.Module, x: torch.Tensor) -> list[LayerGates] | None:
    """Every layer's gates for x (B, T, F), step by step from the weights, each layer reading the one below's
    recomputed output. None for a module without gates."""
    cell = cell_of(module)
    if cell is None:
        return None
    layers = []
    inputs = as_input(module, x)
    for layer in range(module.num_layers):
        layers.append(layer_gates(cell, module, layer, inputs))
        inputs = layers[-1].h
    return layers


@torch.no_grad()
def last_layer(module: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> LayerGates | None:
    """The last layer's gates for x (B, T, F), fast enough for a reading on every stroke. On a CPU the layers
    below it, if any, are run by torch itself. With `out`, the module's own output for x (B, T, D*H), the last
    layer's gates follow from it in one pass over all steps (each step's gates need only the step's input and
    the state before it), and only an LSTM's cell state is carried step by step, an elementwise update;
    without it, the last layer is run step by step here."""
    cell = cell_of(module)
    if cell is None:
        return None
    inputs = as_input(module, x)
    if module.num_layers > 1 and inputs.device.type == "cpu":
        inputs = layers_below(module)(inputs)[0].float()
    else:
        # on a GPU, cuDNN would copy weights shared with another module into one chunk at every call, and
        # warn: there the layers below are recomputed here
        for layer in range(module.num_layers - 1):
            inputs = layer_gates(cell, module, layer, inputs).h
    outputs = None if out is None else out.to(inputs.device, torch.float32)
    return layer_gates(cell, module, module.num_layers - 1, inputs, outputs)


def layers_below(module: nn.Module) -> nn.Module:
    """The module without its last layer, sharing its parameters: built on the meta device (no memory, no
    initialisation), then given the module's own tensors. Of the module's own class, so that an LSTM which
    cpu.accelerate swapped runs in its kernel here too. Eval mode: no dropout between layers."""
    below = type(module)(module.input_size, module.hidden_size, module.num_layers - 1, bias=module.bias,
                         batch_first=True, bidirectional=module.bidirectional, device="meta")
    for name, _ in list(below.named_parameters()):
        setattr(below, name, getattr(module, name))
    return below.eval()


def as_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in fp32 on the module's device."""
    if not module.batch_first:
        raise ValueError("the models read (B, T, F): a batch_first module is expected")
    return x.to(next(module.parameters()).device, torch.float32)


def layer_gates(cell: str, module: nn.Module, layer: int, x: torch.Tensor,
                out: torch.Tensor | None = None) -> LayerGates:
    """One layer, both directions if bidirectional, side by side: x (B, T, in) -> values and h (B, T, D*H).
    `out`: the layer's output as the module computed it (see last_layer), else the recurrence is run here."""
    hidden = module.hidden_size
    parts = []
    for direction in range(2 if module.bidirectional else 1):
        weights = direction_weights(module, layer, direction)
        seq = x.flip(1) if direction else x
        if out is None:
            values, h = steps(cell, weights, seq)
        else:
            known = out[..., direction * hidden:(direction + 1) * hidden]
            values, h = from_outputs(cell, weights, seq, known.flip(1) if direction else known)
        if direction:                                                  # back to input order
            values, h = {k: v.flip(1) for k, v in values.items()}, h.flip(1)
        parts.append((values, h))
    if len(parts) == 1:
        return LayerGates(*parts[0])
    (forward, h_f), (backward, h_b) = parts
    return LayerGates({k: torch.cat([forward[k], backward[k]], -1) for k in forward}, torch.cat([h_f, h_b], -1))


def direction_weights(module: nn.Module, layer: int, direction: int) -> Weights:
    """w_ih (G*H, in), w_hh (G*H, H), b_ih and b_hh (G*H) of one layer and direction, in fp32; G = 4 (LSTM)
    or 3 (GRU) gates, in torch's order."""
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    w_ih, w_hh = (getattr(module, f"{name}{suffix}").detach().float() for name in ("weight_ih", "weight_hh"))
    if module.bias:
        b_ih, b_hh = (getattr(module, f"{name}{suffix}").detach().float() for name in ("bias_ih", "bias_hh"))
    else:
        b_ih = b_hh = torch.zeros(w_ih.shape[0], device=w_ih.device)
    return w_ih, w_hh, b_ih, b_hh


def steps(cell: str, weights: Weights, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One direction run through x (B, T, in) from step 1, one step at a time: its values and h (B, T, H)."""
    w_ih, w_hh, b_ih, b_hh = weights
    x_terms = x @ w_ih.t() + b_ih                                        # (B, T, G*H), every step's at once
    h = torch.zeros(x.shape[0], w_hh.shape[1], device=x.device)          # (B, H)
    c = torch.zeros_like(h)
    record = []
    for t in range(x.shape[1]):
        h_terms = h @ w_hh.t() + b_hh                                    # (B, G*H)
        if cell == "lstm":
            i, f, g, o = lstm_gates(x_terms[:, t] + h_terms)
            c = f * c + i * g
            h = o * c.tanh()
            record.append((i, f, o, c, h))
        else:
            r, z, h = gru_step(x_terms[:, t], h_terms, h)
            record.append((r, z, h))
    columns = [torch.stack(column, 1) for column in zip(*record)]        # each (B, T, H)
    return dict(zip(LSTM_VALUES if cell == "lstm" else GRU_VALUES, columns)), columns[-1]


def from_outputs(cell: str, weights: Weights, x: torch.Tensor,
                 out: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One direction's values from its input x (B, T, in) and its own output out (B, T, H), all steps at
    once: the state before step t is out[:, t - 1] (zeros before the first). h is recomputed from them."""
    w_ih, w_hh, b_ih, b_hh = weights
    before = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)  # h_{t-1}
    x_terms = x @ w_ih.t() + b_ih                                        # (B, T, G*H)
    h_terms = before @ w_hh.t() + b_hh
    if cell == "gru":
        r, z, h = gru_step(x_terms, h_terms, before)
        return dict(zip(GRU_VALUES, (r, z))), h
    i, f, g, o = lstm_gates(x_terms + h_terms)
    written = i * g                                                      # what each step adds to the cell
    cells = [written[:, 0]]
    for t in range(1, out.shape[1]):
        cells.append(torch.addcmul(written[:, t], f[:, t], cells[-1]))  # c_t = f_t * c_{t-1} + i_t * g_t
    c = torch.stack(cells, 1)
    return dict(zip(LSTM_VALUES, (i, f, o, c))), o * c.tanh()


def lstm_gates(terms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The input, forget and output gates i, f, o in (0, 1) and the candidate g in (-1, 1), from the sum of
    a step's input and state terms (..., 4H)."""
    i, f, g, o = terms.chunk(4, -1)
    return i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()


def gru_step(x_terms: torch.Tensor, h_terms: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """r, z and h_t from a step's input and state terms (..., 3H) and h_{t-1}. torch's GRU: the reset gate
    scales the state's term of the candidate, its bias included."""
    x_r, x_z, x_n = x_terms.chunk(3, -1)
    h_r, h_z, h_n = h_terms.chunk(3, -1)
    r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()                                           # the candidate
    return r, z, (1 - z) * n + z * h
