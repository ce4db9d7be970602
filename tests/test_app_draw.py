"""The Draw page in-process (AppTest): model picker, uploads, Quick train (bad files: test_bad_input.py).

AppTest cannot draw on the canvas (a custom component: it renders, and always reads as empty); strokes
are tested in Chromium (test_e2e_draw.py). Uploads go through AppTest's file_uploader.set_value.
"""
import io
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from conftest import REPO, tiny_config
from lstm_core.jobs import request_stop
from lstm_core.recorder import RunRecorder
from lstm_core.runs import LIVE_STATES, create_run, list_runs, open_run, process_start_time
from lstm_core.train import fit

PAGE = str(REPO / "pages" / "draw.py")


def page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    return at


def png(pixels, size: int = 200) -> bytes:
    """A uint8 image (array or tensor) as PNG bytes, upscaled like a photo or screenshot of a digit."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).resize((size, size), Image.BILINEAR).save(buffer, "PNG")
    return buffer.getvalue()


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader(key="draw_upload").set_value((name, data, "image/png")).run()
    assert not at.exception
    return at


def charts(at: AppTest, name: str) -> list[dict]:
    """The plotly figures (as dicts) whose element key ends with `name`, e.g. "upload_probs"."""
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart") if c.proto.id.endswith(f"-{name}")]


def shown_prediction(at: AppTest) -> tuple[int, list[float]]:
    """The predicted digit on the page and the probabilities of its bar chart."""
    (figure,) = charts(at, "upload_probs")
    bars = figure["data"][0]
    assert bars["type"] == "bar" and bars["x"] == [str(d) for d in range(10)]
    return int(at.metric[0].value), bars["y"]


@pytest.fixture
def trained(trained_saves, monkeypatch):
    monkeypatch.setenv("LSTM_SAVES", str(trained_saves))
    (run_id,) = [p.name for p in (trained_saves / "runs").iterdir()]
    return run_id


@pytest.fixture
def two_models(trained_saves, tmp_path, monkeypatch) -> list[str]:
    """A saves root with the trained run and a copy of it under another id (the same accuracy)."""
    root = tmp_path / "saves"
    (source,) = (trained_saves / "runs").iterdir()
    for suffix in ("a", "b"):
        shutil.copytree(source, root / "runs" / f"{source.name}-{suffix}")
    monkeypatch.setenv("LSTM_SAVES", str(root))
    return [f"{source.name}-a", f"{source.name}-b"]


# -- no model yet --------------------------------------------------------------------------------
def test_no_models_offers_quick_train_which_starts_a_background_run(saves):
    at = page()
    assert any("No trained model yet" in i.value for i in at.info)
    (button,) = [b for b in at.button if b.label == "Quick train"]
    assert not at.selectbox and not at.file_uploader

    button.click().run()
    assert not at.exception
    runs = list_runs()
    assert len(runs) == 1 and runs[0]["state"] in LIVE_STATES
    run_id = runs[0]["id"]
    assert at.session_state["draw_quick_run"] == run_id
    assert any(run_id in i.value for i in at.info)               # its progress, watched by the fragment
    assert not [b for b in at.button if b.label == "Quick train"]  # one quick run at a time

    run = open_run(run_id)
    request_stop(run)
    deadline = time.monotonic() + 180
    while run.status().get("state") in LIVE_STATES:
        assert time.monotonic() < deadline, "the quick-train run did not stop"
        time.sleep(0.5)


@pytest.fixture
def live_copy(trained_saves, saves):
    """A copy of the trained run in the empty saves root, marked running on behalf of a live process
    (this one): a training run that has not produced a model yet."""
    (source,) = (trained_saves / "runs").iterdir()
    shutil.copytree(source, saves / "runs" / source.name)
    run = open_run(source.name)
    run.write_status(state="running", pid=os.getpid(), pid_start=process_start_time(os.getpid()))
    return run


@pytest.mark.parametrize("started_here", [True, False], ids=["quick-train", "started-elsewhere"])
def test_a_training_run_is_watched_then_becomes_the_picked_model(live_copy, started_here):
    at = AppTest.from_file(PAGE, default_timeout=60)
    if started_here:
        at.session_state["draw_quick_run"] = live_copy.id
    at.run()
    assert not at.exception and not at.selectbox
    assert any(live_copy.id in i.value and "epoch 2/2 done" in i.value for i in at.info)
    assert not [b for b in at.button if b.label == "Quick train"]

    live_copy.write_status(state="completed")
    at.run()                                   # what the watching fragment's st.rerun leads to
    assert not at.exception
    assert at.selectbox[0].value == live_copy.id


def test_a_failed_quick_run_is_reported_and_quick_train_offered_again(live_copy):
    (live_copy.path / "best.pt").unlink()     # it failed before its first epoch ended
    live_copy.write_status(state="failed", error="RuntimeError: out of memory")
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["draw_quick_run"] = live_copy.id
    at.run()
    assert not at.exception and not at.selectbox
    (error,) = at.error
    assert live_copy.id in error.value and "out of memory" in error.value
    assert [b for b in at.button if b.label == "Quick train"]


# -- with a trained model ------------------------------------------------------------------------
def test_picker_lists_the_trained_run_and_the_canvas_renders(trained):
    at = page()
    (picker,) = at.selectbox
    assert picker.label == "Model" and picker.options[0].endswith(trained) and picker.value == trained
    assert not at.warning                                  # the canvas component imported fine
    assert any("Draw a digit" in i.value for i in at.info)  # an empty canvas gets a prompt
    assert not charts(at, "draw_probs")


def test_clear_gives_a_new_empty_canvas(trained):
    at = page()
    assert at.session_state["draw_canvas"] == 0
    (clear,) = [b for b in at.button if b.label == "Clear"]
    clear.click().run()
    assert not at.exception and at.session_state["draw_canvas"] == 1


def test_draw_run_preselects_a_model_and_a_pick_sticks(two_models):
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["draw_run"] = two_models[1]         # what the Train page sets before switching here
    at.run()
    assert not at.exception and at.selectbox[0].value == two_models[1]
    # picks in a row each stick (a selectbox whose index follows the pick would lose every other one)
    for pick in (two_models[0], two_models[1], two_models[0]):
        at.selectbox[0].set_value(pick).run()
        assert not at.exception and at.selectbox[0].value == pick and at.session_state["draw_run"] == pick


@pytest.mark.parametrize("dark_on_light", [False, True], ids=["light-on-dark", "dark-on-light"])
def test_an_uploaded_mnist_digit_gets_a_prediction(trained, mnist, dark_on_light):
    at = page()
    reference = None
    for index in range(3):
        image = mnist.test_images[index]
        upload(at, f"digit{index}.png", png(255 - image if dark_on_light else image))
        assert not at.error
        digit, probabilities = shown_prediction(at)
        assert len(probabilities) == 10 and sum(probabilities) == pytest.approx(1, abs=1e-4)
        assert int(np.argmax(probabilities)) == digit
        assert at.metric[1].value == f"{max(probabilities):.1%}"
        assert charts(at, "upload_input")                  # the 28x28 model input beside it
        assert charts(at, "upload_steps") and charts(at, "upload_hidden")  # a unidirectional LSTM
        inverted = any("inverted" in c.value for c in at.caption)
        assert inverted == dark_on_light
        if index == 0:
            reference = digit
    # the first test digit is a clear 7: the tiny model reads it in both polarities
    assert reference == int(mnist.test_labels[0]) == 7


def test_all_models_classifies_the_upload_with_every_model(two_models, mnist):
    at = page()
    upload(at, "seven.png", png(mnist.test_images[0]))
    at.toggle(key="draw_compare").set_value(True).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert len(table) == 2 and all(table["model"].str.contains("LSTM 1x48, rows"))
    digit, _ = shown_prediction(at)
    assert list(table["digit"]) == [digit, digit]          # copies of one model agree
    assert all(0 < c <= 1 for c in table["confidence"])


def test_a_blank_image_gets_a_prompt_not_a_prediction(trained):
    at = upload(page(), "blank.png", png(np.full((28, 28), 255, np.uint8)))
    assert any("No digit found in blank.png" in i.value for i in at.info)
    assert not charts(at, "upload_probs") and not at.metric and not at.error


# -- the gates at work ---------------------------------------------------------------------------
LSTM_FIGURES = ["forget_gate", "input_gate", "cell_state", "output_gate"]
GRU_FIGURES = ["update_gate", "reset_gate"]


@pytest.fixture(scope="module")
def cell_saves(tmp_path_factory, mnist) -> tuple:
    """A saves root with a tiny GRU run and a tiny plain RNN run: (root, {cell: run id})."""
    root = tmp_path_factory.mktemp("cells") / "saves"
    ids = {}
    for cell in ("gru", "rnn"):
        run = create_run(tiny_config(cell=cell, epochs=1), root)
        fit(run.config(), [RunRecorder(run)], data=mnist)
        ids[cell] = run.id
    return root, ids


def gate_figures(at: AppTest) -> dict[str, dict]:
    """The gate heatmaps on the page after an upload, by the name in their key."""
    return {name: figure for name in LSTM_FIGURES + GRU_FIGURES for figure in charts(at, f"upload_{name}")}


def test_the_gates_wait_for_their_toggle(trained, mnist):
    """Off by default (a stroke then costs no gate figures), with a line saying where they are."""
    at = upload(page(), "seven.png", png(mnist.test_images[0]))
    assert not gate_figures(at) and at.toggle(key="draw_gates").value is False
    assert any("Turn on **Gates**" in c.value for c in at.caption)


def test_the_lstms_gates_are_shown_under_its_reading(trained, mnist):
    at = page()
    at.toggle(key="draw_gates").set_value(True).run()
    at = upload(at, "seven.png", png(mnist.test_images[0]))
    assert "How the LSTM reads it" in [h.value for h in at.subheader]
    figures = gate_figures(at)
    assert list(figures) == LSTM_FIGURES
    for name, figure in figures.items():
        heatmap = figure["data"][0]
        assert len(heatmap["z"]) == 28 and len(heatmap["z"][0]) == 48      # rows read, hidden units
        if name != "cell_state":
            assert (heatmap["zmin"], heatmap["zmax"]) == (0, 1)
            assert all(0 <= v <= 1 for row in heatmap["z"] for v in row)
    captions = [c.value for c in at.caption]
    assert any(c.startswith("Forget gate: how much of its memory") for c in captions)
    assert any(c.startswith("Line t is the gate at row t") for c in captions)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_a_gru_shows_its_two_gates_and_a_plain_rnn_says_it_has_none(cell_saves, monkeypatch, mnist, cell):
    root, ids = cell_saves
    monkeypatch.setenv("LSTM_SAVES", str(root))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["draw_run"] = ids[cell]
    at.run()
    assert not at.exception and at.selectbox[0].value == ids[cell]
    at.toggle(key="draw_gates").set_value(True).run()
    upload(at, "seven.png", png(mnist.test_images[0]))
    assert f"How the {cell.upper()} reads it" in [h.value for h in at.subheader]
    assert charts(at, "upload_steps") and charts(at, "upload_hidden")
    captions = [c.value for c in at.caption]
    if cell == "gru":
        assert list(gate_figures(at)) == GRU_FIGURES
        assert any(c.startswith("Update gate: near 1 the GRU keeps its previous state") for c in captions)
    else:
        assert not gate_figures(at)
        assert any(c.startswith("The RNN has no gates") for c in captions)
