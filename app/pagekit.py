"""Streamlit helpers the pages share (lstm_core has no Streamlit in it)."""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import streamlit as st

from lstm_core.config import sequence_length
from lstm_core.plots import confusion_figure, gradient_figure, step_gradient_figure
from lstm_core.runs import list_runs, read_json, run_at, saves_root
from app.runview import gradient_records

if TYPE_CHECKING:
    import optuna

T = TypeVar("T")
# Streamlit releases whose private pages manager leave_legacy_navigation was tested with: from the floor in
# pyproject.toml up to the next major release (which pyproject.toml excludes).
LEGACY_NAVIGATION_TESTED = ((1, 66), (2, 0))


def streamlit_version() -> tuple[int, int]:
    major, minor = (st.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def pages_manager():
    """This run's private pages manager, or None where this Streamlit is not one it was tested with or has
    none: the caller then leaves navigation as Streamlit made it."""
    low, high = LEGACY_NAVIGATION_TESTED
    if not low <= streamlit_version() < high:
        return None
    try:
        from streamlit.runtime.scriptrunner import get_script_run_ctx
        manager = get_script_run_ctx().pages_manager
        manager.main_script_path, manager.get_pages, type(manager).uses_pages_directory    # noqa: B018
    except (ImportError, AttributeError):
        return None
    return manager


def leave_legacy_navigation() -> None:
    """Rerun through streamlit_app.py when this run is one of Streamlit's legacy multipage mode.

    Because the pages live in a folder named pages/, a fresh server runs in that mode until
    streamlit_app.py has run once: a first request for a page's URL (a tab left open on /train
    reconnecting to a restarted server) runs that page on its own, with the folder's file names (and the
    entrypoint itself) as navigation. The test is per run, not Streamlit's server-wide flag: tabs that
    reconnect together all start in that mode, and the first to leave it clears the flag for the rest.
    This reaches into Streamlit's private pages manager: where pages_manager() finds none (another
    Streamlit), the page is drawn as it is, and the sidebar lists the folder's files until the next rerun
    through streamlit_app.py.
    """
    manager = pages_manager()
    if manager is None:
        return
    entrypoint = Path(manager.main_script_path).resolve()
    pages = manager.get_pages().values()
    if len(pages) > 1 and any(Path(p["script_path"]).resolve() == entrypoint for p in pages):
        type(manager).uses_pages_directory = False
        st.rerun()


def restore(store: str, defaults: dict, skip: Collection[str] = ()) -> None:
    """Give the page's widgets their last values. Streamlit forgets the state of widgets that were not
    drawn (a page switched away from): Session State's `store` keeps them, starting from `defaults`.
    `skip`: keys whose widget takes its value another way."""
    kept = st.session_state.setdefault(store, defaults)
    for key, value in kept.items():
        if key not in st.session_state and key not in skip:
            st.session_state[key] = value


def remember(store: str, keys: Iterable[str]) -> None:
    """Keep the current values of these widgets in `store` (see restore)."""
    st.session_state[store].update({k: st.session_state[k] for k in keys if k in st.session_state})


def rerun_when_ended(store: str, key: str, live: bool) -> None:
    """Redraw the whole page when what `key` names (a run, a study) stops being live: the fragment that
    watches it sees the end first, and the rest of the page (results, buttons, pickers) must follow."""
    seen = st.session_state.setdefault(store, {})
    was = seen.get(key, False)
    seen[key] = live
    if was and not live:
        st.rerun()


def ask(key: str, field) -> Any:
    """Draw the widget a core form describes (trainform.FieldInput) under `key`; its value."""
    return getattr(st, field.kind)(field.label, key=key, **field.args)


def metric_row(values: list[tuple]) -> None:
    """A row of st.metric, one per (label, value) or (label, value, help)."""
    for column, (label, value, *help_text) in zip(st.columns(len(values)), values):
        column.metric(label, value, help=help_text[0] if help_text else None)


def confusion(cm: list[list[int]], toggle_key: str, chart_key: str, help: str | None = None) -> None:
    """The confusion matrix with its Row-normalized toggle above it, in the current container."""
    normalize = st.toggle("Row-normalized", key=toggle_key, help=help)
    st.plotly_chart(confusion_figure(cm, normalize=normalize), key=chart_key)


def gradient_health(path: str | Path, seq_mode: str | None, key: str) -> None:
    """The gradient norms the run folder at `path` recorded while training, and how much gradient reached
    each time step (of a `seq_mode` input), under their heading; nothing for a run that recorded none."""
    batches = gradient_records(path)
    if not batches:
        return
    st.markdown("**Gradient health while training**: norms before clipping (log scale), share of steps "
                "clipped; and how much gradient reaches each time step (vanishing gradients fall towards step 1)")
    norms, steps = st.columns(2, gap="medium")
    norms.plotly_chart(gradient_figure(batches), key=f"{key}_gradients")
    if any(b.get("step_grad_norms") for b in batches):
        steps.plotly_chart(step_gradient_figure(batches, sequence_length(seq_mode or "rows")), key=f"{key}_steps")


@st.cache_resource(show_spinner=False, max_entries=8)
def storage_at(url: str) -> optuna.storages.BaseStorage:
    """One storage per URL: opening one checks its schema, too slow to repeat every rerun. ConfigError: it
    cannot be opened."""
    from lstm_core.storage import make_storage      # optuna: only where a page reads a study
    return make_storage(url, heartbeat=False)   # the pages only read; the workers keep the heartbeats


def saved(read: Callable[[], T]) -> T | None:
    """What `read()` returns of the saves root, or None after saying that it cannot be read."""
    try:
        return read()
    except OSError as exc:
        st.error(f"Cannot read the saved runs: {exc}")
        return None


@st.cache_resource(max_entries=16, show_spinner="Loading the model…")
def _model_at(path: str, mtime: float):
    from lstm_core.checkpoints import load_model    # torch: only where a page shows a model
    return load_model(path)


def run_model(path: str | Path):
    """(model, config) of a run's best.pt, loaded once per checkpoint version (its mtime is in the key)."""
    best = Path(path) / "best.pt"
    return _model_at(str(best), best.stat().st_mtime)


@st.cache_data(max_entries=64, show_spinner=False)
def _eval_at(path: str, mtime: float) -> dict | None:
    return read_json(Path(path))


def run_eval(path: str | Path) -> dict | None:
    """A run's eval.json, read again once it is rewritten (its mtime is in the key); None if there is none."""
    file = Path(path) / "eval.json"
    try:
        return _eval_at(str(file), file.stat().st_mtime)
    except OSError:
        return None


def report_button(make: Callable[..., str], source: Any, file_name: str, key: str) -> None:
    """Download report: the one-file HTML report `make` (lstm_core.report's run_report or study_report) writes
    of `source`, built only when clicked: it holds plotly.js (several MB), too much to build at every rerun."""
    def data() -> bytes:
        from lstm_core.data import load_mnist        # the images of the most confident mistakes
        return make(source, lambda: load_mnist().test_images.numpy()).encode()

    st.download_button("Download report", data, file_name=file_name, mime="text/html", key=key, on_click="ignore",
                       icon=":material/summarize:", help="one HTML file that opens offline in any browser")


def open_on_train(run_dir: str) -> None:
    """Switch to the Train page with this run's (or trial's) config in its form."""
    config = run_at(run_dir).config().to_dict()
    # the Train page's widgets read their own keys first, then what it keeps in train_values
    st.session_state.update(config, train_values=config)
    st.switch_page("pages/train.py")


def pick_on_evaluate(run_id: str) -> None:
    """Make this run (or trial, by its list id) the Evaluate page's pick, in its widget's key and in what the
    page remembers of it (restore), so that neither brings back the previous pick."""
    st.session_state["eval_run"] = run_id
    st.session_state.setdefault("eval_values", {})["eval_run"] = run_id


def open_on_evaluate(run_id: str) -> None:
    """Switch to the Evaluate page showing this run (or trial)."""
    pick_on_evaluate(run_id)
    st.switch_page("pages/evaluate.py")


def open_on_draw(run_id: str) -> None:
    """Switch to the Draw page with this run's (or trial's) model picked."""
    st.session_state["draw_run"] = run_id
    st.switch_page("pages/draw.py")


def open_on_runs(run_ids: list[str], notice: str | None = None) -> None:
    """Switch to the Runs page with these runs selected, until rows are picked in its table, and `notice`
    above it."""
    st.session_state.update(runs_opened=list(run_ids), runs_notice=notice)
    st.switch_page("pages/runs.py")


def listed_runs() -> list[dict] | None:
    """Every run (runs.list_runs) under a caption naming their folder; None after saying why they cannot
    be read, [] after saying there are none. Read on every rerun (no cache): a run that trains or ends
    elsewhere shows its progress on the next refresh."""
    try:
        st.caption(f"Runs are stored in `{saves_root() / 'runs'}`")
        runs = list_runs()
    except Exception as exc:  # noqa: BLE001 - a corrupt run folder gets a message, not a traceback
        st.error(f"Could not read the saved runs: {type(exc).__name__}: {exc}")
        return None
    if not runs:
        st.info("No runs yet: start one on the Train page, or from a terminal with "
                "`python -m lstm_core train --preset default`.")
    return runs
