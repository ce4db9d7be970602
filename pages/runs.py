"""Runs: every saved run in one table; overlay the curves of the selected runs, download their weights,
delete them (after a confirmation)."""
import hashlib

import pandas as pd
import streamlit as st

from lstm_core.jobs import delete_run
from lstm_core.plots import overlay_figure
from lstm_core.runs import RunError, list_runs, open_run, saves_root
from pagekit import leave_legacy_navigation

leave_legacy_navigation()     # a fresh server's first request named this page: see pagekit.py

# The Home page's table, so a run reads the same on both pages.
COLUMNS = {
    "id": st.column_config.TextColumn("Run", pinned=True),
    "state": st.column_config.TextColumn("State"),
    "arch": st.column_config.TextColumn("Model"),
    "seq_mode": st.column_config.TextColumn("Sequence"),
    "hidden_size": st.column_config.NumberColumn("Hidden size"),
    "num_layers": st.column_config.NumberColumn("Layers"),
    "bidirectional": st.column_config.CheckboxColumn("Bidirectional"),
    "optimizer": st.column_config.TextColumn("Optimizer"),
    "lr": st.column_config.NumberColumn("Learning rate", format="%g"),
    "batch_size": st.column_config.NumberColumn("Batch size"),
    "epochs_done": st.column_config.NumberColumn("Epochs done"),
    "epochs": st.column_config.NumberColumn("Epochs"),
    "best_val_accuracy": st.column_config.NumberColumn("Best val accuracy", format="%.2f%%"),
    "test_accuracy": st.column_config.NumberColumn("Test accuracy", format="%.2f%%"),
    "macro_f1": st.column_config.NumberColumn("Macro F1", format="%.3f"),
    "duration_s": st.column_config.NumberColumn("Duration", format="%.1f s"),
    "device": st.column_config.TextColumn("Device"),
    "created_at": st.column_config.DatetimeColumn("Created (UTC)", format="YYYY-MM-DD HH:mm:ss"),
}
METRICS = ("val_accuracy", "val_loss", "train_loss", "train_accuracy", "val_error")
# (file name in the run directory, Run attribute holding its path)
DOWNLOADS = (("final_state_dict.pth", "final_path"), ("best.pt", "best_path"))


def init_state() -> None:
    if "confirm_delete" not in st.session_state:
        st.session_state.confirm_delete = []   # run ids waiting for "Yes, delete"
    if "delete_report" not in st.session_state:
        st.session_state.delete_report = None  # what the last deletion did, shown once after its rerun


def table_key(ids: list[str]) -> str:
    """A selection is a list of row positions: once a run is deleted or a new one appears, the same
    positions name other runs. A table keyed by its ids starts with an empty selection instead."""
    return "runs_table-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(runs)
    table["created_at"] = pd.to_datetime(table["created_at"], unit="s", errors="coerce")
    for column in ("best_val_accuracy", "test_accuracy"):
        table[column] = pd.to_numeric(table[column], errors="coerce") * 100
    return table


def show_delete_report() -> None:
    report = st.session_state.delete_report
    if report is None:
        return
    st.session_state.delete_report = None
    if report["deleted"]:
        st.success("Deleted " + ", ".join(f"`{run_id}`" for run_id in report["deleted"]) + ".")
    for message in report["errors"]:
        st.error(message)


def confirm_delete() -> None:
    pending = st.session_state.confirm_delete
    if not pending:
        return
    st.warning("Delete " + ", ".join(f"`{run_id}`" for run_id in pending)
               + " for good? Their checkpoints, metrics and evaluation go with them.")
    buttons = st.container(horizontal=True)
    if buttons.button("Yes, delete", type="primary", key="delete_yes"):
        deleted, errors = [], []
        for run_id in pending:
            try:
                delete_run(open_run(run_id))   # refuses a queued or running run
            except (RunError, OSError) as exc:
                errors.append(f"Could not delete `{run_id}`: {exc}")
            else:
                deleted.append(run_id)
        st.session_state.confirm_delete = []
        st.session_state.delete_report = {"deleted": deleted, "errors": errors}
        st.rerun()
    if buttons.button("Cancel", key="delete_cancel"):
        st.session_state.confirm_delete = []
        st.rerun()


def overlay(selected: list[str]) -> None:
    st.subheader("Curves")
    metric = st.selectbox("Metric", METRICS, key="metric", format_func=lambda m: m.replace("_", " "))
    curves = {}
    for run_id in selected:
        try:
            epochs = open_run(run_id).epochs()
        except (RunError, OSError) as exc:
            st.error(f"Could not read the metrics of `{run_id}`: {exc}")
            continue
        if epochs:
            curves[run_id] = epochs
        else:
            st.caption(f"`{run_id}` has not finished an epoch yet.")
    if curves:
        st.plotly_chart(overlay_figure(curves, metric), key="overlay")


def downloads(selected: list[str]) -> None:
    st.subheader("Weights")
    for run_id in selected:
        with st.expander(f"Run `{run_id}`", expanded=len(selected) == 1):
            try:
                run = open_run(run_id)
            except RunError as exc:
                st.error(str(exc))
                continue
            files = [(name, getattr(run, attr)) for name, attr in DOWNLOADS if getattr(run, attr).is_file()]
            if not files:
                st.caption("No weights saved yet.")
            for name, path in files:
                # Read on click, not on every rerun: checkpoints of large models weigh tens of MB each.
                st.download_button(f"Download {name}", data=path.read_bytes, file_name=f"{run_id}_{name}",
                                   mime="application/octet-stream", on_click="ignore",
                                   key=f"download-{run_id}-{name}")


def runs_page() -> None:
    init_state()
    st.title("Runs")
    show_delete_report()
    # Read on every rerun (no cache): runs training elsewhere show their progress on the next refresh.
    try:
        root = saves_root()
        st.caption(f"Runs are stored in `{root / 'runs'}`")
        runs = list_runs()
        table = runs_frame(runs) if runs else None
    except Exception as exc:  # noqa: BLE001 - a corrupt run folder gets a message, not a traceback
        st.error(f"Could not read the saved runs: {type(exc).__name__}: {exc}")
        return
    if not runs:
        st.info("No runs yet: start one on the Train page, or from a terminal with "
                "`python -m lstm_core train --preset default`.")
        return

    ids = [r["id"] for r in runs]
    event = st.dataframe(table, hide_index=True, column_order=list(COLUMNS), column_config=COLUMNS,
                         on_select="rerun", selection_mode="multi-row", key=table_key(ids))
    selected = [ids[i] for i in event.selection.rows if 0 <= i < len(ids)]

    confirm_delete()
    if not selected:
        st.caption("Select rows in the table to compare their curves, download their weights or delete them.")
        return
    if st.button(f"Delete selected ({len(selected)})", icon=":material/delete:", key="delete_selected"):
        st.session_state.confirm_delete = selected
        st.rerun()
    overlay(selected)
    downloads(selected)


runs_page()
