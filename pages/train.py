"""Train: hyperparameters from widgets, training in a background process, live curves, stop, results.

Training never runs in this script: Start launches `python -m lstm_core train` as a detached process
writing into its run directory, and a fragment re-reads that directory every second. A click, a page
switch, a refresh, a second user or a server restart cannot stop or disturb a run.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import fields

import streamlit as st

from lstm_core.config import BOUNDS, CHOICES, PRESETS, ConfigError, TrainConfig, from_dict, preset
from lstm_core.devices import available_devices
from lstm_core.jobs import (describe_holder, device_holder, launch_resume, launch_training, pick_device, request_stop,
                            training_devices)
from lstm_core.plots import confusion_figure, curves_figure, running_loss_figure
from lstm_core.runs import LIVE_STATES, RunError, format_seconds, list_runs, open_run
from pagekit import leave_legacy_navigation

leave_legacy_navigation()     # a fresh server's first request named this page: see pagekit.py

REFRESH_SECONDS = 1.0
COMMON = ("arch", "seq_mode", "hidden_size", "num_layers", "dropout", "bidirectional", "optimizer", "lr",
          "batch_size", "epochs", "device")
# slider ranges where they are narrower than what the config accepts (a wider current value widens them)
UI_RANGE = {"hidden_size": (1, 1024), "batch_size": (1, 1024), "epochs": (1, 200), "patience": (0, 100),
            "grad_clip": (0.0, 10.0), "aug_rotate": (0.0, 45.0), "aug_translate": (0.0, 0.3),
            "aug_scale": (0.0, 0.3), "aug_shear": (0.0, 30.0), "log_every": (1, 500),
            "num_threads": (0, os.cpu_count() or 1)}
STEPS = {"dropout": 0.01, "momentum": 0.001, "grad_clip": 0.1, "aug_rotate": 0.5, "aug_translate": 0.01,
         "aug_scale": 0.01, "aug_shear": 0.5}
LABELS = {"lr": "learning rate", "seq_mode": "sequence mode", "amp": "mixed precision (amp)",
          "limit_train": "limit training samples (0 = all)", "val_size": "validation samples",
          "num_threads": "CPU threads (0 = all cores)", "log_every": "progress every N batches"}
HELP = {"seq_mode": "rows: 28 steps of 28 pixels; pixels: 784 steps of 1 pixel (sequential MNIST); "
                    "permuted: pixels in a fixed shuffled order",
        "patience": "epochs without a better validation loss before stopping (0 = never)",
        "amp": "auto: each GPU's fast precision (the Home page lists it: fp16 with loss scaling for LSTMs from "
               "Volta on, bf16 for the CNN from Ampere on), fp32 on a CPU; bf16: bf16 autocast (GPUs from Ampere "
               "on; cuDNN's LSTM then stays in fp32)",
        "grad_clip": "maximum gradient norm (0 = off)"}


def init_state() -> None:
    """Widget values live under their config field names; `train_values` keeps them across page
    switches (Streamlit forgets the state of widgets that were not drawn)."""
    saved = st.session_state.setdefault("train_values", preset("default").to_dict())
    for name, value in saved.items():
        if name not in st.session_state:
            st.session_state[name] = value
    st.session_state.setdefault("preset", "default")


def apply_preset() -> None:
    for name, value in preset(st.session_state["preset"]).to_dict().items():
        st.session_state[name] = value


def widget(name: str, devices) -> None:
    kind = {f.name: f.type for f in fields(TrainConfig)}[name]
    label = LABELS.get(name, name.replace("_", " "))
    value = st.session_state[name]
    if name == "device":
        options = ["auto"] + [d.name for d in devices]
        labels = {"auto": "auto (best available)", **{d.name: f"{d.name} — {d.label}" for d in devices}}
        if value not in options:
            options.append(value)
        st.selectbox(label, options, key=name, format_func=lambda o: labels.get(o, f"{o} (not available here)"))
    elif name in CHOICES:
        st.selectbox(label, CHOICES[name], key=name, help=HELP.get(name))
    elif kind in ("bool", bool):
        st.toggle(label, key=name, help=HELP.get(name))
    elif name in ("lr", "weight_decay"):
        low, high = BOUNDS[name]
        st.number_input(label, min_value=float(low), max_value=float(high), step=1e-4 if name == "lr" else 1e-5,
                        format="%.2e", key=name, help=HELP.get(name))
    elif name in ("seed", "val_size", "limit_train"):
        low, high = BOUNDS[name]
        st.number_input(label, min_value=int(low), max_value=int(high), step=1 if name == "seed" else 500,
                        key=name, help=HELP.get(name))
    else:
        low, high = UI_RANGE.get(name, BOUNDS[name])
        integer = kind in ("int", int)
        cast = int if integer else float
        high = max(cast(high), cast(value))
        st.slider(label, cast(low), high, key=name, step=1 if integer else STEPS.get(name, 0.01), help=HELP.get(name))


def config_form(devices) -> TrainConfig | None:
    st.selectbox("Preset", list(PRESETS), key="preset", on_change=apply_preset,
                 help="fills every widget with the preset's values")
    for name in COMMON:
        widget(name, devices)
    with st.expander("Advanced"):
        for f in fields(TrainConfig):
            if f.name not in COMMON:
                widget(f.name, devices)
    values = {f.name: st.session_state[f.name] for f in fields(TrainConfig)}
    st.session_state["train_values"] = values
    try:
        return from_dict(values)
    except ConfigError as exc:
        st.error(str(exc))
        return None


def command_for(config: TrainConfig, preset_name: str) -> str:
    """The CLI command equivalent to the widgets: the preset plus the flags that differ from it."""
    base = preset(preset_name)
    args = ["python", "-m", "lstm_core", "train", "--preset", preset_name]
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if value == getattr(base, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(args)


def start(config: TrainConfig) -> None:
    try:
        device = pick_device(training_devices(config))
    except ConfigError as exc:
        st.error(str(exc))
        return
    holder = device_holder(device)
    run = launch_training(config)
    st.session_state["train_run"] = run.id
    st.session_state["train_follow"] = True
    if holder:
        st.session_state["train_notice"] = (f"{device} is busy with {describe_holder(holder)}: run {run.id} is "
                                            "queued and starts when it ends.")
    else:
        st.session_state["train_notice"] = f"Started run {run.id}."


def default_run(runs: list[dict]) -> str | None:
    """The run to show: the one started here, else the newest live run, else the newest run."""
    ids = [r["id"] for r in runs]
    chosen = st.session_state.get("train_run")
    if chosen in ids:
        return chosen
    live = [r["id"] for r in runs if r["state"] in LIVE_STATES]
    return (live or ids or [None])[0]


def progress_text(status: dict, batch: dict | None, epochs: list[dict], config: TrainConfig) -> tuple[float, str]:
    if status.get("state") == "queued":
        waiting = status.get("waiting_for")
        return 0.0, f"queued{' behind run ' + waiting if waiting else ''}: loading data and waiting for the device"
    if batch is None:
        return 0.0, "starting: loading data"
    fraction = batch["step"] / batch["steps"]
    done_epochs = len(epochs)
    if epochs and epochs[-1]["time"] > batch["time"]:      # an epoch just ended: show its end
        fraction = done_epochs / config.epochs
    return min(fraction, 1.0), (f"epoch {batch['epoch']}/{config.epochs} · batch {batch['batch']}/{batch['batches']}"
                                f" · ETA {format_seconds(batch['eta'])} · {batch['samples_per_s']:,.0f} samples/s"
                                f" · lr {batch['lr']:.2e}")


def show_run(run_id: str) -> None:
    """The live view of one run; re-runs itself every second while the run is queued or running."""
    try:
        run = open_run(run_id)
        status, metrics, config = run.status(), run.metrics(), run.config()
    except (RunError, ConfigError, OSError) as exc:
        st.error(f"Cannot read run {run_id}: {exc}")
        return
    state = status.get("state", "unknown")
    live = state in LIVE_STATES
    if st.session_state.get("train_view_live", {}).get(run_id) and not live:
        st.session_state["train_view_live"][run_id] = False
        st.rerun()                        # the run just ended: redraw the whole page (results, Start button)
    st.session_state.setdefault("train_view_live", {})[run_id] = live

    epochs = [r for r in metrics if r.get("event") == "epoch"]
    batches = [r for r in metrics if r.get("event") == "batch"]
    head, stop_col = st.columns([5, 1])
    head.markdown(f"**Run `{run.id}`** · state **{state}** · {status.get('device') or config.device}")
    # callbacks, not `if st.button(...)`: a click must not be lost to the fragment's timed rerun
    if live:
        stop_col.button("Stop", key=f"stop_{run.id}", type="primary", use_container_width=True,
                        on_click=stop_run, args=(run,))
    if state in ("cancelled", "interrupted", "failed") and run.last_path.exists():
        stop_col.button("Resume", key=f"resume_{run.id}", use_container_width=True, on_click=resume_run,
                        args=(run,), help="continue from the end of the last finished epoch")
    if st.session_state.get("train_error"):
        st.error(st.session_state.pop("train_error"))
    if state == "failed":
        st.error(f"Training failed: {status.get('error')}")
    elif state == "interrupted":
        st.warning(f"The training process ended without finishing: {status.get('error') or 'killed or crashed'}. "
                   "Its last checkpoint is kept.")
    fraction, text = progress_text(status, batches[-1] if batches else None, epochs, config)
    if live:
        st.progress(fraction, text=text)
    if epochs:
        last = epochs[-1]
        cols = st.columns(4)
        cols[0].metric("epoch", f"{last['epoch']}/{config.epochs}")
        cols[1].metric("val accuracy", f"{last['val_accuracy']:.2%}")
        cols[2].metric("val loss", f"{last['val_loss']:.4f}")
        cols[3].metric("best val accuracy", f"{max(r['val_accuracy'] for r in epochs):.2%}")
        st.plotly_chart(curves_figure(epochs), key=f"curves_{run.id}")
    if batches:
        st.plotly_chart(running_loss_figure(batches), key=f"running_{run.id}")
    if not live:
        show_results(run)


def stop_run(run) -> None:
    request_stop(run)
    st.toast(f"Stopping run {run.id} after the current batch")


def resume_run(run) -> None:
    try:
        launch_resume(run)
    except RunError as exc:
        st.session_state["train_error"] = str(exc)


def show_results(run) -> None:
    evaluation = run.eval()
    if not evaluation or evaluation.get("test_accuracy") is None:
        return
    st.subheader("Test results")
    cols = st.columns(3)
    cols[0].metric("test accuracy", f"{evaluation['test_accuracy']:.2%}")
    cols[1].metric("macro F1", f"{evaluation['macro_f1']:.4f}")
    cols[2].metric("best epoch", evaluation.get("best_epoch"))
    normalize = st.toggle("Row-normalized", key=f"normalize_{run.id}")
    st.plotly_chart(confusion_figure(evaluation["confusion_matrix"], normalize=normalize), key=f"cm_{run.id}")
    st.caption("Test set, with the best weights (chosen on validation loss). Rows are true digits.")
    if st.button("Use this model on the Draw page", key=f"draw_{run.id}", icon=":material/draw:"):
        st.session_state["draw_run"] = run.id
        st.switch_page("pages/draw.py")


def train_page() -> None:
    init_state()
    st.title("Train")
    devices = available_devices()
    left, right = st.columns([1, 2], gap="large")
    with left:
        config = config_form(devices)
        with st.expander("Copy as command"):
            if config is not None:
                st.code(command_for(config, st.session_state["preset"]), language="bash")
        if st.button("Start training", type="primary", disabled=config is None, use_container_width=True):
            start(config)
    with right:
        notice = st.session_state.pop("train_notice", None)
        if notice:
            st.info(notice)
        try:
            runs = list_runs()
        except OSError as exc:
            st.error(f"Cannot read the saved runs: {exc}")
            return
        if not runs:
            st.info("No runs yet: set the hyperparameters on the left and press **Start training**.")
            return
        labels = {r["id"]: f"{r['id']} · {r['state']}" for r in runs}
        # the picker keeps the user's choice; a run started here (or a vanished choice) moves it
        if st.session_state.get("train_pick") not in labels or st.session_state.pop("train_follow", False):
            st.session_state["train_pick"] = default_run(runs)
        chosen = st.selectbox("Run", list(labels), key="train_pick", format_func=labels.get)
        st.session_state["train_run"] = chosen
        live = next(r["state"] for r in runs if r["id"] == chosen) in LIVE_STATES
        st.fragment(show_run, run_every=REFRESH_SECONDS if live else None)(chosen)


train_page()
