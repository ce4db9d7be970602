"""Tuning: launch an Optuna study in the background, watch it live, open any study of a storage, and
inspect its trials: from their folders where they ran here, else from the study's artifact store.

Studies never run in this script: Launch starts `python -m lstm_core tune` detached, and a fragment
re-reads the study from its storage every few seconds while it runs. A click, a refresh or a second
user cannot stop or disturb it; only Stop does.
"""
from __future__ import annotations

import time
from functools import partial

import optuna
import pandas as pd
import streamlit as st

from lstm_core.config import ConfigError
from lstm_core.jobs import request_study_stop, running_studies, study_workers
from lstm_core.plots import STUDY_PLOTS, curves_figure, per_class_figure, study_figure
from lstm_core.report import study_report
from lstm_core.runs import Run, RunError, read_json_object
from lstm_core.storage import default_storage
from lstm_core.tune import DEFAULT_SPACE, SEARCH_RANGES, trial_rows, trials_csv
from app.pagekit import (ask, confusion, gradient_health, leave_legacy_navigation, metric_row, open_on_draw,
                         open_on_evaluate, open_on_train, remember, report_button, rerun_when_ended, restore, run_eval,
                         storage_at)
from app.runview import eval_metrics
from app.studyview import (TARGET, Plottable, absent_study, contour_note, contour_pair, draw_id, evaluated_trials,
                           first_trial, load_study, plottable, storage_studies, study_labels, study_metrics,
                           trial_id, trial_label)
from app.trialopen import STORAGE_HELP, STORE_HELP, open_trial
from app.tuneform import (LAUNCH, LAUNCH_INPUTS, STUDY_KEYS, first_pick, launch, log_scaled, picked_range, plan_study,
                          range_input)

leave_legacy_navigation()     # a fresh server's first request named this page: see app/pagekit.py

REFRESH_SECONDS = 2.0
# The launch form's widgets and their first values, kept in `tune_values` (pagekit.restore).
FORM = {**{f"tune_{key}": value for key, value in LAUNCH.items()}, "tune_params": list(DEFAULT_SPACE),
        **{f"tune_space_{name}": first_pick(name) for name in SEARCH_RANGES}}
# these get their remembered value from their widget's `value` (tuneform.range_input), not Session State
LOG_RANGES = {f"tune_space_{name}" for name in SEARCH_RANGES if log_scaled(name)}
OPENERS = {"train": open_on_train, "evaluate": open_on_evaluate, "draw": open_on_draw}   # request()'s page switches


# -- launch --------------------------------------------------------------------------------------
def launch_form_widgets() -> tuple[str, dict]:
    """The launch form: the study name and its search space (the other values are under FORM's keys)."""
    searched = st.pills("Searched parameters", list(SEARCH_RANGES), selection_mode="multi", key="tune_params",
                        help="every hyperparameter a study can search; the others keep the preset's value")
    left, middle, right = st.columns([1, 1, 2], gap="large")
    with left:
        name = st.text_input("Study name", key="tune_name", help="an existing name resumes that study")
    for key, field in LAUNCH_INPUTS.items():
        with left if key in STUDY_KEYS else middle:
            ask(f"tune_{key}", field)
    with right:     # numeric ranges in two columns; choices below them, where their pills have room
        numeric = [p for p in searched if SEARCH_RANGES[p]["type"] != "categorical"]
        ranges = st.columns(2, gap="medium")
        space = {}
        for i, param in enumerate(numeric):
            with ranges[i % 2]:
                space[param] = range_widget(param)
        space.update({p: range_widget(p) for p in searched if p not in numeric})
    remember("tune_values", [*FORM, "tune_name"])
    return name, space


def range_widget(name: str) -> dict:
    """The searched range of one parameter, in the search-space format of lstm_core.tune."""
    key = f"tune_space_{name}"
    return picked_range(name, ask(key, range_input(name, st.session_state.tune_values[key])))


def launch_form(storage: str | None, store: str) -> None:
    name, space = launch_form_widgets()
    try:
        plan = plan_study(name, {key: st.session_state[f"tune_{key}"] for key in LAUNCH}, space, storage or "", store)
    except (RunError, ConfigError) as exc:
        plan = None
        st.error(str(exc))
    st.button("Launch study", type="primary", icon=":material/rocket_launch:", on_click=request, args=("launch",),
              disabled=storage is None or plan is None)
    if st.session_state.pop("tune_request", None) == ("launch",) and plan is not None:
        try:
            launch(plan, storage_at(storage))
        except (RunError, ConfigError) as exc:
            st.error(str(exc))
            return
        st.session_state.update(tune_open=plan.name, tune_notice=(
            f"Started study {plan.name}: its first trial appears once the data is loaded."))
        st.rerun()


# -- the study, live ---------------------------------------------------------------------------
def plot(study: optuna.Study, kind: str, missing: str | None, params: list[str] | None = None) -> None:
    """One figure, or a note saying what it still needs: a young study is not an error."""
    if missing:
        st.info(missing)
        return
    try:
        fig = study_figure(study, kind, TARGET, params)
    except Exception as exc:  # noqa: BLE001 - optuna raises several kinds for studies it cannot plot yet
        st.info(f"Not drawn yet: {exc}")
        return
    st.plotly_chart(fig, key=f"tune_{kind}_plot")


def contour(study: optuna.Study, ready: Plottable) -> None:
    """The contour plot, under the picker of its two parameters once there are two to pick."""
    pair: list[str] = []
    if ready.contour:
        pair = contour_pair(study, ready, st.session_state.get("tune_contour"))
        if pair != st.session_state.get("tune_contour"):    # none yet, or another study's
            st.session_state.tune_contour = pair
        pair = st.multiselect("Contour parameters", ready.params, key="tune_contour", max_selections=2,
                              help="optuna puts them on the axes in alphabetical order")
    plot(study, "contour", contour_note(ready, pair), pair)


def plots(study: optuna.Study) -> None:
    ready = plottable(study)
    # the first four in a grid, bottom-aligned: the contour's parameter picker must not push its plot out of
    # line with its neighbour; the others full width: one axis, or one panel, per searched parameter
    grid = [cell for _ in range(2) for cell in st.columns(2, gap="medium", vertical_alignment="bottom")]
    for cell, kind in zip(grid, STUDY_PLOTS):
        with cell:
            if kind == "contour":
                contour(study, ready)
            else:
                plot(study, kind, ready.notes[kind])
    for kind in list(STUDY_PLOTS)[len(grid):]:
        plot(study, kind, ready.notes[kind])


def trial_table(study: optuna.Study, store: str) -> None:
    frame = pd.DataFrame(trial_rows(study))
    if frame.empty:
        st.caption("No trials yet.")
        return
    config = {"number": st.column_config.NumberColumn("Trial"), "state": "State",
              "value": st.column_config.NumberColumn(TARGET, format="%.4f"),
              "duration_s": st.column_config.NumberColumn("Duration", format="%.1f s"), "epochs": "Epochs",
              "test_accuracy": st.column_config.NumberColumn("test accuracy", format="%.4f"),
              **{c: c.removeprefix("param_") for c in frame.columns if c.startswith("param_")}}
    st.markdown("**Trials**")
    st.dataframe(frame, hide_index=True, column_order=[c for c in frame.columns if c != "run_dir"],
                 column_config=config, key="tune_table")
    with st.container(horizontal=True):
        st.download_button("Download CSV", trials_csv(study), file_name=f"{study.study_name}-trials.csv",
                           mime="text/csv", icon=":material/download:", on_click="ignore")
        report_button(partial(study_report, store=store.strip() or None), study, f"{study.study_name}-report.html",
                      "tune_report")


def study_header(name: str, live: bool) -> None:
    """Name, state and Stop (outside the live fragment, which only redraws what changes)."""
    head, stop = st.columns([5, 1], vertical_alignment="center")
    workers = study_workers(name)
    head.markdown(f"**Study `{name}`** · {'running' if live else 'finished'}"
                  + (f" · {len(workers)} worker(s)" if workers else ""))
    if live:
        stop.button("Stop", key="tune_stop", type="primary", width="stretch", on_click=stop_study, args=(name,),
                    help="every worker stops after its current batch; that trial is kept as pruned")


def stop_study(name: str) -> None:
    """Stop's callback (see `request` for why a callback)."""
    request_study_stop(name)
    st.toast(f"Stopping study {name}")


def read_study(url: str, name: str) -> tuple[optuna.Study | None, bool] | None:
    """load_study, or None after saying why a storage that went away cannot be read."""
    try:
        return load_study(storage_at(url), name)
    except Exception as exc:  # noqa: BLE001 - a storage that went away: say so, keep the page
        st.error(f"Cannot read study {name}: {type(exc).__name__}: {exc}")
        return None


def show_study(url: str, name: str, existed: bool, store: str) -> None:
    """The live view; re-runs itself every REFRESH_SECONDS while the study runs."""
    loaded = read_study(url, name)
    if loaded is None:
        return
    study, live = loaded
    # a study that just finished redraws the whole page: no more refreshes, fresh trial picker
    rerun_when_ended("tune_live", name, live)
    if study is not None and not existed:
        st.rerun()                      # a just-launched study now exists: the whole page gets its Stop and picker
    if study is None:
        level, line = absent_study(name, live)
        getattr(st, level)(line, icon=":material/hourglass_top:" if live else None)
        return
    metric_row(study_metrics(study))
    plots(study)
    trial_table(study, store)


# -- one trial -----------------------------------------------------------------------------------
def inspect_trial(study: optuna.Study, store: str) -> None:
    st.subheader("Trial")
    trials = evaluated_trials(study)
    if not trials:
        st.info("No trial has a test evaluation to open yet: a trial is evaluated when it ends, and one that ran "
                "on another machine opens here from the study's artifact store (`tune --artifacts STORE`).")
        return
    if st.session_state.get("tune_trial") not in trials:
        st.session_state.tune_trial = first_trial(trials)
    number = st.selectbox("Trial", list(trials), key="tune_trial", format_func=lambda n: trial_label(trials[n]))
    row = trials[number]
    run = open_trial(study, number, store)
    if run is None:
        return
    evaluation = run_eval(run.path) or {}
    if evaluation.get("confusion_matrix") is None:
        st.info(f"Trial {number} ended without a test evaluation.")
        return
    metric_row([*eval_metrics(evaluation, "test_accuracy", "macro_f1"),
                (TARGET, f"{row['value']:.2%}" if row["value"] is not None else "–"), ("epochs", row["epochs"])])
    left, right = st.columns(2, gap="medium")
    with left:
        confusion(evaluation["confusion_matrix"], "tune_normalize", "tune_trial_cm")
    right.plotly_chart(per_class_figure(evaluation["per_class"]), key="tune_trial_per_class")
    epochs = run.epochs()
    if epochs:
        st.plotly_chart(curves_figure(epochs), key="tune_trial_curves")
    gradient_health(run.path, read_json_object(run.config_path).get("seq_mode"), "tune_trial")
    trial_buttons(run)


def trial_buttons(run: Run) -> None:
    """Open the trial's folder (its own, or the copy downloaded from the store) on the other pages."""
    outside = "only trials under this app's saves folder are listed there"
    listed, draw_run = trial_id(run.path), draw_id(run.path)
    buttons = st.container(horizontal=True)
    buttons.button("Open in Train page", icon=":material/model_training:", on_click=request,
                   args=("train", str(run.path)))
    buttons.button("Open in Evaluate page", icon=":material/analytics:", disabled=listed is None, on_click=request,
                   args=("evaluate", listed), help=None if listed else outside)
    buttons.button("Use on Draw page", icon=":material/draw:", disabled=draw_run is None, on_click=request,
                   args=("draw", draw_run), help=None if draw_run else f"it has no best.pt, or {outside}")


def request(*action) -> None:
    """A button's click, kept for the next run to act on. While a study runs, the live fragment reruns
    every few seconds, and a click read from `if st.button(...)` is then lost now and again; a
    callback's is not."""
    st.session_state.tune_request = action


def tuning_page() -> None:
    restore("tune_values", {**FORM, "tune_storage": default_storage(), "tune_artifacts": "",
                            "tune_name": time.strftime("study-%Y%m%d-%H%M")}, skip=LOG_RANGES)
    action, *args = st.session_state.get("tune_request") or (None,)
    if action in OPENERS:
        del st.session_state.tune_request
        OPENERS[action](*args)
    st.title("Tuning")
    notice = st.session_state.pop("tune_notice", None)
    if notice:
        st.success(notice)
    where, store_field, which = st.columns([3, 2, 2])
    url = where.text_input("Study storage", key="tune_storage", help=STORAGE_HELP)
    store = store_field.text_input("Artifact store", key="tune_artifacts",
                                   help=f"Where Launch uploads every trial's results (nowhere when empty), for any "
                                        f"machine to open them. {STORE_HELP}")
    remember("tune_values", ["tune_storage", "tune_artifacts"])
    try:
        summaries = storage_studies(url)
    except ConfigError as exc:
        st.error(str(exc))
        summaries = None
    with st.expander("Launch a study", expanded=not summaries, icon=":material/rocket_launch:"):
        launch_form(url if summaries is not None else None, store)
    if summaries is None:
        return
    labels = study_labels(summaries, running_studies(url))
    if not labels:
        which.selectbox("Study", [], disabled=True)
        st.info("No studies in this storage yet: launch one above, or from a terminal with "
                "`python -m lstm_core tune --study NAME`.")
        return
    wanted = st.session_state.pop("tune_open", None)   # a study just launched from this page
    if wanted in labels or st.session_state.get("tune_study") not in labels:
        st.session_state.tune_study = wanted if wanted in labels else next(iter(labels))
    name = which.selectbox("Study", list(labels), key="tune_study", format_func=labels.get)
    remember("tune_values", ["tune_study"])
    loaded = read_study(url, name)
    if loaded is None:
        return
    study, live = loaded
    if study is not None:
        study_header(name, live)
    st.fragment(show_study, run_every=REFRESH_SECONDS if live else None)(url, name, study is not None, store)
    if study is not None:
        inspect_trial(study, store)


tuning_page()
