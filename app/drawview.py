"""What the Draw page shows besides its figures (those are in plots.py), as data: every model's reading of
one digit, the words under the LSTM's figures, an upload's preview, and the run to wait for while there
is no model yet.

    rows = readings(digit, list_models(), load)     # the All models table
"""
from __future__ import annotations

import io

from PIL import Image, ImageOps

from lstm_core.config import TrainConfig
from lstm_core.preprocess import Digit, predict
from lstm_core.runs import LIVE_STATES, RunError
from app.runview import model_label


def readings(digit: Digit, models: list[dict], load) -> list[dict]:
    """`digit` read by each model (rows of runs.list_models): its label, the digit it reads and how sure
    it is, its test accuracy, and a note where `load(row)` -> (model, config) raised RunError or OSError."""
    rows = []
    for row in models:
        try:
            model, config = load(row)
        except (RunError, OSError) as exc:
            rows.append({"model": model_label(row), "digit": None, "confidence": None,
                         "test_accuracy": row["test_accuracy"], "note": str(exc)})
            continue
        p = predict(model, config, digit, details=False)
        rows.append({"model": model_label(row), "digit": p.digit, "confidence": p.confidence,
                     "test_accuracy": row["test_accuracy"], "note": ""})
    return rows


def step_unit(config: TrainConfig) -> str:
    """What one step of the LSTM reads: a row, or a pixel."""
    return "row" if config.seq_mode == "rows" else "pixel"


def steps_caption(config: TrainConfig, beliefs: bool) -> str:
    """The line under the belief (`beliefs`: shown, a unidirectional LSTM) and hidden-state figures."""
    unit = step_unit(config)
    order = "in its fixed shuffled order" if config.seq_mode == "permuted" else "from the top"
    return (f"Line t is the model after reading the first t {unit}s, {order}"
            + (": on the left what it would answer had the image ended there, on the right its last layer's "
               "activations." if beliefs else ": its last layer's activations (forward and backward directions "
               "side by side)."))


def preview(data: bytes, size: int) -> Image.Image:
    """An uploaded image (one from_upload has read: a sane size, not corrupt) upright, as from_upload sees
    it, within `size` x `size` pixels, in RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        image.thumbnail((size, size))
        return image.convert("RGB")


def run_to_watch(quick_run: str | None, runs: list[dict]) -> str | None:
    """The training run whose model the page waits for: the one Quick train started, else a live run
    started elsewhere (the Train page, another tab, the CLI) rather than a second one queued behind it."""
    if quick_run is not None:
        return quick_run
    live = [row["id"] for row in runs if row["state"] in LIVE_STATES]
    return live[0] if live else None
