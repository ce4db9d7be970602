"""Train: hyperparameters from widgets, training in a background process, live curves, stop, results.

Training never runs in this script: Start launches `python -m lstm_core train` as a detached process
writing into its run directory, and a fragment re-reads that directory every second. A click, a page
switch, a refresh, a second user or a server restart cannot stop or disturb a run.
"""
from __future__ import annotations

from dataclasses import fields

import streamlit as st

from lstm_core.config import PRESETS, ConfigError, TrainConfig, preset
from lstm_core.devices import available_devices
from lstm_core.jobs import launch_resume, request_stop
from lstm_core.plots import curves_figure, gradient_figure, running_loss_figure, step_gradient_figure
from lstm_core.runs import LIVE_STATES, RunError, describe_model, list_runs, open_run
from lstm_core.train import PROBE_SAMPLES
from app.pagekit import (ask, confusion, leave_legacy_navigation, metric_row, open_on_draw, open_on_runs,
                         rerun_when_ended, restore, saved)
from app.runview import batch_progress, default_run, ended_note, epoch_metrics, eval_metrics
from app.trainform import (ADVANCED, COMMON, COMPARE_HELP, field_input, form_config, parameter_count, start_comparison,
                           start_training, train_command)

leave_legacy_navigation()     # a fresh server's first request named this page: see app/pagekit.py

REFRESH_SECONDS = 1.0


def apply_preset() -> None:
    st.session_state.update(preset(st.session_state["preset"]).to_dict())


def config_form(devices) -> TrainConfig | None:
    st.selectbox("Preset", list(PRESETS), key="preset", on_change=apply_preset,
                 help="fills every widget with the preset's values")
    for name in COMMON:
        ask(name, field_input(name, st.session_state[name], devices))
    with st.expander("Advanced"):
        for name in ADVANCED:
            ask(name, field_input(name, st.session_state[name], devices))
    values = st.session_state["train_values"] = {f.name: st.session_state[f.name] for f in fields(TrainConfig)}
    config, problem = form_config(values)
    if problem:
        st.error(problem)
    return config


def start(config: TrainConfig) -> None:
    try:
        run, notice = start_training(config)
    except (ConfigError, RunError) as exc:      # no device for it, or a saves folder that cannot take a run
        st.error(str(exc))
        return
    st.session_state.update(train_run=run.id, train_follow=True, train_notice=notice)


def compare(config: TrainConfig) -> None:
    """The comparison's click, as a callback: a click read from `if st.button(...)` is lost to a rerun that
    comes before the button is drawn (leave_legacy_navigation's), a callback's is not. The script run that
    follows opens the Runs page on the runs it leaves in Session State."""
    try:
        runs, notice = start_comparison(config)
    except (ConfigError, RunError) as exc:      # a CNN, no device for them, or a saves folder that cannot take them
        st.session_state["compare_error"] = str(exc)
        return
    st.session_state.update(train_run=runs[0].id, train_follow=True,
                            train_compared=([run.id for run in runs], notice))


STEPS_NOTE = (f"**The gradient reaching each time step**, measured on the same {PROBE_SAMPLES} validation images "
              "at every progress record (faint: early in training; dark: now). An LSTM learns from a step only "
              "as far as the gradient reaches it: flat lines mean every row or pixel counts; lines falling by "
              "orders of magnitude towards step 1 are vanishing gradients. Try the `pixel` preset with the forget "
              "gate initialisation `torch` (Advanced), then with `chrono`.")


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
    rerun_when_ended("train_view_live", run_id, live)

    epochs = [r for r in metrics if r.get("event") == "epoch"]
    batches = [r for r in metrics if r.get("event") == "batch"]
    head, stop_col = st.columns([5, 1])
    head.markdown(f"**Run `{run.id}`** · state **{state}** · {status.get('device') or config.device}")
    # callbacks, not `if st.button(...)`: a click must not be lost to the fragment's timed rerun
    if live:
        stop_col.button("Stop", key=f"stop_{run.id}", type="primary", width="stretch",
                        on_click=stop_run, args=(run,))
    if state in ("cancelled", "interrupted", "failed") and run.last_path.exists():
        stop_col.button("Resume", key=f"resume_{run.id}", width="stretch", on_click=resume_run,
                        args=(run,), help="continue from the end of the last finished epoch")
    if st.session_state.get("train_error"):
        st.error(st.session_state.pop("train_error"))
    note = ended_note(status)
    if note:
        getattr(st, note[0])(note[1])
    fraction, text = batch_progress(status, batches[-1] if batches else None, epochs, config.epochs)
    if live:
        st.progress(fraction, text=text)
    if epochs:
        metric_row(epoch_metrics(epochs, config.epochs))
        st.plotly_chart(curves_figure(epochs), key=f"curves_{run.id}")
    if batches:
        loss_col, grad_col = st.columns(2)
        loss_col.plotly_chart(running_loss_figure(batches), key=f"running_{run.id}")
        if any("grad_norm" in b for b in batches):
            grad_col.plotly_chart(gradient_figure(batches), key=f"gradients_{run.id}")
        if any(b.get("step_grad_norms") for b in batches):
            steps_col, about = st.columns(2, vertical_alignment="center")
            steps_col.plotly_chart(step_gradient_figure(batches, config.seq_shape[0]), key=f"steps_{run.id}")
            about.caption(STEPS_NOTE)
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
    metric_row([*eval_metrics(evaluation, "test_accuracy", "macro_f1"), ("best epoch", evaluation.get("best_epoch"))])
    confusion(evaluation["confusion_matrix"], f"normalize_{run.id}", f"cm_{run.id}")
    st.caption("Test set, with the best weights (chosen on validation loss). Rows are true digits.")
    if st.button("Use this model on the Draw page", key=f"draw_{run.id}", icon=":material/draw:"):
        open_on_draw(run.id)


def train_page() -> None:
    restore("train_values", preset("default").to_dict())     # the widgets' keys are the config's field names
    st.session_state.setdefault("preset", "default")
    compared = st.session_state.pop("train_compared", None)
    if compared:
        open_on_runs(*compared)
    st.title("Train")
    devices = available_devices()
    left, right = st.columns([1, 2], gap="large")
    with left:
        # the primary action first, in view on a laptop screen; it reads the form drawn below it
        start_slot = st.container()
        config = config_form(devices)
        if config is not None:
            st.caption(f"{parameter_count(config):,} trainable parameters")
            with st.expander("Copy as command"):
                st.code(train_command(config, st.session_state["preset"]), language="bash")
        if start_slot.button("Start training", type="primary", disabled=config is None, width="stretch"):
            start(config)
        start_slot.button("Compare LSTM, GRU and RNN", disabled=config is None or config.arch != "lstm",
                          width="stretch", icon=":material/compare_arrows:", help=COMPARE_HELP, on_click=compare,
                          args=(config,))
        if st.session_state.get("compare_error"):
            start_slot.error(st.session_state.pop("compare_error"))
    with right:
        notice = st.session_state.pop("train_notice", None)
        if notice:
            st.info(notice)
        runs = saved(list_runs)
        if runs is None:
            return
        if not runs:
            st.info("No runs yet: set the hyperparameters on the left and press **Start training**.")
            return
        # no state in the label: the picker is drawn once per page run; the live view below says the state
        labels = {r["id"]: f"{r['id']} · {describe_model(r)}" for r in runs}
        # the picker keeps the user's choice; a run started here (or a vanished choice) moves it
        if st.session_state.get("train_pick") not in labels or st.session_state.pop("train_follow", False):
            st.session_state["train_pick"] = default_run(runs, st.session_state.get("train_run"))
        chosen = st.selectbox("Run", list(labels), key="train_pick", format_func=labels.get)
        st.session_state["train_run"] = chosen
        live = next(r["state"] for r in runs if r["id"] == chosen) in LIVE_STATES
        st.fragment(show_run, run_every=REFRESH_SECONDS if live else None)(chosen)


train_page()
