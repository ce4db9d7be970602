"""The classifiers. Pure modules in plain torch: no devices, no I/O; rebuilt from a TrainConfig with
build_model. (On a CPU, training and prediction hand the model to cpu.accelerate, which computes its
nn.LSTM in a faster kernel with the same parameters and results.)

Shapes: B batch, T time steps, F features per step, H hidden size, D directions (1 or 2).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig
from .devices import cpu_has_bf16, lstm_leaves_autocast


CHRONO_FROM_STEPS = 100     # under forget_init "auto", sequences at least this long get the chrono initialisation


def init_gate_biases(lstm: nn.LSTM, steps: int, forget_init: str = "auto") -> None:
    """Forget gates start open, so gradients reach the first steps.

    "one": forget bias 1 (Jozefowicz et al. 2015), enough for short sequences (rows, 28 steps). "chrono"
    (Tallec & Ollivier 2018): forget bias log(U(1, steps - 1)) and input bias its negative, so the units'
    memory spans range up to the whole sequence; on pixels (784 steps) bias 1 sits at chance for thousands
    of updates, chrono learns within the first epoch. "auto": chrono from CHRONO_FROM_STEPS steps, else one.
    "torch": PyTorch's own uniform biases (forget gate half shut), kept so that the vanishing gradients
    these initialisations prevent can be watched (gradient health, Train page)."""
    if forget_init == "torch":
        return
    hidden = lstm.hidden_size
    chrono = forget_init == "chrono" or (forget_init == "auto" and steps >= CHRONO_FROM_STEPS)
    with torch.no_grad():
        for name, bias in lstm.named_parameters():                  # gate order: input, forget, cell, output
            if name.startswith("bias_hh"):                          # the ih biases alone set the start
                bias[0 if chrono else hidden:2 * hidden].zero_()
            elif name.startswith("bias_ih") and chrono:
                forget = torch.empty(hidden).uniform_(1, steps - 1).log_()
                bias[hidden:2 * hidden] = forget
                bias[:hidden] = -forget
            elif name.startswith("bias_ih"):
                bias[hidden:2 * hidden].fill_(1.0)



class LSTMClassifier(nn.Module):
    """An LSTM reading an image as a sequence (rows or pixels), classified from its last step.

    x (B, T, F) -> logits (B, 10). Bidirectional: the head reads both directions' final states
    (forward after step T, backward after step 1)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 bidirectional: bool = False, num_classes: int = 10, steps: int = 28, forget_init: str = "auto"):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)
        init_gate_biases(self.lstm, steps, forget_init)

    def run_lstm(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """self.lstm(x), in fp32 outside autocast where autocast would compute it in a dtype that cannot or
        must not be used: out (B, T, D*H), (h_n, c_n) (layers*D, B, H)."""
        kind = x.device.type
        if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind) and lstm_leaves_autocast(
                kind, torch.get_autocast_dtype(kind), cpu_has_bf16()):
            with torch.autocast(kind, enabled=False):
                return self.lstm(x.float())
        return self.lstm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h_n, _) = self.run_lstm(x)              # out (B, T, D*H); h_n (layers*D, B, H)
        if self.lstm.bidirectional:
            last = torch.cat([h_n[-2], h_n[-1]], 1)   # (B, 2H): forward's and backward's final states
        else:
            last = h_n[-1]                            # (B, H), = out[:, -1]
        return self.head(self.dropout(last))          # (B, 10)

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output at every step, (B, T, D*H)."""
        return self.run_lstm(x)[0]

    def logits_from_states(self, out: torch.Tensor) -> torch.Tensor:
        """forward(x) from hidden_states(x), (B, T, D*H) -> (B, 10), without running the LSTM again: the
        forward direction's state after step T and, bidirectional, the backward one's after step 1."""
        hidden = self.lstm.hidden_size
        last = torch.cat([out[:, -1, :hidden], out[:, 0, hidden:]], 1) if self.lstm.bidirectional else out[:, -1]
        return self.head(self.dropout(last))

    def logits_per_step(self, out: torch.Tensor) -> torch.Tensor:
        """Logits after every time step from hidden_states(x), (B, T, D*H) -> (B, T, 10): what the model would
        answer had the image ended there. Unidirectional models only (a backward pass has read the whole
        image at every step)."""
        if self.lstm.bidirectional:
            raise ValueError("per-step logits need a unidirectional LSTM; this one is bidirectional")
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
    return LSTMClassifier(features, config.hidden_size, config.num_layers, config.dropout, config.bidirectional,
                          steps=steps, forget_init=config.forget_init)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
