"""What the Draw page shows besides its figures: every model's reading of a digit, the words under the
LSTM's figures, an upload's preview, and the run it waits for."""
import io

import pytest
import torch
from PIL import Image

from conftest import tiny_config
from lstm_core.models import build_model
from lstm_core.preprocess import Digit
from lstm_core.runs import RunError
from app.drawview import (GATE_WORDS, gate_panels, gates_caption, no_beliefs_note, no_gates_note, preview,
                          reading_heading, readings, run_to_watch, step_unit, steps_caption)

ROW = {"id": "r1", "arch": "lstm", "bidirectional": False, "num_layers": 1, "hidden_size": 48, "seq_mode": "rows",
       "test_accuracy": 0.9, "best_val_accuracy": 0.91}


def test_each_model_reads_the_digit_and_one_that_cannot_load_says_why():
    torch.manual_seed(0)
    config = tiny_config()
    model = build_model(config).eval()
    image = torch.zeros(28, 28)
    image[4:24, 13:16] = 1.0

    def load(row):
        if row["id"] == "broken":
            raise RunError("best.pt is corrupt")
        return model, config

    rows = readings(Digit(image, empty=False, inverted=False), [ROW, {**ROW, "id": "broken"}], load)
    assert [r["model"] for r in rows] == [f"LSTM 1x48, rows · test 90.0% · {i}" for i in ("r1", "broken")]
    assert 0 <= rows[0]["digit"] <= 9 and 0.1 <= rows[0]["confidence"] <= 1 and rows[0]["note"] == ""
    assert (rows[1]["digit"], rows[1]["confidence"], rows[1]["note"]) == (None, None, "best.pt is corrupt")
    assert [r["test_accuracy"] for r in rows] == [0.9, 0.9]


@pytest.mark.parametrize("seq_mode, beliefs, unit, words", [
    ("rows", True, "row", "first t rows, from the top: on the left what it would answer"),
    ("pixels", False, "pixel", "first t pixels, from the top: its last layer's activations (forward and backward"),
    ("permuted", True, "pixel", "first t pixels, in its fixed shuffled order: on the left"),
])
def test_the_words_under_the_lstms_figures(seq_mode, beliefs, unit, words):
    config = tiny_config(seq_mode=seq_mode, bidirectional=not beliefs)
    assert step_unit(config) == unit
    assert steps_caption(config, beliefs).startswith("Line t is the model after reading the " + words)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "irnn"])
def test_the_words_over_a_recurrent_models_figures_name_its_cell(cell):
    config = tiny_config(cell=cell, bidirectional=True)
    assert reading_heading(config) == f"How the {cell.upper()} reads it"
    assert no_beliefs_note(config).startswith(f"A bidirectional {cell.upper()} has read the whole image")


@pytest.mark.parametrize("cell, names, order", [
    ("lstm", ["input gate", "forget gate", "output gate", "cell state"],
     ["forget gate", "input gate", "cell state", "output gate"]),
    ("gru", ["reset gate", "update gate"], ["update gate", "reset gate"]),
])
def test_each_gate_gets_its_figure_in_reading_order_with_how_to_read_it(cell, names, order):
    config = tiny_config(cell=cell)
    panels = gate_panels(config, {name: [[0.5]] for name in names})     # a Prediction's gates, in torch's order
    assert [name for name, _ in panels] == order
    words = dict(panels)
    for name in order:
        assert words[name].startswith(name.capitalize() + ":") and "row t" in words[name]
    if cell == "lstm":
        assert "Near 1 it keeps what it held; near 0 it forgets it" in words["forget gate"]
        assert "the memory itself" in words["cell state"]
    else:
        assert "near 1 the GRU keeps its previous state" in words["update gate"]
        assert "near 0 the GRU ignores its past" in words["reset gate"]
    assert gate_panels(tiny_config(seq_mode="pixels"), ["forget gate"])[0][1].count("pixel") == 1


def test_every_gate_a_model_can_have_has_words():
    assert set(GATE_WORDS) == {"input gate", "forget gate", "output gate", "cell state", "reset gate", "update gate"}


def test_the_lines_under_the_gates_and_in_their_place_for_a_plain_rnn():
    assert gates_caption(tiny_config()).startswith("Line t is the gate at row t, for the units of the hidden state "
                                                   "above. A unit whose gate is at 0 or 1 on every row is saturated")
    assert "(forward and backward directions side by side)" in gates_caption(tiny_config(bidirectional=True))
    assert no_gates_note(tiny_config(cell="irnn", seq_mode="pixels")).startswith(
        "The IRNN has no gates: a plain RNN rewrites its whole state at every pixel")


def test_the_preview_is_upright_small_and_rgb():
    buffer = io.BytesIO()
    photo = Image.new("L", (600, 300), 200)
    exif = photo.getexif()
    exif[0x0112] = 6                    # orientation: the camera was turned, show it rotated by 90 degrees
    photo.save(buffer, "JPEG", exif=exif)
    shown = preview(buffer.getvalue(), 280)
    assert shown.mode == "RGB" and shown.size == (140, 280)


def test_the_run_to_watch_is_the_quick_one_else_a_live_one():
    runs = [{"id": "done", "state": "completed"}, {"id": "live", "state": "running"}]
    assert run_to_watch("quick", runs) == "quick"
    assert run_to_watch(None, runs) == "live"
    assert run_to_watch(None, runs[:1]) is None
