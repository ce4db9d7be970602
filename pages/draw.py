"""Draw: draw a digit (or upload a picture of one) and see what a trained model reads, stroke by stroke.

The canvas and its prediction live in a fragment, so a stroke reruns only them (a forward pass takes
milliseconds; models are loaded once per checkpoint). Quick train runs in a detached process, as on
the Train page: this script only watches its run directory.
"""
from __future__ import annotations

import io
from pathlib import Path

import pandas  # noqa: F401 - whole before plotly looks for it: see lstm_core/plots.py
import plotly.graph_objects as go
import streamlit as st
import torch
from PIL import Image, ImageOps

from lstm_core.config import preset
from lstm_core.jobs import launch_training
from lstm_core.preprocess import Digit, ImageError, Prediction, from_canvas, from_upload, predict
from lstm_core.runs import LIVE_STATES, RunError, describe_model, list_models, list_runs, load_model, open_run
from pagekit import leave_legacy_navigation

leave_legacy_navigation()     # a fresh server's first request named this page: see pagekit.py

CANVAS_SIZE = 280           # px; ten canvas pixels per MNIST pixel
MAX_HIDDEN_SHOWN = 64       # hidden units in the activation heatmap (the most varying ones beyond this)
WATCH_REFRESH = 2.0         # s between looks at a training run (no model yet)
UPLOAD_TYPES = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tiff"]
DIGITS = [str(d) for d in range(10)]
TOP, OTHER = "#ff4b4b", "#8da4c4"
BARS_MARGIN = {"l": 10, "r": 10, "t": 30, "b": 10}
HEATMAP_MARGIN = {"l": 10, "r": 10, "t": 70, "b": 10}   # room on top for the title and the top x axis

try:
    # 0.13 registers its component on import, which needs a running Streamlit app: imported here, in
    # the page, and guarded so that uploads still work if the component cannot be registered.
    from streamlit_drawable_canvas import st_canvas
except Exception as exc:  # noqa: BLE001 - any failure only costs the canvas
    st_canvas, CANVAS_ERROR = None, f"{type(exc).__name__}: {exc}"
else:
    CANVAS_ERROR = None


def init_state() -> None:
    if "draw_canvas" not in st.session_state:
        st.session_state.draw_canvas = 0         # part of the canvas key: Clear bumps it for a fresh canvas
    if "draw_stroke" not in st.session_state:
        st.session_state.draw_stroke = 20        # px on the 280 px canvas: about MNIST's stroke width
    if "draw_run" not in st.session_state:
        st.session_state.draw_run = None         # the model to preselect (the Train page sets it too)
    if "draw_quick_run" not in st.session_state:
        st.session_state.draw_quick_run = None   # the run Quick train started, watched until it completes


@st.cache_resource(max_entries=16, show_spinner="Loading the model…")
def cached_model(path: str, mtime: float):
    """(model, config) once per checkpoint version; `mtime` is only part of the key."""
    return load_model(path)


def get_model(row: dict):
    best = Path(row["path"]) / "best.pt"
    return cached_model(str(best), best.stat().st_mtime)


def model_label(row: dict) -> str:
    """What the picker and the All models table call a run: its model, its accuracy and its id."""
    kind = describe_model(row)
    # a run stopped before its test evaluation has only its validation accuracy
    if row["test_accuracy"] is not None:
        accuracy = f"test {row['test_accuracy']:.1%}"
    else:
        accuracy = f"val {row['best_val_accuracy'] or 0:.1%}"
    return f"{kind} · {accuracy} · {row['id']}"


# -- figures -----------------------------------------------------------------------------------
# Built as plain dicts and not validated: these four charts are redrawn on every stroke, and plotly's
# validation of them cost ~20 ms of the server's time per stroke (the model's answer takes ~2 ms).
# Validation is what turns a colorscale's name into colours, so that is done once, here.
SCALES = {name: [list(stop) for stop in go.Heatmap(colorscale=name).colorscale] for name in ("gray", "Blues", "RdBu")}


def figure(trace: dict, height: int, margin: dict, xaxis: dict, yaxis: dict, **layout) -> go.Figure:
    return go.Figure({"data": [trace], "layout": {"height": height, "margin": margin, "xaxis": xaxis,
                                                  "yaxis": yaxis, **layout}}, _validate=False)


def input_figure(digit: Digit) -> go.Figure:
    """The 28x28 model input, as the model sees it (white ink on black)."""
    trace = {"type": "heatmap", "z": digit.image.tolist(), "colorscale": SCALES["gray"], "zmin": 0, "zmax": 1,
             "showscale": False, "hovertemplate": "row %{y}, column %{x}: %{z:.2f}<extra></extra>"}
    return figure(trace, 210, {"l": 0, "r": 0, "t": 0, "b": 0}, {"visible": False, "constrain": "domain"},
                  {"visible": False, "autorange": "reversed", "scaleanchor": "x", "constrain": "domain"})


def probability_figure(prediction: Prediction) -> go.Figure:
    trace = {"type": "bar", "x": DIGITS, "y": list(prediction.probabilities),
             "marker": {"color": [TOP if d == prediction.digit else OTHER for d in range(10)]},
             "text": [f"{p:.0%}" if p >= 0.005 else "" for p in prediction.probabilities],
             "textposition": "outside", "hovertemplate": "digit %{x}: %{y:.2%}<extra></extra>"}
    return figure(trace, 280, BARS_MARGIN, {"title": {"text": "digit"}, "type": "category"},
                  {"title": {"text": "probability"}, "range": [0, 1.12], "tickformat": ".0%"}, showlegend=False)


def steps_figure(steps: list[list[float]], unit: str) -> go.Figure:
    """Class probabilities after each step: how the belief forms as the LSTM reads the image."""
    trace = {"type": "heatmap", "z": steps, "x": DIGITS, "y": list(range(1, len(steps) + 1)),
             "colorscale": SCALES["Blues"], "zmin": 0, "zmax": 1, "colorbar": {"title": {"text": "p"}, "tickformat": ".0%"},
             "hovertemplate": f"after {unit} %{{y}}<br>digit %{{x}}: %{{z:.1%}}<extra></extra>"}
    return figure(trace, 460, HEATMAP_MARGIN, {"title": {"text": "digit"}, "type": "category", "side": "top"},
                  {"title": {"text": f"{unit} read"}, "autorange": "reversed"},
                  title={"text": "Belief after each step", "y": 0.99})


def hidden_figure(hidden: list[list[float]], unit: str) -> go.Figure:
    """Last-layer activations over time; with many units, only the ones that vary most."""
    h = torch.tensor(hidden)                                     # (T, H)
    units = torch.arange(h.shape[1])
    if h.shape[1] > MAX_HIDDEN_SHOWN:
        units = h.var(0).topk(MAX_HIDDEN_SHOWN).indices.sort().values
        h = h[:, units]
    shown = "" if len(units) == len(hidden[0]) else f" ({len(units)} of {len(hidden[0])}, most varying)"
    trace = {"type": "heatmap", "z": h.tolist(), "x": [str(int(u)) for u in units],
             "y": list(range(1, h.shape[0] + 1)), "colorscale": SCALES["RdBu"], "zmid": 0,
             "colorbar": {"title": {"text": "h"}},
             "hovertemplate": f"{unit} %{{y}}, unit %{{x}}: %{{z:.3f}}<extra></extra>"}
    return figure(trace, 460, HEATMAP_MARGIN,
                  {"title": {"text": "hidden unit"}, "type": "category", "side": "top", "showticklabels": False},
                  {"title": {"text": f"{unit} read"}, "autorange": "reversed"},
                  title={"text": f"Hidden state{shown}", "y": 0.99})


# -- showing a reading -------------------------------------------------------------------------
def show_prediction(where: str, digit: Digit, model, config) -> Prediction:
    """Top digit, the 28x28 model input and the ten probabilities, in the current container."""
    prediction = predict(model, config, digit)
    picture, numbers = st.columns([2, 3], vertical_alignment="center")
    with picture:
        st.plotly_chart(input_figure(digit), key=f"{where}_input", config={"displayModeBar": False})
        st.caption("Model input, 28x28" + (" · inverted" if digit.inverted else ""))
    with numbers:
        st.metric("Prediction", prediction.digit)
        st.metric("Confidence", f"{prediction.confidence:.1%}")
    st.plotly_chart(probability_figure(prediction), key=f"{where}_probs", config={"displayModeBar": False})
    return prediction


def show_all_models(digit: Digit, models: list[dict]) -> None:
    rows = []
    for row in models:
        try:
            model, config = get_model(row)
        except (RunError, OSError) as exc:
            rows.append({"model": model_label(row), "digit": None, "confidence": None,
                         "test_accuracy": row["test_accuracy"], "note": str(exc)})
            continue
        p = predict(model, config, digit, details=False)
        rows.append({"model": model_label(row), "digit": p.digit, "confidence": p.confidence,
                     "test_accuracy": row["test_accuracy"], "note": ""})
    columns = ["model", "digit", "confidence", "test_accuracy"] + (["note"] if any(r["note"] for r in rows) else [])
    st.dataframe(rows, hide_index=True, column_order=columns, column_config={
        "model": st.column_config.TextColumn("Model"),
        "digit": st.column_config.NumberColumn("Reads"),
        "confidence": st.column_config.ProgressColumn("Confidence", format="percent", min_value=0, max_value=1),
        "test_accuracy": st.column_config.NumberColumn("Test accuracy", format="percent"),
        "note": st.column_config.TextColumn("Note"),
    })


def show_details(where: str, digit: Digit, prediction: Prediction, config, models: list[dict],
                 compare: bool) -> None:
    if compare:
        st.subheader("All models")
        show_all_models(digit, models)
    if prediction.hidden is None:
        return                                      # a CNN: no sequence to look into
    unit = "row" if config.seq_mode == "rows" else "pixel"
    st.subheader("How the LSTM reads it")
    left, right = st.columns(2)
    if prediction.steps is not None:
        left.plotly_chart(steps_figure(prediction.steps, unit), key=f"{where}_steps")
    else:
        left.info("A bidirectional LSTM has read the whole image at every step, so it has no belief "
                  "'so far' to show; its hidden state is on the right.")
    right.plotly_chart(hidden_figure(prediction.hidden, unit), key=f"{where}_hidden")
    order = "in its fixed shuffled order" if config.seq_mode == "permuted" else "from the top"
    st.caption(f"Line t is the model after reading the first t {unit}s, {order}"
               + (": on the left what it would answer had the image ended there, on the right its last "
                  "layer's activations." if prediction.steps is not None else ": its last layer's activations "
                  "(forward and backward directions side by side)."))


def show_reading(where: str, side, digit: Digit, prompt: str, model, config, models: list[dict],
                 compare: bool) -> None:
    """The prediction in `side`, its details under both columns; a prompt instead for an empty input."""
    with side:
        if digit.empty:
            st.info(prompt)
            return
        prediction = show_prediction(where, digit, model, config)
    show_details(where, digit, prediction, config, models, compare)


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
    with Image.open(io.BytesIO(data)) as image:   # from_upload read it: a sane size, not corrupt
        image = ImageOps.exif_transpose(image)      # upright, as from_upload sees it
        image.thumbnail((CANVAS_SIZE, CANVAS_SIZE))
        left.image(image.convert("RGB"), caption=upload.name)
    blank = (f"No digit found in {upload.name}: the image looks blank. Try a darker or larger digit, "
             "or crop closer to it.")
    show_reading("upload", right, digit, blank, model, config, models, compare)


# -- no model yet --------------------------------------------------------------------------------
def run_progress(run_id: str) -> tuple[str, str]:
    """A training run's state, and a line saying how far it is."""
    run = open_run(run_id)
    status, epochs = run.status(), run.epochs()
    state = status.get("state", "unknown")
    if state == "queued":
        return state, f"Run `{run_id}` is queued: loading the data, or waiting for the CPU to be free."
    if state == "running":
        done = (f": epoch {epochs[-1]['epoch']}/{run.config().epochs} done, validation accuracy "
                f"{epochs[-1]['val_accuracy']:.1%}") if epochs else ": first epoch"
        return state, f"Training run `{run_id}`{done}. This page switches to it when it completes."
    return state, f"Run `{run_id}` ended {state}: {status.get('error') or 'see train.log in its folder'}."


@st.fragment(run_every=WATCH_REFRESH)
def watch_run(run_id: str) -> None:
    try:
        state, text = run_progress(run_id)
    except (RunError, OSError) as exc:
        state, text = "unknown", str(exc)
    if state not in LIVE_STATES:
        st.session_state.draw_run = run_id
        st.rerun()                      # the whole page: the picker has its model, or the failure is shown
    st.info(text, icon=":material/hourglass_top:")


def no_models() -> None:
    st.info("No trained model yet. Train one on the Train page, or press **Quick train** for the default "
            "LSTM (a few minutes on a CPU).")
    watched = st.session_state.draw_quick_run
    if watched is None:
        # a run started elsewhere (the Train page, another tab, the CLI) will be the model: watch it
        # rather than offer to start a second one that would queue behind it
        live = [row["id"] for row in list_runs() if row["state"] in LIVE_STATES]
        watched = live[0] if live else None
    if watched is not None:
        try:
            state, text = run_progress(watched)
        except (RunError, OSError) as exc:
            state, text = "unknown", f"Cannot read run `{watched}`: {exc}"
        if state in LIVE_STATES:
            watch_run(watched)
            return
        st.error(text)                  # the quick run failed or was stopped before it saved a model
    if st.button("Quick train", type="primary", icon=":material/bolt:"):
        run = launch_training(preset("default"))
        st.session_state.draw_quick_run = run.id
        st.rerun()


def remember_model() -> None:
    st.session_state.draw_run = st.session_state.draw_model


def draw_page() -> None:
    init_state()
    st.title("Draw")
    st.caption("Draw a digit with the mouse or a finger, or upload a picture of one, and see what a trained "
               "model reads. Inputs are cropped, scaled and centred the way MNIST digits were.")
    try:
        models = list_models()
    except OSError as exc:
        st.error(f"Cannot read the saved runs: {exc}")
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
    pick, toggle = st.columns([4, 1], vertical_alignment="bottom")
    chosen = pick.selectbox("Model", ids, key="draw_model", on_change=remember_model,
                            format_func=lambda i: model_label(models[ids.index(i)]),
                            help="Every completed run, best validation accuracy first")
    compare = toggle.toggle("All models", key="draw_compare", help="Classify the same input with every model")
    try:
        model, config = get_model(models[ids.index(chosen)])
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
