"""The Runs page under AppTest: the table, overlaid curves and gradients over time of selected rows (or of
the runs another page opened it on), weight downloads, deletion with its confirmation, and the runs it must
refuse to delete."""
import json
import os
from pathlib import Path

import pytest
from conftest import tiny_config
from streamlit.testing.v1 import AppTest

from lstm_core.config import TrainConfig
from lstm_core.recorder import RunRecorder
from lstm_core.runs import append_jsonl, atomic_write_json, create_run, open_run
from lstm_core.train import fit

RUNS = str(Path(__file__).resolve().parent.parent / "pages" / "runs.py")


def make_runs(root: Path, mnist, hidden_sizes=(32, 48)) -> list[str]:
    """Real one-epoch runs, newest first (the table's order)."""
    ids = []
    for hidden_size in hidden_sizes:
        run = create_run(tiny_config(epochs=1, hidden_size=hidden_size), root)
        fit(run.config(), [RunRecorder(run)], data=mnist)
        ids.append(run.id)
    return ids[::-1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, mnist) -> tuple[Path, list[str]]:
    """A saves root with two completed runs, for tests that only read it."""
    root = tmp_path_factory.mktemp("two_runs") / "saves"
    return root, make_runs(root, mnist)


@pytest.fixture
def read_only(two_runs, monkeypatch) -> list[str]:
    root, ids = two_runs
    monkeypatch.setenv("LSTM_SAVES", str(root))
    return ids


def check(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_page() -> AppTest:
    return check(AppTest.from_file(RUNS, default_timeout=60).run())


def select(at: AppTest, ids: list[str]) -> AppTest:
    """Select the rows holding `ids`, as a click in the table would (AppTest sets a dataframe's
    selection through its session-state key)."""
    table = at.dataframe[0]
    rows = [list(table.value["id"]).index(run_id) for run_id in ids]
    at.session_state[table.key] = {"selection": {"rows": rows, "columns": [], "cells": []}}
    return check(at.run())


def listed(at: AppTest) -> list[str]:
    return list(at.dataframe[0].value["id"]) if at.dataframe else []


def traces(at: AppTest, axis: str = "epoch") -> list[dict]:
    """The traces of the chart whose x axis title starts with `axis`: the curves ("epoch") or the gradient
    over time ("time step")."""
    charts = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    (chart,) = [c for c in charts if c["layout"]["xaxis"]["title"]["text"].startswith(axis)]
    return chart["data"]


def downloads(at: AppTest) -> list[str]:
    return [b.label for b in at.get("download_button")]


def click(at: AppTest, key: str) -> AppTest:
    return check(at.button(key=key).click().run())


def test_empty_saves_shows_the_no_runs_message(saves):
    at = open_page()
    assert len(at.info) == 1 and "No runs yet" in at.info[0].value
    assert not at.dataframe and not at.error and not at.get("plotly_chart")


def test_table_lists_every_run_newest_first(read_only, two_runs):
    root, _ = two_runs
    at = open_page()
    assert listed(at) == read_only
    table = at.dataframe[0].value
    assert list(table["state"]) == ["completed", "completed"]
    assert list(table["hidden_size"]) == [48, 32]
    evaluation = json.loads((root / "runs" / read_only[0] / "eval.json").read_text())
    assert table["test_accuracy"][0] == pytest.approx(100 * evaluation["test_accuracy"])
    # what people compare comes first, in view without scrolling sideways
    assert list(at.dataframe[0].proto.column_order)[:5] == ["id", "state", "test_accuracy", "best_val_accuracy",
                                                            "model"]
    assert table["model"][1] == "LSTM 1x32, rows"
    # nothing selected: a hint, and no chart, downloads or delete button
    assert any("Select rows" in c.value for c in at.caption)
    assert not at.get("plotly_chart") and not downloads(at) and not at.button


def test_selected_runs_get_one_curve_each(read_only):
    at = select(open_page(), read_only)
    data = traces(at)
    assert [t["name"] for t in data] == read_only
    for trace, run_id in zip(data, read_only):
        epochs = open_run(run_id).epochs()
        assert trace["x"] == [1] and trace["y"] == [e["val_accuracy"] for e in epochs]

    at = check(at.selectbox(key="metric").set_value("train_loss").run())
    data = traces(at)
    assert [t["name"] for t in data] == read_only          # the selection survives the metric change
    assert [t["y"] for t in data] == [[e["train_loss"] for e in open_run(i).epochs()] for i in read_only]

    at = select(at, read_only[1:])
    assert [t["name"] for t in traces(at)] == read_only[1:]


def test_a_selected_run_offers_its_weights(read_only):
    at = select(open_page(), read_only[:1])
    assert downloads(at) == ["Download final_state_dict.pth", "Download best.pt"]
    assert all(b.proto.deferred_file_id for b in at.get("download_button"))  # read on click
    assert any(c.value.startswith("Python ") and "threads" in c.value for c in at.caption)   # where it trained
    at = select(at, read_only)
    assert downloads(at) == ["Download final_state_dict.pth", "Download best.pt"] * 2
    assert len(at.expander) == 2


def test_only_the_weights_that_exist_are_offered(saves, mnist):
    (run_id,) = make_runs(saves, mnist, hidden_sizes=(32,))
    open_run(run_id).best_path.unlink()
    at = select(open_page(), [run_id])
    assert downloads(at) == ["Download final_state_dict.pth"]
    open_run(run_id).final_path.unlink()
    open_run(run_id).environment_path.unlink()
    at = check(at.run())
    assert any("Environment not recorded" in c.value for c in at.caption)
    assert not downloads(at) and any("No weights" in c.value for c in at.caption)


def test_delete_asks_first_then_removes_the_run(saves, mnist):
    gone, keep = make_runs(saves, mnist)
    at = select(open_page(), [gone])
    at = click(at, "delete_selected")
    assert (saves / "runs" / gone).is_dir()           # nothing deleted before the confirmation
    assert len(at.warning) == 1 and gone in at.warning[0].value and keep not in at.warning[0].value

    at = click(at, "delete_yes")
    assert not (saves / "runs" / gone).exists() and (saves / "runs" / keep).is_dir()
    assert listed(at) == [keep]
    assert not at.warning and not at.error and gone in at.success[0].value
    # the table starts without a selection rather than pointing at the run that moved up into row 0
    assert not at.get("plotly_chart") and not at.button
    assert at.session_state["confirm_delete"] == []


def test_cancel_keeps_the_run(saves, mnist):
    (run_id,) = make_runs(saves, mnist, hidden_sizes=(32,))
    at = click(select(open_page(), [run_id]), "delete_selected")
    at = click(at, "delete_cancel")
    assert (saves / "runs" / run_id).is_dir()
    assert listed(at) == [run_id] and not at.warning and not at.success
    assert at.session_state["confirm_delete"] == []


def test_a_running_run_is_refused_and_the_others_still_go(saves, mnist):
    running, done = make_runs(saves, mnist)
    open_run(running).write_status(state="running", pid=os.getpid())  # alive: this very process
    at = click(select(open_page(), [running, done]), "delete_selected")
    at = click(at, "delete_yes")
    assert (saves / "runs" / running).is_dir() and not (saves / "runs" / done).exists()
    assert len(at.error) == 1 and running in at.error[0].value and "stop it before deleting it" in at.error[0].value
    assert listed(at) == [running]
    # the message is shown once, not on every later rerun
    assert not check(at.run()).error


def test_an_unreadable_run_folder_is_listed_not_a_traceback(saves):
    run = saves / "runs" / "20260101-000000-abcdef"
    (run / "metrics.jsonl").mkdir(parents=True)   # a file the listing cannot read
    (run / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    at = open_page()
    assert not at.error and not at.exception
    table = at.dataframe[0].value
    assert list(table["id"]) == [run.name] and list(table["epochs_done"]) == [0]


def test_selected_runs_overlay_their_gradient_over_time_named_by_cell_and_accuracy(read_only):
    at = select(open_page(), read_only)
    data = traces(at, "time step")
    for trace, run_id in zip(data, read_only, strict=True):
        run = open_run(run_id)
        latest = [r for r in run.metrics() if r.get("step_grad_norms")][-1]
        assert trace["name"] == f"{run_id} · LSTM · {run.eval()['test_accuracy']:.1%}"
        assert trace["y"] == [v or None for v in latest["step_grad_norms"]]
    assert any("towards step 1" in c.value for c in at.caption)


def recorded_run(root: Path, config: TrainConfig, test_accuracy: float, state: str = "completed") -> str:
    """A run folder made by hand: one epoch, one record of the gradient over time, its test accuracy."""
    run = create_run(config, root)
    run.write_status(state=state, pid=None)
    append_jsonl(run.metrics_path,
                 {"event": "batch", "epoch": 1, "batch": 10, "batches": 10, "loss": 0.5, "accuracy": 0.8,
                  "grad_norm": 1.0, "grad_norm_max": 2.0, "step_grad_norms": [10.0 ** (k - 27) for k in range(28)]},
                 {"event": "epoch", "epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "train_accuracy": 0.8,
                  "val_accuracy": 0.85})
    atomic_write_json(run.eval_path, {"test_accuracy": test_accuracy})
    return run.id


def test_the_runs_the_train_page_opened_stand_as_the_selection_until_rows_are_picked(saves):
    cells = {"lstm": 0.981, "gru": 0.979, "rnn": 0.114}
    opened = [recorded_run(saves, TrainConfig(cell=cell, seq_mode="pixels"), acc) for cell, acc in cells.items()]
    cnn = recorded_run(saves, TrainConfig(arch="cnn"), 0.99)
    at = AppTest.from_file(RUNS, default_timeout=60)
    at.session_state["runs_opened"] = [*opened, cnn, "deleted-since"]
    at.session_state["runs_notice"] = "Comparing LSTM, GRU, RNN: ..."
    check(at.run())
    assert [i.value for i in at.info] == ["Comparing LSTM, GRU, RNN: ..."]
    assert any(c.value.startswith(f"Showing `{opened[0]}`") for c in at.caption)
    models = dict(zip(at.dataframe[0].value["id"], at.dataframe[0].value["model"]))
    assert [models[run_id] for run_id in opened] == ["LSTM 1x128, pixels", "GRU 1x128, pixels", "RNN 1x128, pixels"]
    assert [t["name"] for t in traces(at)] == [*opened, cnn]
    assert [t["name"] for t in traces(at, "time step")] == [f"{opened[0]} · LSTM · 98.1%",
                                                           f"{opened[1]} · GRU · 97.9%",
                                                           f"{opened[2]} · RNN · 11.4%"]
    assert any(c.value.startswith(f"No gradient over time for `{cnn}`") for c in at.caption)
    assert not at.error

    at = select(at, [opened[1]])
    assert [t["name"] for t in traces(at)] == [opened[1]] and "runs_opened" not in at.session_state
    assert not at.info                                  # the notice is shown once
    at = select(at, [])
    assert not at.get("plotly_chart") and any("Select rows" in c.value for c in at.caption)
