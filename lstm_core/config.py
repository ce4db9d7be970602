"""TrainConfig: the single source of every hyperparameter, its validation, and the presets.

    cfg = TrainConfig(hidden_size=64, epochs=3)          # raises ConfigError when invalid
    cfg = preset("tutorial").replace(epochs=5)
    cfg = TrainConfig.from_json(cfg.to_json())            # round trip
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ARCHS = ("lstm", "cnn")
CELLS = ("lstm", "gru", "rnn", "irnn")
SEQ_MODES = ("rows", "pixels", "permuted")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULERS = ("none", "plateau", "onecycle", "cosine")
AMP_MODES = ("off", "auto", "bf16")
FORGET_INITS = ("auto", "chrono", "one", "torch")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """An invalid hyperparameter; the message names the field, the allowed range and the value."""


class DataUnavailable(RuntimeError):
    """No MNIST source worked; the message lists what was tried and how to fix it. (Here rather than in
    data.py so that catching it, as the CLI does, imports no torch.)"""


@dataclass(frozen=True)
class TrainConfig:
    # model
    arch: str = "lstm"              # "lstm": a recurrent net reading the image as a sequence; "cnn": the image baseline
    cell: str = "lstm"              # the recurrent cell: lstm (the point of the app), gru, rnn (tanh), irnn (ReLU,
                                    # identity recurrent weights): the comparison that shows why gates matter
    seq_mode: str = "rows"          # rows: 28 steps x 28 px; pixels: 784 x 1; permuted: pixels, fixed shuffle
    hidden_size: int = 128          # 128 units read a row well; larger is slower on a CPU for little gain
    num_layers: int = 1             # one layer trains far faster than two on a CPU and reaches 99% with onecycle
    dropout: float = 0.1            # between LSTM layers and before the head; light, the model is small
    bidirectional: bool = False     # off: the Draw page can then show the belief forming row by row
    forget_init: str = "auto"       # the memory gate's bias at the start: LSTM forget, GRU update (init_gate_biases)
    # optimisation
    optimizer: str = "adamw"        # decoupled weight decay; robust across learning rates
    lr: float = 5e-3                # peak rate of the onecycle schedule
    weight_decay: float = 1e-4      # mild regularisation for AdamW
    momentum: float = 0.9           # used by sgd and rmsprop only
    scheduler: str = "onecycle"     # warm-up then anneal: the fastest route to 99% in a few epochs
    batch_size: int = 128           # the CPU's sweet spot between samples/s and updates per epoch
    epochs: int = 15                # the default model reaches 99% within them (README: time to accuracy)
    patience: int = 5               # epochs without a better validation loss before stopping; 0 = never
    grad_clip: float = 1.0          # max gradient norm, guards LSTMs against exploding gradients; 0 = off
    # augmentation (training batches only, on the device)
    aug_rotate: float = 8.0         # max rotation in degrees; light jitter lifts test accuracy a little
    aug_translate: float = 0.08     # max shift as a fraction of the image side
    aug_scale: float = 0.08         # max relative zoom in or out
    aug_shear: float = 0.0          # max shear in degrees
    # runtime
    amp: str = "auto"               # auto: each GPU's fast precision, fp32 on a CPU; bf16: autocast (devices.amp_policy)
    seed: int = 0                   # seeds weights, shuffling and augmentation
    val_size: int = 5000            # held out of the 60k training set, fixed split, for early stopping
    limit_train: int = 0            # use only the first N training samples; 0 = all
    device: str = "auto"            # auto picks cuda, then mps, then cpu
    num_threads: int = 0            # CPU threads for torch; 0 = torch's default (one per core)
    log_every: int = 50             # batches between progress events

    def __post_init__(self) -> None:
        validate(self)

    # -- conversions -------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "TrainConfig":
        return from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return from_dict(data)

    # -- derived -----------------------------------------------------------------------------
    @property
    def seq_shape(self) -> tuple[int, int]:
        """(time steps, features per step) the LSTM reads."""
        steps = sequence_length(self.seq_mode)
        return steps, 784 // steps


def flag(name: str) -> str:
    """The command-line flag for a config field: `hidden_size` -> `--hidden-size`."""
    return "--" + name.replace("_", "-")


def sequence_length(seq_mode: str) -> int:
    """The time steps an LSTM reads an image in: 28 rows, or 784 pixels (in reading or permuted order)."""
    return 28 if seq_mode == "rows" else 784


# (low, high) for every number; the bounds are what the sliders and the CLI accept too
BOUNDS: dict[str, tuple[float, float]] = {
    "hidden_size": (1, 4096),
    "num_layers": (1, 8),
    "dropout": (0.0, 0.9),
    "lr": (1e-6, 10.0),
    "weight_decay": (0.0, 1.0),
    "momentum": (0.0, 0.999),
    "batch_size": (1, 8192),
    "epochs": (1, 1000),
    "patience": (0, 1000),
    "grad_clip": (0.0, 1000.0),
    "aug_rotate": (0.0, 180.0),
    "aug_translate": (0.0, 0.5),
    "aug_scale": (0.0, 0.5),
    "aug_shear": (0.0, 45.0),
    "seed": (0, 2**31 - 1),
    "val_size": (1, 30000),
    "limit_train": (0, 60000),
    "num_threads": (0, 1024),
    "log_every": (1, 100000),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ARCHS,
    "cell": CELLS,
    "seq_mode": SEQ_MODES,
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "amp": AMP_MODES,
    "forget_init": FORGET_INITS,
}
FIELD_TYPES: dict[str, type] = typing.get_type_hints(TrainConfig)
# What only a recurrent model (LSTM, GRU, RNN) reads: a CNN's config (arch cnn) that sets them would claim it had
# used them.
RECURRENT_ONLY = ("cell", "seq_mode", "hidden_size", "num_layers", "bidirectional", "forget_init")


def validate(cfg: TrainConfig) -> None:
    """Check every field; raise ConfigError with one clear message for the first problem."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kind = FIELD_TYPES[f.name]
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{f.name} must be a whole number, got {value!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(f"{f.name} must be a number, got {value!r}")
        elif kind is str and not isinstance(value, str):
            raise ConfigError(f"{f.name} must be text, got {value!r}")
        if f.name in BOUNDS:
            low, high = BOUNDS[f.name]
            if not low <= value <= high:
                raise ConfigError(f"{f.name} must be between {low:g} and {high:g}, got {value!r}")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ConfigError(f"{f.name} must be one of {', '.join(CHOICES[f.name])}; got {value!r}")
    if not DEVICE_PATTERN.match(cfg.device):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {cfg.device!r}")
    if 0 < cfg.limit_train < cfg.batch_size:
        raise ConfigError(f"limit_train ({cfg.limit_train}) must be at least batch_size ({cfg.batch_size})")
    if cfg.val_size + max(cfg.limit_train, cfg.batch_size) > 60000:
        raise ConfigError(f"val_size ({cfg.val_size}) leaves too few of the 60000 training samples")


def from_dict(data: Any) -> TrainConfig:
    """Build a config from plain values (JSON, TOML, CLI); unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of field names to values, got {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    # JSON has one number type: accept 3 for a float field, never 3.0 for an int field
    values = {k: float(v) if FIELD_TYPES[k] is float and type(v) is int else v for k, v in data.items()}
    return TrainConfig(**values)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML file as a dict, with one clear ConfigError for a missing or malformed file. Both
    formats refuse a key written twice (JSON alone would keep the last one silently) and nesting far beyond
    any config or search space (which would otherwise exhaust the parser's recursion)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ConfigError(f"config file {path} has the key {key!r} twice: keep one")
            seen.add(key)
        return dict(pairs)

    try:
        data = tomllib.loads(text) if kind == "TOML" else json.loads(text, object_pairs_hook=unique_keys)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config or a search space") from None
    except ValueError as exc:     # a decoding error, or an integer of thousands of digits
        repeated = toml_repeated_key(str(exc), text) if kind == "TOML" else None
        if repeated:
            raise ConfigError(f"config file {path} has the key {repeated!r} twice: keep one ({exc})") from None
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold an object of field names to values")
    return data


def toml_repeated_key(message: str, text: str) -> str | None:
    """The key that tomllib's "Cannot overwrite a value (at line N, column M)" points at, which the message
    leaves out (its other refusals of a repeated key name it already)."""
    found = re.fullmatch(r"Cannot overwrite a value \(at line (\d+), column \d+\)", message)
    lines = text.splitlines()
    if not found or not 0 < int(found[1]) <= len(lines):
        return None
    return lines[int(found[1]) - 1].split("=")[0].strip(" \t[]") or None


NO_AUGMENTATION = dict(aug_rotate=0.0, aug_translate=0.0, aug_scale=0.0, aug_shear=0.0)
PRESETS: dict[str, TrainConfig] = {
    # fast and accurate on a CPU: one 128-unit layer, onecycle, light augmentation; batches of 256 train
    # more samples/s on two cores than 128 and reach 99% as soon (README, `make bench --tta`)
    "default": TrainConfig(batch_size=256),
    # the popular MNIST-LSTM tutorial recipe
    "tutorial": TrainConfig(
        hidden_size=95, num_layers=3, dropout=0.47, optimizer="adam", lr=1e-3, weight_decay=5.36e-6,
        scheduler="none", batch_size=96, epochs=50, patience=10, grad_clip=0.0, **NO_AUGMENTATION),
    # bidirectional LSTM with a plateau schedule and geometric augmentation
    "bilstm": TrainConfig(
        hidden_size=128, num_layers=2, dropout=0.2, bidirectional=True, optimizer="adamw", lr=1e-3,
        weight_decay=1e-5, scheduler="plateau", batch_size=128, epochs=30, patience=6,
        aug_rotate=10.0, aug_translate=0.1, aug_scale=0.1, aug_shear=5.0),
    # sequential MNIST, one pixel per step: the long-memory benchmark of RNN papers (the model starts from
    # the chrono initialisation, models.init_gate_biases; Adam leaves the chance plateau sooner than RMSprop)
    "pixel": TrainConfig(
        seq_mode="pixels", hidden_size=128, num_layers=1, dropout=0.0, optimizer="adam", lr=2e-3,
        weight_decay=0.0, scheduler="cosine", batch_size=100, epochs=10, patience=5, grad_clip=1.0,
        **NO_AUGMENTATION),
    # the GRU and the plain RNN on rows, for the comparison that shows what gates buy (docs/performance.md).
    # The GRU takes the default's recipe. The RNN underfits it: without gates, augmented digits and a peak
    # rate of 5e-3 leave it below 97%; unaugmented at 2e-3 it learns faster and further
    "gru": TrainConfig(cell="gru", batch_size=256),
    "rnn": TrainConfig(cell="rnn", batch_size=256, lr=2e-3, **NO_AUGMENTATION),
    # the usual image model, for comparison
    "cnn": TrainConfig(
        arch="cnn", dropout=0.25, optimizer="adamw", lr=3e-3, weight_decay=1e-4, scheduler="onecycle",
        batch_size=128, epochs=8, patience=4),
    # the most accurate LSTM recipe: wide two-layer LSTM, augmentation, longer onecycle
    "best": TrainConfig(
        hidden_size=256, num_layers=2, dropout=0.25, optimizer="adamw", lr=2e-3, weight_decay=1e-4,
        scheduler="onecycle", batch_size=128, epochs=30, patience=30, grad_clip=1.0,
        aug_rotate=8.0, aug_translate=0.08, aug_scale=0.08, aug_shear=5.0),
}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
