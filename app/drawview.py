"""What the Draw page shows besides its figures (those are in plots.py), as data: every model's reading of
one digit, the words over and under a recurrent model's figures (its gates' included), an upload's preview,
and the run to wait for while there is no model yet.

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
    """What one step of a recurrent model reads: a row, or a pixel."""
    return "row" if config.seq_mode == "rows" else "pixel"


def cell_label(config: TrainConfig) -> str:
    """The recurrent cell as people write it: "LSTM", "GRU", "RNN", "IRNN"."""
    return config.cell.upper()


def reading_heading(config: TrainConfig) -> str:
    return f"How the {cell_label(config)} reads it"


def no_beliefs_note(config: TrainConfig) -> str:
    """In place of the belief figure, for a bidirectional model."""
    return (f"A bidirectional {cell_label(config)} has read the whole image at every step, so it has no belief "
            "'so far' to show; its hidden state is on the right.")


def steps_caption(config: TrainConfig, beliefs: bool) -> str:
    """The line under the belief (`beliefs`: shown, a unidirectional model) and hidden-state figures."""
    unit = step_unit(config)
    order = "in its fixed shuffled order" if config.seq_mode == "permuted" else "from the top"
    return (f"Line t is the model after reading the first t {unit}s, {order}"
            + (": on the left what it would answer had the image ended there, on the right its last layer's "
               "activations." if beliefs else ": its last layer's activations (forward and backward directions "
               "side by side)."))


# The words under each gate's figure, in the order the page lays them out, two to a row: an LSTM's forget and
# input gates (what it keeps, what it writes), then its cell state and output gate (the memory, and how much
# of it the hidden state shows); a GRU's update gate, then its reset gate.
GATE_WORDS = {
    "forget gate": "Forget gate: how much of its memory the LSTM carries past {unit} t. Near 1 it keeps what it "
                   "held; near 0 it forgets it.",
    "input gate": "Input gate: how much of {unit} t is written into the memory. Near 1 the {unit} is let in; "
                  "near 0 it is ignored.",
    "cell state": "Cell state: the memory itself after {unit} t, what the forget and input gates have made of it. "
                  "Red and blue are its two signs.",
    "output gate": "Output gate: how much of the memory the hidden state shows after {unit} t, the state the "
                   "answer is read from.",
    "update gate": "Update gate: near 1 the GRU keeps its previous state through {unit} t; near 0 it takes the "
                   "new candidate formed from the {unit} instead.",
    "reset gate": "Reset gate: near 0 the GRU ignores its past when it forms the candidate from {unit} t; near 1 "
                  "it uses all of it.",
}


def gate_panels(config: TrainConfig, names) -> list[tuple[str, str]]:
    """The gate figures to draw, from the `names` a Prediction's gates hold: (name, the words under it), in
    GATE_WORDS's order."""
    unit = step_unit(config)
    return [(name, words.format(unit=unit)) for name, words in GATE_WORDS.items() if name in names]


def gates_caption(config: TrainConfig) -> str:
    """The line under all of a model's gate figures."""
    unit = step_unit(config)
    sides = " (forward and backward directions side by side)" if config.bidirectional else ""
    return (f"Line t is the gate at {unit} t, for the units of the hidden state above{sides}. A unit whose gate "
            f"is at 0 or 1 on every {unit} is saturated: stuck open or shut, whatever the digit.")


def no_gates_note(config: TrainConfig) -> str:
    """In place of the gate figures, for a plain RNN (rnn, irnn)."""
    return (f"The {cell_label(config)} has no gates: a plain RNN rewrites its whole state at every "
            f"{step_unit(config)}, with nothing to decide what to keep. The gates of an LSTM or a GRU are what do.")


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
