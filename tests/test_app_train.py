"""The Train page in-process (AppTest); training itself runs in real background processes."""
import json
import shlex
import subprocess
import sys
import time
from dataclasses import fields

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, tiny_config, wait_until
from lstm_core.__main__ import build_parser, config_from_args
from lstm_core.config import CELLS, TrainConfig, preset
from lstm_core.jobs import request_stop
from lstm_core.runs import create_run, open_run

PAGE = str(REPO / "pages" / "train.py")
ENTRY = str(REPO / "streamlit_app.py")
COMPARE = "Compare LSTM, GRU and RNN"
TINY = {"hidden_size": 48, "epochs": 1, "batch_size": 50, "limit_train": 2000, "val_size": 1000, "lr": 0.01,
        "optimizer": "adam", "scheduler": "none", "aug_rotate": 0.0, "aug_translate": 0.0, "aug_scale": 0.0,
        "log_every": 5}
LONG = {**TINY, "epochs": 50, "limit_train": 20000}


def page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    return at


def set_widgets(at: AppTest, values: dict) -> AppTest:
    for name, value in values.items():
        for kind in ("slider", "number_input", "selectbox", "toggle"):
            found = [w for w in getattr(at, kind) if w.key == name]
            if found:
                found[0].set_value(value)
                break
        else:
            raise AssertionError(f"no widget for {name}")
    return at.run()


def start(at: AppTest) -> str:
    (button,) = [b for b in at.button if b.label == "Start training"]
    button.click().run()
    assert not at.exception
    return at.session_state["train_run"]


def wait_for(run_id: str, states, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = open_run(run_id).status()
        if status.get("state") in states:
            return status
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} still {open_run(run_id).status()} after {timeout} s")


def wait_for_batches(run_id: str, timeout: float = 120) -> None:
    wait_until(lambda: any(r["event"] == "batch" for r in open_run(run_id).metrics()), timeout,
               f"run {run_id}'s first batches")


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def test_every_config_field_has_a_widget_and_the_form_matches_the_default_preset(saves):
    at = page()
    keys = {w.key for kind in ("slider", "number_input", "selectbox", "toggle") for w in getattr(at, kind)}
    assert {f.name for f in fields(TrainConfig)} <= keys
    default = preset("default")
    assert at.slider(key="hidden_size").value == default.hidden_size
    assert at.number_input(key="lr").value == default.lr
    assert any("No runs yet" in i.value for i in at.info)
    assert "82,186 trainable parameters" in [c.value for c in at.caption]
    at.slider(key="num_layers").set_value(2).run()                # the count follows the widgets
    assert f"{82186 + 4 * 128 * 258:,} trainable parameters" in [c.value for c in at.caption]


def test_a_preset_fills_the_widgets(saves):
    at = page()
    at.selectbox(key="preset").set_value("bilstm").run()
    assert at.toggle(key="bidirectional").value is True
    assert (at.slider(key="num_layers").value, at.slider(key="hidden_size").value) == (2, 128)
    assert at.selectbox(key="scheduler").value == "plateau" and at.slider(key="aug_rotate").value == 10.0
    at.selectbox(key="preset").set_value("tutorial").run()
    assert (at.slider(key="num_layers").value, at.slider(key="hidden_size").value) == (3, 95)
    assert at.number_input(key="weight_decay").value == pytest.approx(5.36e-6)


def test_copy_as_command_is_the_same_config_on_the_command_line(saves):
    at = set_widgets(page(), {"hidden_size": 64, "bidirectional": True, "lr": 0.002, "seq_mode": "pixels"})
    (command,) = [c.value for c in at.code]
    assert "--hidden-size 64" in command and "--bidirectional" in command
    widgets = TrainConfig(**{f.name: at.session_state[f.name] for f in fields(TrainConfig)})
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert config_from_args(args) == widgets


@pytest.mark.slow
def test_start_launches_a_background_run_that_completes_and_shows_its_results(saves):
    at = set_widgets(page(), TINY)
    run_id = start(at)
    assert open_run(run_id).config().hidden_size == 48
    status = wait_for(run_id, {"completed", "failed"})
    assert status["state"] == "completed", (open_run(run_id).path / "train.log").read_text()
    at.run()
    assert not at.exception
    figures = charts(at)
    curves = figures[0]
    assert [t["name"] for t in curves["data"]][:2] == ["train", "validation"]
    assert curves["data"][1]["y"] == [r["val_loss"] for r in open_run(run_id).epochs()]
    # beside the running loss: the gradient norms of the same progress records, on a log axis
    (gradients,) = [f for f in figures if f["data"][0].get("name") == "total (mean)"]
    batches = [r for r in open_run(run_id).metrics() if r["event"] == "batch"]
    assert gradients["data"][0]["y"] == [r["grad_norm"] for r in batches] and gradients["layout"]["yaxis"]["type"] == "log"
    (steps,) = [f for f in figures if f["layout"].get("xaxis", {}).get("range") == [0.5, 28.5]]
    assert steps["data"][-1]["y"] == batches[-1]["step_grad_norms"]       # the gradient reaching each row, latest
    heatmap = figures[-1]["data"][0]
    assert heatmap["type"] == "heatmap" and sum(map(sum, heatmap["z"])) == 10000
    test_accuracy = open_run(run_id).eval()["test_accuracy"]
    assert f"{test_accuracy:.2%}" in [m.value for m in at.metric]


@pytest.mark.slow
def test_stop_ends_a_run_as_cancelled_with_its_checkpoint(saves):
    at = set_widgets(page(), LONG)
    run_id = start(at)
    wait_for_batches(run_id)
    at.run()
    (stop,) = [b for b in at.button if b.label == "Stop"]
    stop.click().run()
    status = wait_for(run_id, {"cancelled", "completed", "failed"})
    assert status["state"] == "cancelled"
    run = open_run(run_id)
    assert run.last_path.exists() and run.best_path.exists() and len(run.epochs()) < 50
    at.run()
    assert "state **cancelled**" in " ".join(m.value for m in at.markdown)


@pytest.mark.slow
def test_a_second_run_on_the_same_device_is_queued_behind_the_first(saves):
    at = set_widgets(page(), LONG)
    first = start(at)
    wait_for(first, {"running"})
    second = start(at)
    assert any(f"busy with run {first}" in i.value and "queued" in i.value for i in at.info)
    # the second process needs a moment to start and ask for the device
    wait_until(lambda: open_run(second).status().get("waiting_for"), 120, f"run {second} asking for the device")
    assert open_run(second).status()["state"] == "queued"
    assert open_run(second).status().get("waiting_for") == first
    for run_id in (second, first):
        request_stop(open_run(run_id))
    assert wait_for(second, {"cancelled"})["state"] == "cancelled"
    assert wait_for(first, {"cancelled"})["state"] == "cancelled"
    assert open_run(second).epochs() == []                       # it never trained alongside the first


def test_a_run_whose_process_died_shows_as_interrupted(saves):
    run = create_run(TrainConfig(), saves)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.write_status(state="running", pid=dead.pid, pid_start=None)
    at = page()
    assert "state **interrupted**" in " ".join(m.value for m in at.markdown)
    assert any("ended without finishing" in w.value for w in at.warning)


@pytest.mark.slow
def test_resume_continues_a_stopped_run_to_its_end(saves):
    at = set_widgets(page(), {**LONG, "epochs": 4, "limit_train": 4000})
    run_id = start(at)
    wait_until(lambda: open_run(run_id).epochs(), 180, f"run {run_id}'s first epoch")
    at.run()
    (stop,) = [b for b in at.button if b.label == "Stop"]
    stop.click().run()
    assert wait_for(run_id, {"cancelled", "completed"})["state"] == "cancelled"
    at.run()
    (resume,) = [b for b in at.button if b.label == "Resume"]
    resume.click().run()
    assert not at.exception and not at.error
    status = wait_for(run_id, {"completed", "failed", "cancelled", "interrupted"}, timeout=240)
    assert status["state"] == "completed", (open_run(run_id).path / "train.log").read_text()
    assert [e["epoch"] for e in open_run(run_id).epochs()] == [1, 2, 3, 4]


def test_the_run_picker_keeps_the_users_choice(saves, mnist):
    from conftest import tiny_config
    from lstm_core.recorder import RunRecorder
    from lstm_core.train import fit
    ids = []
    for _ in range(3):
        run = create_run(tiny_config(epochs=1), saves)
        fit(run.config(), [RunRecorder(run)], data=mnist)
        ids.append(run.id)
    at = page()
    assert at.selectbox(key="train_pick").value == ids[-1]             # newest first
    for choice in (ids[0], ids[1], ids[0]):
        at.selectbox(key="train_pick").set_value(choice).run()
        assert at.selectbox(key="train_pick").value == choice
        assert f"**Run `{choice}`**" in " ".join(m.value for m in at.markdown)


def widgets_in_order(node):
    """The widgets under a block, in page order (depth first)."""
    for child in getattr(node, "children", {}).values():
        if getattr(child, "label", None):
            yield child
        yield from widgets_in_order(child)


def test_start_comes_first_in_the_form_and_the_picker_names_no_state(saves, mnist):
    """The primary action sits above the fifteen widgets of the form, in view without scrolling; the run
    picker's labels carry no state, which it would keep showing stale while the run moved on."""
    run = create_run(tiny_config(), saves)                    # queued, as a run waiting for its device is
    at = page()
    (left, _) = at.columns[:2]
    first, *rest = widgets_in_order(left)
    assert first.label == "Start training" and len(rest) >= 15
    assert at.selectbox(key="train_pick").value == run.id
    assert at.selectbox(key="train_pick").options == [f"{run.id} · LSTM 1x48, rows"]
    assert any("state **queued**" in m.value for m in at.markdown)       # the live view says the state
    run.write_status(state="running")
    at.run()
    assert any("state **running**" in m.value for m in at.markdown)
    assert at.selectbox(key="train_pick").options == [f"{run.id} · LSTM 1x48, rows"]


def test_the_cell_is_asked_after_the_arch_and_sizes_the_model(saves):
    at = page()
    (left, _) = at.columns[:2]
    labels = [w.label for w in widgets_in_order(left)]
    assert labels[labels.index("arch") + 1] == "recurrent cell"
    cell = at.selectbox(key="cell")
    assert (cell.value, cell.options) == ("lstm", list(CELLS))
    cell.set_value("gru").run()
    # three gates where the LSTM has four, each with its input, recurrent and two bias weights
    assert f"{3 * 128 * (28 + 128 + 2) + 128 * 10 + 10:,} trainable parameters" in [c.value for c in at.caption]


def compare(at: AppTest) -> AppTest:
    (button,) = [b for b in at.button if b.label == COMPARE]
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_compare_launches_the_three_cells_alike_and_opens_the_runs_page_on_them(saves):
    at = AppTest.from_file(ENTRY, default_timeout=60).run()
    at.switch_page("pages/train.py").run()
    at = compare(set_widgets(at, {**TINY, "seed": 3, "cell": "irnn"}))
    assert [t.value for t in at.title] == ["Runs"]
    ids = at.session_state["runs_opened"]
    configs = [open_run(run_id).config() for run_id in ids]
    assert [c.cell for c in configs] == ["lstm", "gru", "rnn"]
    assert all({**c.to_dict(), "cell": "lstm"} == configs[0].to_dict() for c in configs)
    assert configs[0].seed == 3 and configs[0].hidden_size == TINY["hidden_size"]
    # one device here: the first takes it, the other two queue behind it
    (notice,) = [i.value for i in at.info]
    assert notice.startswith(f"Comparing LSTM, GRU, RNN: {ids[0]} (LSTM) on cpu; {ids[1]} (GRU) queued; ")
    assert any(c.value.startswith(f"Showing `{ids[0]}`") for c in at.caption)


@pytest.mark.slow
def test_the_compared_runs_end_side_by_side_with_their_gradients_over_time(saves):
    at = AppTest.from_file(ENTRY, default_timeout=60).run()
    at.switch_page("pages/train.py").run()
    at = compare(set_widgets(at, TINY))
    ids = at.session_state["runs_opened"]
    for run_id in ids:
        status = wait_for(run_id, {"completed", "failed", "interrupted"}, timeout=240)
        assert status["state"] == "completed", (open_run(run_id).path / "train.log").read_text()
    at.switch_page("pages/runs.py").run()        # AppTest's next run is of its own page, not the one switched to
    assert not at.exception
    (gradients,) = [c for c in charts(at) if "time step" in json.dumps(c["layout"]["xaxis"])]
    accuracies = [open_run(run_id).eval()["test_accuracy"] for run_id in ids]
    assert [t["name"] for t in gradients["data"]] == [f"{run_id} · {cell} · {accuracy:.1%}" for run_id, cell, accuracy
                                                      in zip(ids, ("LSTM", "GRU", "RNN"), accuracies)]


def test_compare_is_for_recurrent_cells_and_a_refused_launch_says_why(saves):
    at = page()
    at.selectbox(key="preset").set_value("cnn").run()
    (button,) = [b for b in at.button if b.label == COMPARE]
    assert button.disabled and "a CNN has no cell" in button.help
    at.selectbox(key="preset").set_value("default").run()
    (saves / "runs").write_text("")                   # a saves folder that cannot take a run
    at = compare(at)
    assert [t.value for t in at.title] == ["Train"]
    (error,) = at.error
    assert "is a file, not a folder" in error.value and "runs_opened" not in at.session_state
