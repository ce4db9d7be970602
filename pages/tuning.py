"""Tuning: launch an Optuna study in the background, watch it live, open any study of a storage, and
inspect its trials.

Studies never run in this script: Launch starts `python -m lstm_core tune` detached, and a fragment
re-reads the study from its storage every few seconds while it runs. A click, a refresh or a second
user cannot stop or disturb it; only Stop does.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import optuna
import optuna.visualization as ov
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from lstm_core.config import BOUNDS, CHOICES, FIELD_TYPES, PRESETS, ConfigError, preset
from lstm_core.plots import confusion_figure, per_class_figure
from lstm_core.runs import RunError, atomic_write_json, check_saves, run_at, safe_name, saves_root
from lstm_core.tune import (DEFAULT_SPACE, PRUNERS, SAMPLERS, check_space, check_writable, default_storage, launch_study,
                            make_storage, request_study_stop, state_counts, study_dir, study_summaries, trial_rows,
                            worker_pids)
from pagekit import leave_legacy_navigation

leave_legacy_navigation()     # a fresh server's first request named this page: see pagekit.py

REFRESH_SECONDS = 2.0
TARGET = "val accuracy"     # what every trial's value is (the best validation accuracy of its epochs)
PLOT_HEIGHT = 380
# Slider extents of the searched ranges: wider than the default space, narrower than what a config
# accepts (BOUNDS), so that a slider can still aim. Fields not listed fall back to BOUNDS.
SPACE_LIMITS = {"lr": (1e-6, 1.0), "weight_decay": (1e-8, 1e-1), "hidden_size": (8, 512), "num_layers": (1, 4),
                "dropout": (0.0, 0.8), "batch_size": (64, 1024)}
FLOAT_STEP = 0.05
# Launch-form widgets and their first values; kept in `tune_values` across page switches (Streamlit
# forgets the state of widgets that were not drawn).
FORM = {"tune_trials": 20, "tune_timeout": 0, "tune_workers": 1, "tune_sampler": "tpe", "tune_pruner": "median",
        "tune_preset": "default", "tune_epochs": 3, "tune_limit_train": 10000, "tune_val_size": 5000,
        "tune_params": list(DEFAULT_SPACE),
        **{f"tune_space_{name}": list(spec["choices"]) if spec["type"] == "categorical"
           else (spec["low"], spec["high"]) for name, spec in DEFAULT_SPACE.items()}}
# A range select_slider learns that it is a range from its `value` only, not from Session State: these
# get their remembered value that way instead.
LOG_RANGES = {f"tune_space_{name}" for name, spec in DEFAULT_SPACE.items() if spec["type"] == "float" and spec.get("log")}


def init_state() -> None:
    saved = st.session_state.setdefault("tune_values", {
        **FORM, "tune_storage": default_storage(), "tune_name": time.strftime("study-%Y%m%d-%H%M")})
    for key, value in saved.items():
        if key not in st.session_state and key not in LOG_RANGES:
            st.session_state[key] = value
    if "tune_procs" not in st.session_state:
        st.session_state.tune_procs = {}     # study name -> Popen of the process launched from this session
    if "tune_live" not in st.session_state:
        st.session_state.tune_live = {}      # study name -> live at the last look (to notice its end)


def remember(*keys: str) -> None:
    st.session_state.tune_values.update({k: st.session_state[k] for k in keys if k in st.session_state})


@st.cache_resource(show_spinner=False, max_entries=8)
def storage_at(url: str) -> optuna.storages.BaseStorage:
    """One storage per URL: opening one checks its schema, too slow to repeat every refresh."""
    return make_storage(url, heartbeat=False)   # this page only reads; the workers keep the heartbeats


def launched(name: str):
    """The study process started from this session, if it is still running."""
    proc = st.session_state.tune_procs.get(name)
    return proc if proc is not None and proc.poll() is None else None


def log_tail(name: str, lines: int = 5) -> str:
    try:
        return "\n".join((study_dir(name) / "tune.log").read_text(errors="replace").splitlines()[-lines:])
    except (OSError, RunError):
        return ""


# -- launch --------------------------------------------------------------------------------------
def log_grid(low: float, high: float) -> list[float]:
    """1-2-5 steps per decade: the values a log-scaled range is picked from."""
    grid = {float(f"{m}e{e}") for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for m in (1, 2, 5)}
    return sorted(v for v in grid if low <= v <= high)


def range_widget(name: str, spec: dict) -> dict:
    """The searched range of one parameter, in the search-space format of lstm_core.tune."""
    key = f"tune_space_{name}"
    if spec["type"] == "categorical":
        options = list(CHOICES.get(name) or ([False, True] if FIELD_TYPES[name] is bool else spec["choices"]))
        return {"type": "categorical", "choices": st.pills(name, options, selection_mode="multi", key=key,
                                                             format_func=str)}
    low, high = SPACE_LIMITS.get(name, BOUNDS[name])
    if spec["type"] == "float" and spec.get("log"):
        remembered = tuple(st.session_state.tune_values[key])
        grid = sorted({*log_grid(low, high), *remembered})
        picked = st.select_slider(name, grid, value=remembered, key=key, format_func=lambda v: f"{v:g}")
        return {"type": "float", "low": picked[0], "high": picked[1], "log": True}
    if spec["type"] == "int":
        step = int(spec.get("step", 1))
        picked = st.slider(name, int(low), int(high), key=key, step=step)
        return {"type": "int", "low": picked[0], "high": picked[1], **({"step": step} if step > 1 else {})}
    picked = st.slider(name, float(low), float(high), key=key, step=FLOAT_STEP)
    return {"type": "float", "low": round(picked[0], 4), "high": round(picked[1], 4)}


def launch_plan(storage: str) -> tuple[list[str] | None, dict | None, str | None]:
    """The launch form: (CLI arguments, search space, None), or (None, None, what is wrong)."""
    searched = st.pills("Searched parameters", list(DEFAULT_SPACE), selection_mode="multi", key="tune_params",
                        help="the others keep the preset's value")
    left, middle, right = st.columns([1, 1, 2], gap="large")
    with left:
        name = st.text_input("Study name", key="tune_name", help="an existing name resumes that study")
        st.number_input("Trials", min_value=1, max_value=10000, key="tune_trials",
                        help="run until the study has this many finished trials (complete or pruned)")
        st.number_input("Timeout (s, 0 = none)", min_value=0, step=60, key="tune_timeout",
                        help="start no trial after this many seconds")
        st.number_input("Workers", min_value=1, max_value=max(1, os.cpu_count() or 1), key="tune_workers",
                        help="processes sharing the study; they share the CPU cores too")
        st.selectbox("Sampler", SAMPLERS, key="tune_sampler")
        st.selectbox("Pruner", PRUNERS, key="tune_pruner", help="stops hopeless trials after an epoch")
    with middle:
        st.selectbox("Preset", list(PRESETS), key="tune_preset", help="the values of every parameter not searched")
        st.number_input("epochs", min_value=1, max_value=1000, key="tune_epochs")
        st.number_input("limit training samples (0 = all)", min_value=0, max_value=60000, step=1000,
                        key="tune_limit_train")
        st.number_input("validation samples", min_value=1, max_value=30000, step=500, key="tune_val_size")
    with right:     # numeric ranges in two columns; choices below them, where their pills have room
        numeric = [p for p in searched if DEFAULT_SPACE[p]["type"] != "categorical"]
        ranges = st.columns(2, gap="medium")
        space = {}
        for i, param in enumerate(numeric):
            with ranges[i % 2]:
                space[param] = range_widget(param, DEFAULT_SPACE[param])
        space.update({p: range_widget(p, DEFAULT_SPACE[p]) for p in searched if p not in numeric})
    remember(*FORM, "tune_name", *(f"tune_space_{p}" for p in DEFAULT_SPACE))
    try:
        safe_name(name, "study name")
        base = preset(st.session_state.tune_preset).replace(
            epochs=st.session_state.tune_epochs, limit_train=st.session_state.tune_limit_train,
            val_size=st.session_state.tune_val_size)
        check_space(space, base)
    except (RunError, ConfigError) as exc:
        return None, None, str(exc)
    if worker_pids(name):
        return None, None, f"Study {name} is running: stop it first, or pick another name."
    args = ["--study", name, "--trials", str(st.session_state.tune_trials),
            "--workers", str(st.session_state.tune_workers), "--storage", storage,
            "--sampler", st.session_state.tune_sampler, "--pruner", st.session_state.tune_pruner,
            "--space", str(study_dir(name) / "space.json"), "--preset", st.session_state.tune_preset,
            "--epochs", str(base.epochs), "--limit-train", str(base.limit_train), "--val-size", str(base.val_size)]
    if st.session_state.tune_timeout:
        args += ["--timeout", str(st.session_state.tune_timeout)]
    return args, space, None


def launch_form(storage: str | None) -> None:
    args, space, problem = launch_plan(storage or "")
    if problem:
        st.error(problem)
    st.button("Launch study", type="primary", icon=":material/rocket_launch:", on_click=request, args=("launch",),
              disabled=storage is None or args is None)
    if st.session_state.pop("tune_request", None) == ("launch",) and args is not None:
        name = st.session_state.tune_name
        try:        # at the click, not every refresh: the probe writes, and running workers write too
            check_saves()
            check_writable(storage_at(storage), storage)
        except (RunError, ConfigError) as exc:
            st.error(str(exc))
            return
        folder = study_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "space.json", space)
        st.session_state.tune_procs[name] = launch_study(args, name)
        st.session_state.tune_open = name
        st.session_state.tune_notice = f"Started study {name}: its first trial appears once the data is loaded."
        st.rerun()


# -- the study, live ---------------------------------------------------------------------------
def load(url: str, name: str) -> tuple[optuna.Study | None, bool]:
    """The study (None before a just-launched one exists) and whether it is running."""
    try:
        study = optuna.load_study(study_name=name, storage=storage_at(url))
    except KeyError:
        return None, launched(name) is not None
    running = state_counts(study)["RUNNING"] > 0
    return study, running or bool(worker_pids(name)) or launched(name) is not None


def study_ended(name: str, live: bool) -> None:
    """A study that just finished redraws the whole page: no more refreshes, fresh trial picker."""
    was = st.session_state.tune_live.get(name, False)
    st.session_state.tune_live[name] = live
    if was and not live:
        st.rerun()


def pruned_marked(fig: go.Figure, study: optuna.Study) -> go.Figure:
    """Optuna draws every trial's curve alike: dash the pruned ones and cross their last step."""
    pruned = {f"Trial{t.number}" for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))}
    ends = [(trace.x[-1], trace.y[-1], trace.name) for trace in fig.data if trace.name in pruned]
    fig.update_traces(showlegend=False)      # one entry per trial would outgrow the plot
    fig.for_each_trace(lambda t: t.update(line_dash="dot"), selector=lambda t: t.name in pruned)
    if ends:
        fig.add_trace(go.Scatter(x=[e[0] for e in ends], y=[e[1] for e in ends], text=[e[2] for e in ends],
                                 mode="markers", name="pruned", marker={"symbol": "x", "size": 11, "color": "#d62728"},
                                 hovertemplate="%{text} pruned at epoch %{x}<extra></extra>"))
    fig.update_layout(showlegend=bool(ends), legend={"orientation": "h", "y": -0.2})
    return fig.update_xaxes(title_text="epoch", dtick=1).update_yaxes(title_text=TARGET)


def plot(key: str, make, missing: str | None) -> None:
    """One figure, or a note saying what it still needs: a young study is not an error."""
    if missing:
        st.info(missing)
        return
    try:
        fig = make()
    except Exception as exc:  # noqa: BLE001 - optuna raises several kinds for studies it cannot plot yet
        st.info(f"Not drawn yet: {exc}")
        return
    fig.update_layout(height=PLOT_HEIGHT, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    st.plotly_chart(fig, key=key)


def plots(study: optuna.Study) -> None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    params = sorted({p for t in complete for p in t.params})
    varying = [p for p in params if len({repr(t.params.get(p)) for t in complete}) > 1]
    none = "No complete trial yet." if not complete else None
    # bottom-aligned: the contour's parameter picker must not push its plot out of line with its neighbour
    grid = [st.columns(2, gap="medium", vertical_alignment="bottom") for _ in range(2)]
    with grid[0][0]:
        plot("tune_history_plot", lambda: ov.plot_optimization_history(study, target_name=TARGET), none)
    with grid[0][1]:
        curves = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
        plot("tune_intermediate_plot", lambda: pruned_marked(ov.plot_intermediate_values(study), study),
             None if curves else "No trial has finished an epoch yet.")
    with grid[1][0]:
        contour_missing = "The contour plot needs two searched parameters and two complete trials."
        pair: list[str] = []
        if len(params) >= 2 and len(complete) >= 2:
            if not set(st.session_state.get("tune_contour", [None])) <= set(params):   # none yet, or another study's
                st.session_state.tune_contour = (varying + [p for p in params if p not in varying])[:2]
            pair = st.multiselect("Contour parameters", params, key="tune_contour", max_selections=2,
                                  help="optuna puts them on the axes in alphabetical order")
            flat = [p for p in pair if p not in varying]     # a contour over one value is an empty plot
            contour_missing = ("Pick two parameters for the contour plot." if len(pair) < 2 else
                               f"{flat[0]} has the same value in every complete trial: pick one that varies."
                               if flat else None)
        plot("tune_contour_plot", lambda: ov.plot_contour(study, params=pair, target_name=TARGET), contour_missing)
    with grid[1][1]:
        plot("tune_importances_plot", lambda: ov.plot_param_importances(study, target_name=TARGET),
             None if len(complete) >= 2 and varying
             else "Parameter importances need two complete trials whose parameters differ.")
    # full width: one axis, or one panel, per searched parameter
    plot("tune_parallel_plot", lambda: ov.plot_parallel_coordinate(study, target_name=TARGET), none)
    plot("tune_slice_plot", lambda: ov.plot_slice(study, target_name=TARGET), none)


def trial_table(study: optuna.Study) -> None:
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
    st.download_button("Download CSV", frame.to_csv(index=False), file_name=f"{study.study_name}-trials.csv",
                       mime="text/csv", icon=":material/download:", on_click="ignore")


def study_header(name: str, live: bool) -> None:
    """Name, state and Stop (outside the live fragment, which only redraws what changes)."""
    head, stop = st.columns([5, 1], vertical_alignment="center")
    workers = worker_pids(name)
    head.markdown(f"**Study `{name}`** · {'running' if live else 'finished'}"
                  + (f" · {len(workers)} worker(s)" if workers else ""))
    if live:
        stop.button("Stop", key="tune_stop", type="primary", width="stretch", on_click=stop_study, args=(name,),
                    help="every worker stops after its current batch; that trial is kept as pruned")


def stop_study(name: str) -> None:
    """Stop's callback (see `request` for why a callback)."""
    request_study_stop(name)
    st.toast(f"Stopping study {name}")


def show_study(url: str, name: str, existed: bool) -> None:
    """The live view; re-runs itself every REFRESH_SECONDS while the study runs."""
    try:
        study, live = load(url, name)
    except Exception as exc:  # noqa: BLE001 - a storage that went away: say so, keep the page
        st.error(f"Cannot read study {name}: {type(exc).__name__}: {exc}")
        return
    study_ended(name, live)
    if study is not None and not existed:
        st.rerun()                      # a just-launched study now exists: the whole page gets its Stop and picker
    if study is None:
        proc = st.session_state.tune_procs.get(name)
        if live:
            st.info(f"Study {name} is starting: loading the data.", icon=":material/hourglass_top:")
        elif proc is not None:
            st.error(f"The study process ended (exit code {proc.returncode}) before creating study {name}:\n\n"
                     f"```\n{log_tail(name)}\n```")
        else:
            st.warning(f"There is no study {name} in this storage.")
        return
    counts = state_counts(study)
    cols = st.columns(5)
    for col, (label, state) in zip(cols, (("complete", "COMPLETE"), ("pruned", "PRUNED"), ("failed", "FAIL"),
                                         ("running", "RUNNING"))):
        col.metric(label, counts[state])
    best = study.best_trial if counts["COMPLETE"] else None
    cols[4].metric(f"best {TARGET}", f"{best.value:.2%}" if best else "–",
                   help=f"trial {best.number}" if best else None)
    plots(study)
    trial_table(study)


# -- one trial -----------------------------------------------------------------------------------
def open_in_train(run_dir: str) -> None:
    config = run_at(run_dir).config().to_dict()
    st.session_state["train_values"] = config
    for field, value in config.items():      # the Train page's widgets read their own keys first
        st.session_state[field] = value
    st.switch_page("pages/train.py")


def use_on_draw(draw_id: str) -> None:
    st.session_state["draw_run"] = draw_id
    st.switch_page("pages/draw.py")


def inspect_trial(study: optuna.Study) -> None:
    st.subheader("Trial")
    rows = [r for r in trial_rows(study) if r["run_dir"] and (Path(r["run_dir"]) / "eval.json").is_file()]
    if not rows:
        st.info("No trial has a test evaluation here yet (a trial is evaluated when it ends).")
        return
    by_number = {r["number"]: r for r in rows}
    scored = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    if st.session_state.get("tune_trial") not in by_number:
        st.session_state.tune_trial = max(scored, key=lambda r: r["value"])["number"] if scored else rows[-1]["number"]
    number = st.selectbox("Trial", list(by_number), key="tune_trial", format_func=lambda n: (
        f"trial {n} · {by_number[n]['state'].lower()}"
        + (f" · {TARGET} {by_number[n]['value']:.2%}" if by_number[n]["value"] is not None else "")))
    row = by_number[number]
    evaluation = run_at(row["run_dir"]).eval() or {}
    if evaluation.get("confusion_matrix") is None:
        st.info(f"Trial {number} ended without a test evaluation.")
        return
    cols = st.columns(4)
    cols[0].metric("test accuracy", f"{evaluation['test_accuracy']:.2%}")
    cols[1].metric("macro F1", f"{evaluation['macro_f1']:.4f}")
    cols[2].metric(TARGET, f"{row['value']:.2%}" if row["value"] is not None else "–")
    cols[3].metric("epochs", row["epochs"])
    left, right = st.columns(2, gap="medium")
    normalize = left.toggle("Row-normalized", key="tune_normalize")
    left.plotly_chart(confusion_figure(evaluation["confusion_matrix"], normalize=normalize), key="tune_trial_cm")
    right.plotly_chart(per_class_figure(evaluation["per_class"]), key="tune_trial_per_class")
    path = Path(row["run_dir"])
    buttons = st.container(horizontal=True)
    buttons.button("Open in Train page", icon=":material/model_training:", on_click=request,
                   args=("train", row["run_dir"]))
    local = path.parent.parent == saves_root() / "studies" and (path / "best.pt").is_file()
    buttons.button("Use on Draw page", icon=":material/draw:", disabled=not local, on_click=request,
                   args=("draw", f"{path.parent.name}/{path.name}"),
                   help=None if local else "only trials saved under this app's saves folder can be drawn with")


def request(*action) -> None:
    """A button's click, kept for the next run to act on. While a study runs, the live fragment reruns
    every few seconds, and a click read from `if st.button(...)` is then lost now and again; a
    callback's is not."""
    st.session_state.tune_request = action


def tuning_page() -> None:
    init_state()
    action, *args = st.session_state.get("tune_request") or (None,)
    if action in ("train", "draw"):
        del st.session_state.tune_request
        (open_in_train if action == "train" else use_on_draw)(*args)
    st.title("Tuning")
    notice = st.session_state.pop("tune_notice", None)
    if notice:
        st.success(notice)
    where, which = st.columns([3, 2])
    url = where.text_input("Study storage", key="tune_storage", help="any Optuna storage URL, e.g. "
                           "sqlite:///path/optuna.db or postgresql+psycopg2://user@host/db")
    remember("tune_storage")
    if url == default_storage():
        saves_root().mkdir(parents=True, exist_ok=True)   # a fresh install: an empty storage, not an error
    try:
        summaries = sorted(study_summaries(url), key=lambda s: s["started"] or "", reverse=True)
    except ConfigError as exc:
        st.error(str(exc))
        summaries = None
    with st.expander("Launch a study", expanded=not summaries, icon=":material/rocket_launch:"):
        launch_form(url if summaries is not None else None)
    if summaries is None:
        return
    labels = {s["name"]: f"{s['name']} · {s['trials']} trial{'' if s['trials'] == 1 else 's'}"
              + (f" · best {s['best_value']:.2%}" if s["best_value"] is not None else "") for s in summaries}
    labels.update({n: f"{n} · starting" for n in st.session_state.tune_procs if n not in labels and launched(n)})
    if not labels:
        which.selectbox("Study", [], disabled=True)
        st.info("No studies in this storage yet: launch one above, or from a terminal with "
                "`python -m lstm_core tune --study NAME`.")
        return
    wanted = st.session_state.pop("tune_open", None)   # a study just launched from this page
    if wanted in labels or st.session_state.get("tune_study") not in labels:
        st.session_state.tune_study = wanted if wanted in labels else next(iter(labels))
    name = which.selectbox("Study", list(labels), key="tune_study", format_func=labels.get)
    remember("tune_study")
    try:
        study, live = load(url, name)
    except Exception as exc:  # noqa: BLE001 - a storage that went away: say so, keep the page
        st.error(f"Cannot read study {name}: {type(exc).__name__}: {exc}")
        return
    if study is not None:
        study_header(name, live)
    st.fragment(show_study, run_every=REFRESH_SECONDS if live else None)(url, name, study is not None)
    if study is not None:
        inspect_trial(study)


tuning_page()
