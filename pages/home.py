"""Home: what LSTM Studio does, the devices it can train on here, and the runs saved so far."""
import streamlit as st

from lstm_core.devices import available_devices
from app.pagekit import leave_legacy_navigation, listed_runs
from app.runview import runs_table

leave_legacy_navigation()     # a fresh server's first request named this page: see app/pagekit.py

RECENT = 8  # the newest runs shown here; the Runs page has them all
COLUMNS = {
    "id": st.column_config.TextColumn("Run"),
    "state": st.column_config.TextColumn("State"),
    "model": st.column_config.TextColumn("Model"),
    "test_accuracy": st.column_config.NumberColumn("Test accuracy", format="%.2f%%"),
    "duration_s": st.column_config.NumberColumn("Duration", format="%.0f s"),
    "device": st.column_config.TextColumn("Device"),
}


def home() -> None:
    st.title("LSTM Studio")
    st.markdown(
        "Train LSTM digit classifiers on MNIST, watch them learn, and compare runs. "
        "Each image is read as a sequence (row by row, or pixel by pixel) by a recurrent network; "
        "every run keeps its config, metrics, checkpoints and test evaluation in its own folder."
    )

    st.subheader("Devices")
    try:
        devices = available_devices()
    except Exception as exc:  # noqa: BLE001 - a broken GPU driver must not take the page down
        st.error(f"Could not list the devices: {type(exc).__name__}: {exc}")
    else:
        st.markdown("\n".join(
            f"- `{d.name}` — {d.label}" + (" · native bf16" if d.bf16 else "") + f" · mixed precision (amp=auto): {d.amp}"
            for d in devices))

    st.subheader("Runs")
    runs = listed_runs()
    if not runs:
        if runs is not None:
            st.page_link("pages/train.py", label="Train a model", icon=":material/model_training:")
        return
    st.dataframe(runs_table(runs[:RECENT]), hide_index=True, column_order=list(COLUMNS), column_config=COLUMNS)
    if len(runs) > RECENT:
        st.caption(f"The {RECENT} newest of {len(runs)} runs.")
    st.page_link("pages/runs.py", label="All runs: compare curves, download weights, delete",
                 icon=":material/table_chart:")


home()
