"""The classifiers. Pure modules in plain torch: no devices, no I/O; rebuilt from a TrainConfig with
build_model. The recurrent cells are torch's own nn.LSTM, nn.GRU and nn.RNN. (On a CPU, training and
prediction hand the model to cpu.accelerate, which computes its nn.LSTM in a faster kernel with the same
parameters and results.)

Shapes: B batch, T time steps, F features per step, H hidden size, D directions (1 or 2).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig
from .devices import cpu_has_bf16, lstm_leaves_autocast


CHRONO_FROM_STEPS = 100     # under forget_init "auto", sequences at least this long get the chrono initialisation
MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN, "irnn": nn.RNN}
GATED = ("lstm", "gru")     # the cells with a memory gate for init_gate_biases to open


def init_gate_biases(module: nn.LSTM | nn.GRU, steps: int, forget_init: str = "auto") -> None:
    """Memory gates start open, so gradients reach the first steps (the LSTM's forget gate, the GRU's update
    gate, which in torch's GRU weighs the previous state: h' = (1 - z) * n + z * h).

    "one": the gate's bias 1 (Jozefowicz et al. 2015), enough for short sequences (rows, 28 steps). "chrono"
    (Tallec & Ollivier 2018): bias log(U(1, steps - 1)) and, for the LSTM, the input gate's its negative, so
    the units' memory spans range up to the whole sequence; on pixels (784 steps) bias 1 sits at chance for
    thousands of updates, chrono learns within the first epoch. "auto": chrono from CHRONO_FROM_STEPS
    steps, else one. "torch": PyTorch's own uniform biases (the gate half shut), kept so that the vanishing
    gradients these initialisations prevent can be watched (gradient health, Train page)."""
    if forget_init == "torch":
        return
    hidden = module.hidden_size
    # torch stacks the gates' biases: the memory gate is the second block in both orders (LSTM i, f, g, o;
    # GRU r, z, n); the LSTM's input gate, the first, is what chrono sets to its negative
    gate = slice(hidden, 2 * hidden)
    opposite = slice(0, hidden) if isinstance(module, nn.LSTM) else None
    chrono = forget_init == "chrono" or (forget_init == "auto" and steps >= CHRONO_FROM_STEPS)
    with torch.no_grad():
        for name, bias in module.named_parameters():
            if name.startswith("bias_hh"):                          # the ih biases alone set the start
                bias[gate].zero_()
                if chrono and opposite is not None:
                    bias[opposite].zero_()
            elif name.startswith("bias_ih") and chrono:
                memory = torch.empty(hidden).uniform_(1, steps - 1).log_()
                bias[gate] = memory
                if opposite is not None:
                    bias[opposite] = -memory
            elif name.startswith("bias_ih"):
                bias[gate].fill_(1.0)


def init_identity(rnn: nn.RNN) -> None:
    """The IRNN's start (Le, Jaitly & Hinton 2015): recurrent weights the identity and biases zero, so a ReLU
    RNN begins by carrying its state forward unchanged and its gradient neither vanishes nor explodes
    through time; the input weights keep torch's uniform start."""
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(torch.eye(rnn.hidden_size))
            elif name.startswith("bias"):
                p.zero_()


def recurrent_module(cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
                     bidirectional: bool) -> nn.LSTM | nn.GRU | nn.RNN:
    """torch's own layer for a cell, batch first; rnn is tanh, irnn ReLU."""
    extra = {"nonlinearity": "relu" if cell == "irnn" else "tanh"} if MODULES[cell] is nn.RNN else {}
    return MODULES[cell](input_size, hidden_size, num_layers, batch_first=True,
                         dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional, **extra)


def attribute(cell: str) -> str:
    """The classifier's attribute holding the cell's layers, so parameter names say which cell they are
    ('gru.weight_hh_l0'), and an LSTM's are what they always were: checkpoints load unchanged."""
    return "rnn" if cell == "irnn" else cell


class RecurrentClassifier(nn.Module):
    """A recurrent net (LSTM, GRU or plain RNN) reading an image as a sequence (rows or pixels), classified
    from its last step.

    x (B, T, F) -> logits (B, 10). Bidirectional: the head reads both directions' final states
    (forward after step T, backward after step 1)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 bidirectional: bool = False, num_classes: int = 10, steps: int = 28, forget_init: str = "auto",
                 cell: str = "lstm"):
        super().__init__()
        self.cell = cell
        setattr(self, attribute(cell),
                recurrent_module(cell, input_size, hidden_size, num_layers, dropout, bidirectional))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)
        if cell in GATED:
            init_gate_biases(self.recurrent, steps, forget_init)
        elif cell == "irnn":
            init_identity(self.recurrent)

    @property
    def recurrent(self) -> nn.LSTM | nn.GRU | nn.RNN:
        return getattr(self, attribute(self.cell))

    def run_recurrent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrent layers on x: out (B, T, D*H) and the final states h_n (layers*D, B, H). In fp32
        outside autocast where autocast would compute them in a dtype that cannot or must not be used."""
        kind = x.device.type
        layers = self.recurrent
        if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind) and lstm_leaves_autocast(
                kind, torch.get_autocast_dtype(kind), cpu_has_bf16()):
            with torch.autocast(kind, enabled=False):
                out, state = layers(x.float())
        else:
            out, state = layers(x)
        return out, state[0] if isinstance(state, tuple) else state     # an LSTM's state is (h_n, c_n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h_n = self.run_recurrent(x)              # out (B, T, D*H); h_n (layers*D, B, H)
        if self.recurrent.bidirectional:
            last = torch.cat([h_n[-2], h_n[-1]], 1)   # (B, 2H): forward's and backward's final states
        else:
            last = h_n[-1]                            # (B, H), = out[:, -1]
        return self.head(self.dropout(last))          # (B, 10)

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output at every step, (B, T, D*H)."""
        return self.run_recurrent(x)[0]

    def logits_from_states(self, out: torch.Tensor) -> torch.Tensor:
        """forward(x) from hidden_states(x), (B, T, D*H) -> (B, 10), without running the layers again: the
        forward direction's state after step T and, bidirectional, the backward one's after step 1."""
        hidden = self.recurrent.hidden_size
        last = (torch.cat([out[:, -1, :hidden], out[:, 0, hidden:]], 1) if self.recurrent.bidirectional
                else out[:, -1])
        return self.head(self.dropout(last))

    def logits_per_step(self, out: torch.Tensor) -> torch.Tensor:
        """Logits after every time step from hidden_states(x), (B, T, D*H) -> (B, T, 10): what the model would
        answer had the image ended there. Unidirectional models only (a backward pass has read the whole
        image at every step)."""
        if self.recurrent.bidirectional:
            raise ValueError("per-step logits need a unidirectional model; this one is bidirectional")
        return self.head(self.dropout(out))


class CNNClassifier(nn.Module):
    """The usual MNIST convnet: two 3x3 conv blocks with batch norm and pooling, then a small head.

    x (B, 1, 28, 28) -> logits (B, 10)."""

    def __init__(self, dropout: float = 0.25, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),       # (B, 32, 28, 28)
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),                                                     # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),                                                     # (B, 64, 7, 7)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(config: TrainConfig) -> nn.Module:
    if config.arch == "cnn":
        return CNNClassifier(config.dropout)
    steps, features = config.seq_shape
    return RecurrentClassifier(features, config.hidden_size, config.num_layers, config.dropout, config.bidirectional,
                               steps=steps, forget_init=config.forget_init, cell=config.cell)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
