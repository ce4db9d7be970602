"""Draw: draw a digit (or upload a picture of one) and see what a trained model reads, stroke by stroke.

The canvas and its prediction live in a fragment, so a stroke reruns only them (a forward pass takes
milliseconds; models are loaded once per checkpoint). Quick train runs in a detached process, as on
the Train page: this script only watches its run directory.
"""
from __future__ import annotations

import streamlit as st

from lstm_core.config import ConfigError, preset
from lstm_core.jobs import launch_training
from lstm_core.plots import gates_figure, hidden_figure, input_figure, most_varying, probability_figure, steps_figure
from lstm_core.preprocess import Digit, ImageError, Prediction, from_canvas, from_upload, predict
from lstm_core.runs import LIVE_STATES, RunError, list_models, list_runs
from app.drawview import (gate_panels, gates_caption, no_beliefs_note, no_gates_note, preview, reading_heading,
                          readings, run_to_watch, step_unit, steps_caption)
from app.pagekit import leave_legacy_navigation, run_model, saved
from app.runview import model_label, run_progress
from app.trialopen import trial_opener

leave_legacy_navigation()     # a fresh server's first request named this page: see app/pagekit.py

CANVAS_SIZE = 280           # px; ten canvas pixels per MNIST pixel
WATCH_REFRESH = 2.0         # s between looks at a training run (no model yet)
GATES_HELP = ("How an LSTM's input, forget and output gates and its cell state, or a GRU's update and reset gates, "
              "open and shut as it reads the digit")
GATES_HINT = "Turn on **Gates** above to watch the gates that decide what the model keeps, step by step."
UPLOAD_TYPES = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tiff"]

try:
    # 0.13 registers its component on import, which needs a running Streamlit app: imported here, in
    # the page, and guarded so that uploads still work if the component cannot be registered.
    from streamlit_drawable_canvas import st_canvas
except Exception as exc:  # noqa: BLE001 - any failure only costs the canvas
    st_canvas, CANVAS_ERROR = None, f"{type(exc).__name__}: {exc}"
else:
    CANVAS_ERROR = None


STATE = {"draw_canvas": 0,         # part of the canvas key: Clear bumps it for a fresh canvas
         "draw_stroke": 20,        # px on the 280 px canvas: about MNIST's stroke width
         "draw_run": None,         # the model to preselect (the Train page sets it too)
         "draw_quick_run": None,   # the run Quick train started, watched until it completes
         "draw_gates": False}      # the gates' figures: off, a stroke then costs a fraction of their drawing


# -- showing a reading -------------------------------------------------------------------------
def show_prediction(where: str, digit: Digit, model, config) -> Prediction:
    """Top digit, the 28x28 model input and the ten probabilities, in the current container."""
    prediction = predict(model, config, digit, gates=st.session_state.draw_gates)
    picture, numbers = st.columns([2, 3], vertical_alignment="center")
    with picture:
        st.plotly_chart(input_figure(digit.image), key=f"{where}_input", config={"displayModeBar": False})
        st.caption("Model input, 28x28" + (" · inverted" if digit.inverted else ""))
    with numbers:
        st.metric("Prediction", prediction.digit)
        st.metric("Confidence", f"{prediction.confidence:.1%}")
    st.plotly_chart(probability_figure(prediction.probabilities, prediction.digit), key=f"{where}_probs",
                    config={"displayModeBar": False})
    return prediction


def show_all_models(digit: Digit, models: list[dict]) -> None:
    rows = readings(digit, models, lambda row: run_model(row["path"]))
    columns = ["model", "digit", "confidence", "test_accuracy"] + (["note"] if any(r["note"] for r in rows) else [])
    st.dataframe(rows, hide_index=True, column_order=columns, column_config={
        "model": st.column_config.TextColumn("Model"),
        "digit": st.column_config.NumberColumn("Reads"),
        "confidence": st.column_config.ProgressColumn("Confidence", format="percent", min_value=0, max_value=1),
        "test_accuracy": st.column_config.NumberColumn("Test accuracy", format="percent"),
        "note": st.column_config.TextColumn("Note"),
    })


def show_reading(where: str, side, digit: Digit, prompt: str, model, config, models: list[dict],
                 compare: bool) -> None:
    """The prediction in `side`, its details under both columns; a prompt instead for an empty input."""
    with side:
        if digit.empty:
            st.info(prompt)
            return
        prediction = show_prediction(where, digit, model, config)
    if compare:
        st.subheader("All models")
        show_all_models(digit, models)
    if prediction.hidden is None:
        return                                      # a CNN: no sequence to look into
    unit = step_unit(config)
    st.subheader(reading_heading(config))
    left, right = st.columns(2)
    if prediction.steps is not None:
        left.plotly_chart(steps_figure(prediction.steps, unit), key=f"{where}_steps")
    else:
        left.info(no_beliefs_note(config))
    right.plotly_chart(hidden_figure(prediction.hidden, unit), key=f"{where}_hidden")
    st.caption(steps_caption(config, prediction.steps is not None))
    if st.session_state.draw_gates:
        show_gates(where, prediction, config)
    else:
        st.caption(GATES_HINT)


def show_gates(where: str, prediction: Prediction, config) -> None:
    """The last layer's gates, two figures to a row, for the hidden state figure's units; a note instead
    for a plain RNN, which has none."""
    if prediction.gates is None:
        st.caption(no_gates_note(config))
        return
    unit = step_unit(config)
    units = most_varying(prediction.hidden)
    panels = gate_panels(config, prediction.gates)
    for row in range(0, len(panels), 2):
        for column, (name, words) in zip(st.columns(2), panels[row:row + 2]):
            column.plotly_chart(gates_figure(prediction.gates[name], name, unit, units),
                                key=f"{where}_{name.replace(' ', '_')}")
            column.caption(words)
    st.caption(gates_caption(config))


def clear_canvas() -> None:
    st.session_state.draw_canvas += 1


@st.fragment
def draw_panel(model, config, models: list[dict], compare: bool) -> None:
    """The canvas and its reading: a stroke reruns only this."""
    left, right = st.columns([2, 3], gap="large")
    with left:
        # the canvas's own toolbar (undo, redo, delete) floats above it: room for it, and the stroke width
        # slider goes under the canvas, which reads the slider's value from the session state
        st.space("small")
        result = st_canvas(stroke_width=st.session_state.draw_stroke, stroke_color="#ffffff",
                           background_color="#000000", height=CANVAS_SIZE, width=CANVAS_SIZE,
                           drawing_mode="freedraw", update_streamlit=True, return_image_data=True,
                           key=f"draw_canvas_{st.session_state.draw_canvas}")
        row = st.container(horizontal=True, vertical_alignment="bottom", wrap=False, width=CANVAS_SIZE + 40)
        row.slider("Stroke width", 5, 40, key="draw_stroke")
        row.button("Clear", icon=":material/ink_eraser:", on_click=clear_canvas)
    digit = from_canvas(result.image_data)
    show_reading("draw", right, digit, "Draw a digit in the black box: the prediction follows every stroke.",
                 model, config, models, compare)


def upload_panel(model, config, models: list[dict], compare: bool) -> None:
    left, right = st.columns([2, 3], gap="large")
    with left:
        upload = st.file_uploader("An image of one digit", type=UPLOAD_TYPES, key="draw_upload",
                                  help="Any size; dark ink on light paper is inverted automatically.")
    if upload is None:
        right.info("Upload a photo, scan or drawing of a single digit.")
        return
    data = upload.getvalue()
    try:
        digit = from_upload(data)
    except ImageError as exc:
        right.error(f"Cannot read {upload.name}: {exc}")
        return
    left.image(preview(data, CANVAS_SIZE), caption=upload.name)
    blank = (f"No digit found in {upload.name}: the image looks blank. Try a darker or larger digit, "
             "or crop closer to it.")
    show_reading("upload", right, digit, blank, model, config, models, compare)


# -- no model yet --------------------------------------------------------------------------------
@st.fragment(run_every=WATCH_REFRESH)
def watch_run(run_id: str) -> None:
    state, text = run_progress(run_id)
    if state not in LIVE_STATES:
        st.session_state.draw_run = run_id
        st.rerun()                      # the whole page: the picker has its model, or the failure is shown
    st.info(text, icon=":material/hourglass_top:")


def no_models() -> None:
    st.info("No trained model yet. Train one on the Train page, or press **Quick train** for the default "
            "LSTM (a few minutes on a CPU).")
    watched = run_to_watch(st.session_state.draw_quick_run, list_runs())
    if watched is not None:
        state, text = run_progress(watched)
        if state in LIVE_STATES:
            watch_run(watched)
            return
        st.error(text)                  # the quick run failed or was stopped before it saved a model
    if st.button("Quick train", type="primary", icon=":material/bolt:"):
        try:
            st.session_state.draw_quick_run = launch_training(preset("default")).id
        except (RunError, ConfigError) as exc:      # a saves folder that cannot take a run
            st.error(str(exc))
            return
        st.rerun()


def remember_model() -> None:
    st.session_state.draw_run = st.session_state.draw_model


def pick_trial(run_id: str) -> str | None:
    """Preselect a trial just opened (trialopen), or say why it has no model to draw with."""
    if run_id not in [row["id"] for row in list_models()]:
        return (f"Trial {run_id} has no model to draw with: only completed trials, and those stopped after their "
                "first epoch, have one.")
    st.session_state.draw_run = run_id
    return None


def draw_page() -> None:
    for key, value in STATE.items():
        st.session_state.setdefault(key, value)
    st.title("Draw")
    st.caption("Draw a digit with the mouse or a finger, or upload a picture of one, and see what a trained "
               "model reads. Inputs are cropped, scaled and centred the way MNIST digits were.")
    trial_opener("draw", pick_trial)
    models = saved(list_models)
    if models is None:
        return
    if not models:
        no_models()
        return
    ids = [row["id"] for row in models]
    # draw_run is the request (the Train page's or the user's last pick), the widget only shows it: an
    # unkeyed selectbox with a computed index would become a new widget, and forget the pick, each time
    # the index changed
    wanted = st.session_state.draw_run
    st.session_state.draw_model = wanted if wanted in ids else ids[0]
    pick, toggle, gates = st.columns([4, 1, 1], vertical_alignment="bottom")
    chosen = pick.selectbox("Model", ids, key="draw_model", on_change=remember_model,
                            format_func=lambda i: model_label(models[ids.index(i)]),
                            help="Every completed run, best validation accuracy first")
    compare = toggle.toggle("All models", key="draw_compare", help="Classify the same input with every model")
    gates.toggle("Gates", key="draw_gates", help=GATES_HELP)
    try:
        model, config = run_model(models[ids.index(chosen)]["path"])
    except (RunError, OSError) as exc:
        st.error(f"Cannot load run {chosen}: {exc}")
        return
    draw_tab, upload_tab = st.tabs(["Draw", "Upload an image"])
    with draw_tab:
        if st_canvas is None:
            st.warning(f"The drawing canvas is not available here ({CANVAS_ERROR}); uploads still work.")
        else:
            draw_panel(model, config, models, compare)
    with upload_tab:
        upload_panel(model, config, models, compare)


draw_page()
