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
from app.drawview import preview, readings, run_to_watch, step_unit, steps_caption

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
