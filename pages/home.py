"""Home: what LSTM Studio does, the devices it can train on here, and the runs saved so far."""
import pandas as pd
import streamlit as st

from lstm_core.devices import available_devices
from lstm_core.runs import list_runs, saves_root

# `path` is left out: the saves root is shown once above the table instead of on every row.
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
    # shown as percentages with fixed decimals (the "percent" preset trims zeros unevenly)
    "best_val_accuracy": st.column_config.NumberColumn("Best val accuracy", format="%.2f%%"),
    "test_accuracy": st.column_config.NumberColumn("Test accuracy", format="%.2f%%"),
    "macro_f1": st.column_config.NumberColumn("Macro F1", format="%.3f"),
    "duration_s": st.column_config.NumberColumn("Duration", format="%.1f s"),
    "device": st.column_config.TextColumn("Device"),
    # run ids are UTC timestamps too, so the two read the same
    "created_at": st.column_config.DatetimeColumn("Created (UTC)", format="YYYY-MM-DD HH:mm:ss"),
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
            f"- `{d.name}` — {d.label}" + (" · fast bf16" if d.bf16 else "") for d in devices))

    st.subheader("Runs")
    # Read on every rerun (no cache): a run finished in a terminal shows up on the next refresh.
    try:
        root = saves_root()
        st.caption(f"Runs are stored in `{root / 'runs'}`")
        runs = list_runs()
    except Exception as exc:  # noqa: BLE001 - a corrupt run folder gets a message, not a traceback
        st.error(f"Could not read the saved runs: {type(exc).__name__}: {exc}")
        return
    if not runs:
        st.info("No runs yet. Train one from a terminal with `python -m lstm_core train --preset default` "
                "(the Train page will do this from here once it lands), then refresh this page.")
        return
    table = pd.DataFrame(runs)
    table["created_at"] = pd.to_datetime(table["created_at"], unit="s", errors="coerce")
    for column in ("best_val_accuracy", "test_accuracy"):
        table[column] = pd.to_numeric(table[column], errors="coerce") * 100
    st.dataframe(table, hide_index=True, column_order=list(COLUMNS), column_config=COLUMNS)


home()
