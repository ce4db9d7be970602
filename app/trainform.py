"""The Train page's form without Streamlit: which widget asks for each TrainConfig field, the command line
that trains the config the widgets hold, and Start.

    ask = field_input("hidden_size", 128, devices)     # FieldInput("slider", "hidden size", {...})
    train_command(config, "default")                     # 'python -m lstm_core train --preset default ...'
    parameter_count(config)                              # 82186 for the default preset
    run, notice = start_training(config)                 # launched in the background
    runs, notice = start_comparison(config)              # the same config as an LSTM, a GRU and an RNN
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, fields
from functools import lru_cache

from lstm_core.config import BOUNDS, CHOICES, FIELD_TYPES, ConfigError, TrainConfig, flag, from_dict, preset
from lstm_core.jobs import describe_holder, device_holder, launch_training, training_devices
from lstm_core.models import build_model, count_parameters
from lstm_core.runs import Run, RunError, cell_name

# the fields shown above the Advanced expander, in this order; the others are in it, in TrainConfig's order
COMMON = ("arch", "cell", "seq_mode", "hidden_size", "num_layers", "dropout", "bidirectional", "optimizer", "lr",
          "batch_size", "epochs", "device")
ADVANCED = tuple(f.name for f in fields(TrainConfig) if f.name not in COMMON)
# slider ranges where they are narrower than what the config accepts (a wider current value widens them)
UI_RANGE = {"hidden_size": (1, 1024), "batch_size": (1, 1024), "epochs": (1, 200), "patience": (0, 100),
            "grad_clip": (0.0, 10.0), "aug_rotate": (0.0, 45.0), "aug_translate": (0.0, 0.3),
            "aug_scale": (0.0, 0.3), "aug_shear": (0.0, 30.0), "log_every": (1, 500),
            "num_threads": (0, os.cpu_count() or 1)}
STEPS = {"dropout": 0.01, "momentum": 0.001, "grad_clip": 0.1, "aug_rotate": 0.5, "aug_translate": 0.01,
         "aug_scale": 0.01, "aug_shear": 0.5}
LABELS = {"cell": "recurrent cell", "lr": "learning rate", "seq_mode": "sequence mode",
          "forget_init": "forget gate initialisation", "amp": "mixed precision (amp)",
          "limit_train": "limit training samples (0 = all)", "val_size": "validation samples",
          "num_threads": "CPU threads (0 = all cores)", "log_every": "progress every N batches"}
HELP = {"cell": "lstm: gates decide what to keep, forget and expose (the default); gru: two gates, fewer weights, "
                "often as good; rnn: a plain tanh RNN, no gates: its gradient vanishes over long sequences; "
                "irnn: ReLU with identity-initialised recurrent weights (Le et al. 2015), a plain RNN that can "
                "carry memory further",
        "seq_mode": "rows: 28 steps of 28 pixels; pixels: 784 steps of 1 pixel (sequential MNIST); "
                    "permuted: pixels in a fixed shuffled order",
        "patience": "epochs without a better validation loss before stopping (0 = never)",
        "amp": "auto: each GPU's fast precision (the Home page lists it: fp16 with loss scaling for LSTMs from "
               "Volta on, bf16 for the CNN from Ampere on), fp32 on a CPU; bf16: bf16 autocast (GPUs from Ampere "
               "on; cuDNN's LSTM then stays in fp32)",
        "grad_clip": "maximum gradient norm (0 = off)",
        "forget_init": "the memory gate's bias at the start: the LSTM's forget gate, the GRU's update gate (a "
                       "plain RNN has none). one: bias 1; chrono: memory spans up to the whole sequence; auto: "
                       "chrono for pixels, one for rows; torch: PyTorch's own, the gate half shut (on pixels, "
                       "watch the gradient reaching the first steps vanish)"}
# number inputs rather than sliders: a log-scale value, or a wide range where a slider could not aim
NUMBER_STEPS = {"lr": 1e-4, "weight_decay": 1e-5, "seed": 1, "val_size": 500, "limit_train": 500}


@dataclass(frozen=True)
class FieldInput:
    """How the Train page asks for one TrainConfig field; the widget's key is the field's name."""
    kind: str       # the Streamlit widget: "selectbox", "toggle", "number_input" or "slider"
    label: str
    args: dict      # the widget's other keyword arguments


def field_input(name: str, value, devices) -> FieldInput:
    """The widget for field `name`, whose current value is `value`; `devices`: available_devices()."""
    label = LABELS.get(name, name.replace("_", " "))
    kind = FIELD_TYPES[name]
    if name == "device":
        options = ["auto"] + [d.name for d in devices]
        labels = {"auto": "auto (best available)", **{d.name: f"{d.name} — {d.label}" for d in devices}}
        if value not in options:
            options.append(value)
        return FieldInput("selectbox", label, {"options": options, "format_func": lambda o: labels.get(
            o, f"{o} (not available here)")})
    if name in CHOICES:
        return FieldInput("selectbox", label, {"options": CHOICES[name], "help": HELP.get(name)})
    if kind is bool:
        return FieldInput("toggle", label, {"help": HELP.get(name)})
    low, high = BOUNDS[name]
    if name in NUMBER_STEPS:
        args = {"min_value": kind(low), "max_value": kind(high), "step": NUMBER_STEPS[name], "help": HELP.get(name)}
        return FieldInput("number_input", label, {**args, "format": "%.2e"} if kind is float else args)
    low, high = UI_RANGE.get(name, (low, high))
    return FieldInput("slider", label, {"min_value": kind(low), "max_value": max(kind(high), kind(value)),
                                        "step": 1 if kind is int else STEPS.get(name, 0.01), "help": HELP.get(name)})


def form_config(values: dict) -> tuple[TrainConfig | None, str | None]:
    """The config of the form's `values` (every field, by name), or None and why they make none."""
    try:
        return from_dict(values), None
    except ConfigError as exc:
        return None, str(exc)


@lru_cache(maxsize=64)
def parameter_count(config: TrainConfig) -> int:
    """The trainable parameters of the model this config builds (cached: the page asks on every rerun)."""
    return count_parameters(build_model(config))


def train_command(config: TrainConfig, preset_name: str) -> str:
    """The CLI command equal to `config`: the preset plus a flag for each field that differs from it."""
    base = preset(preset_name)
    args = ["python", "-m", "lstm_core", "train", "--preset", preset_name]
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if value == getattr(base, f.name):
            continue
        if isinstance(value, bool):         # the CLI's --name / --no-name pair (BooleanOptionalAction)
            args.append(flag(f.name) if value else flag(f"no_{f.name}"))
        else:
            args += [flag(f.name), f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(args)


def start_training(config: TrainConfig) -> tuple[Run, str]:
    """Launch a run of `config` in the background: the run, and a line saying whether it started or is
    queued, and behind what. The run holds its device from the launch on (jobs.launch_training), so the
    line stays true when another tab pressed Start at the same moment. ConfigError: no device here can
    train it; RunError: the saves folder cannot take a run."""
    devices = training_devices(config)
    run = launch_training(config)
    device = run.status().get("device")
    if device:
        return run, f"Started run {run.id} on {device}."
    holder = device_holder(devices[0])
    who = describe_holder(holder) if holder else "another process"
    if len(devices) == 1:
        return run, f"Run {run.id} is queued: {devices[0]} is busy with {who}; it starts when that ends."
    return run, (f"Run {run.id} is queued: {', '.join(devices)} are all busy ({devices[0]} with {who}); it "
                 "starts when one is free.")


# what the comparison trains: the two gated cells beside the plain RNN whose gradient vanishes
COMPARED_CELLS = ("lstm", "gru", "rnn")
COMPARE_HELP = ("Three runs of these settings, one per cell, everything else equal (the seed too): they queue on "
                "the device one after another, and the Runs page overlays their curves and the gradient reaching "
                "each time step. On pixels the plain RNN's gradient vanishes. Recurrent models only: a CNN has no "
                "cell.")


def cell_configs(config: TrainConfig) -> list[TrainConfig]:
    """`config` once per cell of COMPARED_CELLS, every other field equal; ConfigError for a CNN, which has
    no recurrent cell to compare."""
    if config.arch != "lstm":
        raise ConfigError(f"the comparison trains recurrent cells, and arch {config.arch} has none: choose arch lstm")
    return [config.replace(cell=cell) for cell in COMPARED_CELLS]


def start_comparison(config: TrainConfig) -> tuple[list[Run], str]:
    """Launch a run per cell (cell_configs) in the background, as Start does: the runs, and a line saying
    where each is. They differ only in their cell, so a ConfigError (a CNN, or no device here for them)
    comes before the first run exists. A RunError (the saves folder cannot take a run) after the first
    names the runs already launched, which train on."""
    configs = cell_configs(config)
    names = [cell_name(c.to_dict()) for c in configs]       # "LSTM", "GRU", "RNN" (BiLSTM, ... when bidirectional)
    runs: list[Run] = []
    for each, name in zip(configs, names):
        try:
            runs.append(launch_training(each))
        except (ConfigError, RunError) as exc:
            if not runs:
                raise
            launched = ", ".join(f"{run.id} ({started})" for run, started in zip(runs, names))
            raise RunError(f"only part of the comparison started: {launched} train on, but the {name} run could "
                           f"not start: {exc}") from exc
    where = [f"{run.id} ({name}) {'on ' + device if device else 'queued'}"
             for run, name, device in zip(runs, names, (run.status().get("device") for run in runs))]
    return runs, f"Comparing {', '.join(names)}: {'; '.join(where)}. A queued run starts when its device is free."
