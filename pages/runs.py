"""Runs: every saved run in one table; overlay the curves and the gradient over time of the selected runs
(or of the runs the Train page's comparison just started), download their weights, delete them (after a
confirmation)."""
import streamlit as st

from lstm_core.plots import overlay_figure, step_gradient_overlay_figure
from lstm_core.runs import LIVE_STATES, RunError, open_run
from app.pagekit import leave_legacy_navigation, listed_runs, rerun_when_ended
from app.runview import (delete_runs, environment_text, live_runs, run_curves, run_step_gradients, runs_table,
                         selection_key, weight_files)

leave_legacy_navigation()     # a fresh server's first request named this page: see app/pagekit.py

# The Home page's table, so a run reads the same on both pages.
# what people compare first (accuracy, model, time), in view without scrolling sideways; then the rest
COLUMNS = {
    "id": st.column_config.TextColumn("Run", pinned=True),
    "state": st.column_config.TextColumn("State"),
    "test_accuracy": st.column_config.NumberColumn("Test accuracy", format="%.2f%%"),
    "best_val_accuracy": st.column_config.NumberColumn("Best val accuracy", format="%.2f%%"),
    "model": st.column_config.TextColumn("Model"),
    "epochs_done": st.column_config.NumberColumn("Epochs done"),
    "duration_s": st.column_config.NumberColumn("Duration", format="%.1f s"),
    "macro_f1": st.column_config.NumberColumn("Macro F1", format="%.3f"),
    "optimizer": st.column_config.TextColumn("Optimizer"),
    "lr": st.column_config.NumberColumn("Learning rate", format="%g"),
    "batch_size": st.column_config.NumberColumn("Batch size"),
    "epochs": st.column_config.NumberColumn("Epochs"),
    "device": st.column_config.TextColumn("Device"),
    "created_at": st.column_config.DatetimeColumn("Created (UTC)", format="YYYY-MM-DD HH:mm:ss"),
}
METRICS = ("val_accuracy", "val_loss", "train_loss", "train_accuracy", "val_error")
REFRESH_SECONDS = 2.0       # how often the curves and gradients of selected runs still training are re-read
STEPS_NOTE = ("Each run's latest record of the gradient reaching each part of its sequence (log scale): flat, every "
              "step is learned from; falling by orders of magnitude towards step 1, the gradient vanishes and the "
              "first steps are barely learned from.")


def show_delete_report() -> None:
    """What the last deletion did, shown once, after its rerun."""
    report = st.session_state.pop("delete_report", None) or {"deleted": [], "errors": []}
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
        deleted, errors = delete_runs(pending)      # a queued or running run is refused
        st.session_state.confirm_delete = []
        st.session_state.delete_report = {"deleted": deleted, "errors": errors}
        st.rerun()
    if buttons.button("Cancel", key="delete_cancel"):
        st.session_state.confirm_delete = []
        st.rerun()


def overlay(selected: list[str]) -> None:
    st.subheader("Curves")
    metric = st.selectbox("Metric", METRICS, key="metric", format_func=lambda m: m.replace("_", " "))
    curves, notes = run_curves(selected)
    for level, line in notes:
        getattr(st, level)(line)
    if curves:
        st.plotly_chart(overlay_figure(curves, metric), key="overlay")


def gradients(selected: list[str]) -> None:
    st.subheader("Gradient over time")
    series, notes = run_step_gradients(selected)
    if series:
        st.plotly_chart(step_gradient_overlay_figure(series), key="step_overlay")
        st.caption(STEPS_NOTE)
    for level, line in notes:
        getattr(st, level)(line)


def compared(selected: list[str]) -> None:
    """The curves and gradients of the selected runs; re-run every few seconds while one of them trains."""
    rerun_when_ended("runs_view_live", "\n".join(selected), bool(live_runs(selected)))
    overlay(selected)
    gradients(selected)


def downloads(selected: list[str]) -> None:
    st.subheader("Where they trained, and their weights")
    for run_id in selected:
        with st.expander(f"Run `{run_id}`", expanded=len(selected) == 1):
            try:
                run = open_run(run_id)
            except RunError as exc:
                st.error(str(exc))
                continue
            st.caption(environment_text(run.environment()))
            files = weight_files(run)
            if not files:
                st.caption("No weights saved yet.")
            for name, path in files:
                # Read on click, not on every rerun: checkpoints of large models weigh tens of MB each.
                st.download_button(f"Download {name}", data=path.read_bytes, file_name=f"{run_id}_{name}",
                                   mime="application/octet-stream", on_click="ignore",
                                   key=f"download-{run_id}-{name}")


def runs_page() -> None:
    st.session_state.setdefault("confirm_delete", [])    # run ids waiting for "Yes, delete"
    st.title("Runs")
    notice = st.session_state.pop("runs_notice", None)
    if notice:
        st.info(notice)
    show_delete_report()
    runs = listed_runs()
    if not runs:
        return
    ids = [r["id"] for r in runs]
    event = st.dataframe(runs_table(runs), hide_index=True, column_order=list(COLUMNS), column_config=COLUMNS,
                         on_select="rerun", selection_mode="multi-row", key=selection_key("runs_table", ids))
    picked = [ids[i] for i in event.selection.rows if 0 <= i < len(ids)]
    # the runs another page opened this one on (pagekit.open_on_runs) stand as the selection until rows are picked
    opened = [run_id for run_id in st.session_state.get("runs_opened", ()) if run_id in ids]
    if picked or not opened:
        st.session_state.pop("runs_opened", None)
    selected = picked or opened
    if opened and not picked:
        st.caption("Showing " + ", ".join(f"`{run_id}`" for run_id in opened) + ": select rows in the table to "
                   "compare others.")
    confirm_delete()
    if not selected:
        st.caption("Select rows in the table to compare their curves, download their weights or delete them.")
        return
    if st.button(f"Delete selected ({len(selected)})", icon=":material/delete:", key="delete_selected"):
        st.session_state.confirm_delete = selected
        st.rerun()
    live = any(r["state"] in LIVE_STATES for r in runs if r["id"] in selected)
    st.fragment(compared, run_every=REFRESH_SECONDS if live else None)(selected)
    downloads(selected)


runs_page()
