import json
import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import StopAt, tiny_config
from lstm_core.config import TrainConfig
from lstm_core.data import make_splits
from lstm_core.evaluate import evaluate
from lstm_core.checkpoints import atomic_torch_save, load_model, resume_checkpoint
from lstm_core.models import build_model
from lstm_core.recorder import RunRecorder
from lstm_core.runs import Run, RunError, create_run, format_seconds, list_runs, read_jsonl
from lstm_core.train import Callback, fit


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist):
    root = tmp_path_factory.mktemp("runs")
    run = create_run(tiny_config(), root)
    history = fit(run.config(), [RunRecorder(run)], data=mnist)
    return run, history


def test_a_finished_run_has_the_whole_layout(finished):
    run, history = finished
    for name in ("config.json", "metrics.jsonl", "status.json", "best.pt", "last.pt", "final_state_dict.pth",
                 "eval.json", "curves.svg"):
        assert (run.path / name).is_file(), name
    assert not list(run.path.glob("*.tmp")) and not list(run.path.glob(".*.tmp"))
    status = run.status()
    assert status["state"] == "completed" and status["device"] == "cpu"
    assert status["pid"] == os.getpid() and status["started_at"] <= status["ended_at"]
    assert run.config() == tiny_config()
    events = [r["event"] for r in run.metrics()]
    assert events[0] == "start" and events[-1] == "end" and events.count("epoch") == 2 and "batch" in events
    ev = run.eval()
    assert ev["test_accuracy"] == history.test["accuracy"] and ev["macro_f1"] == history.test["macro_f1"]
    assert len(ev["confusion_matrix"]) == 10 and sum(map(sum, ev["confusion_matrix"])) == 10000
    assert len(ev["per_class"]) == 10 and ev["best_epoch"] == history.best_epoch


def test_checkpoints_load_safely_and_rebuild_the_model(finished, mnist):
    run, history = finished
    ckpt = torch.load(run.last_path, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"] == tiny_config().to_dict() and ckpt["optimizer"]["state"]
    model, config = load_model(run.path)
    splits = make_splits(mnist, config)
    again = evaluate(model, splits.test_x, splits.test_y, config)
    assert again["accuracy"] == run.eval()["test_accuracy"]       # the saved model is the tested model
    plain = build_model(config)
    plain.load_state_dict(torch.load(run.final_path, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))


def test_curves_plot_is_a_self_contained_svg(finished):
    run, _ = finished
    root = ET.fromstring(run.plot_path.read_text())
    text = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert {"loss", "accuracy", "error", "train", "validation"} <= set(text.split())
    assert len(list(root.iter("{http://www.w3.org/2000/svg}polyline"))) == 6   # 3 panels x train/val
    assert "http" not in run.plot_path.read_text().replace("http://www.w3.org/2000/svg", "")


def test_list_runs_summarizes(finished):
    run, history = finished
    (row,) = list_runs(run.path.parent.parent)
    assert row["id"] == run.id and row["state"] == "completed" and row["epochs_done"] == 2
    assert row["best_val_accuracy"] == history.best_val_accuracy and row["test_accuracy"] == history.test["accuracy"]
    assert row["duration_s"] > 0


def test_a_dead_process_reads_as_interrupted(tmp_path):
    run = create_run(TrainConfig(), tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.write_status(state="running", pid=dead.pid, pid_start=None)
    assert run.status()["state"] == "interrupted"
    assert json.loads(run.status_path.read_text())["state"] == "interrupted"   # persisted
    alive = create_run(TrainConfig(), tmp_path)
    assert alive.status()["state"] == "queued"                                  # this process is alive


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "epoch", "epoch": 1}\n{"event": "epoch", "epoch": 2}\n{"event": "ep')
    assert [r["epoch"] for r in read_jsonl(path)] == [1, 2]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"a": lambda: 0}, path)  # cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_stop_mid_epoch_keeps_the_last_epoch_checkpoint_and_reads_cancelled(tmp_path, mnist):
    run = create_run(tiny_config(epochs=3, log_every=1), tmp_path)
    stop = threading.Event()
    fit(run.config(), [RunRecorder(run), StopAt(stop, 1, 5)], stop=stop, data=mnist)   # in epoch 2
    assert run.status()["state"] == "cancelled"
    last = torch.load(run.last_path, weights_only=True)
    assert not last["partial"] and last["epoch"] == 1                # the end of epoch 1: resumable
    assert run.best_path.exists() and run.eval()["stopped"] == "cancelled"


def test_a_stop_in_the_first_epoch_still_saves_its_weights(tmp_path, mnist):
    run = create_run(tiny_config(epochs=3, log_every=1), tmp_path)
    stop = threading.Event()
    fit(run.config(), [RunRecorder(run), StopAt(stop, 0, 5)], stop=stop, data=mnist)
    last = torch.load(run.last_path, weights_only=True)
    assert last["partial"] and last["epoch"] == 0 and run.best_path.exists()
    with pytest.raises(RunError, match="nothing to resume"):
        resume_checkpoint(run)


@pytest.mark.parametrize("cell", ["lstm", "gru", "irnn"])
def test_resuming_after_a_stop_gives_the_same_run_as_never_stopping(tmp_path, mnist, cell):
    config = tiny_config(epochs=4, log_every=1, dropout=0.2, scheduler="onecycle", patience=0,
                         aug_rotate=5.0, aug_translate=0.05, cell=cell,
                         **({"num_layers": 2} if cell == "gru" else {}))
    straight = create_run(config, tmp_path)
    fit(config, [RunRecorder(straight)], data=mnist)

    stopped = create_run(config, tmp_path)
    stop = threading.Event()
    fit(config, [RunRecorder(stopped), StopAt(stop, 2, 3)], stop=stop, data=mnist)   # dies in epoch 3
    assert len(stopped.epochs()) == 2
    history = fit(config, [RunRecorder(stopped)], data=mnist, resume=resume_checkpoint(stopped))
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3, 4]
    assert [e["val_loss"] for e in history.epochs] == [e["val_loss"] for e in straight.epochs()]
    assert history.test["accuracy"] == straight.eval()["test_accuracy"]
    a = torch.load(straight.final_path, weights_only=True)
    b = torch.load(stopped.final_path, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_marks_the_run_failed_with_the_error(tmp_path, mnist):
    run = create_run(tiny_config(), tmp_path)

    class Crash(Callback):
        def on_epoch_end(self, state, record):
            raise MemoryError("out of memory")

    with pytest.raises(MemoryError):
        fit(run.config(), [RunRecorder(run), Crash()], data=mnist)
    status = run.status()
    assert status["state"] == "failed" and "out of memory" in status["error"]


def test_unreadable_files_do_not_break_listing(tmp_path, finished):
    run = create_run(TrainConfig(), tmp_path)
    run.status_path.unlink()
    run.status_path.mkdir()                        # a directory where a file should be
    (run.path / "eval.json").write_text("[1, 2]")  # JSON, but not an object
    rows = list_runs(tmp_path)
    assert [r["id"] for r in rows] == [run.id] and rows[0]["state"] == "unknown"
    assert isinstance(Run(run.path).status(), dict)


def test_durations_read_as_minutes_and_seconds_then_hours():
    assert [format_seconds(s) for s in (-3, 0, 59.9, 61, 3599, 3600, 2 * 3600 + 5 * 60 + 7)] == \
        ["0:00", "0:00", "0:59", "1:01", "59:59", "1:00:00", "2:05:07"]


def test_progress_is_written_by_time_not_by_batch(tmp_path, mnist):
    """A GPU finishes many progress windows a second: their records are held back and written together, and
    the status heartbeat (an fsync) at most once per interval; none is lost."""
    run = create_run(tiny_config(log_every=1), tmp_path)
    seen = []

    class LinesWritten(Callback):
        def on_batch(self, state, record):
            seen.append(len(read_jsonl(run.metrics_path)))

    fit(run.config(), [RunRecorder(run, progress_seconds=3600), LinesWritten()], data=mnist)
    assert seen[0] == 2 and seen[1:40] == [2] * 39          # "start" and the first batch, then held back
    events = [r["event"] for r in run.metrics()]
    assert events.count("batch") == 2 * 40 and events.count("epoch") == 2
    assert events.index("epoch") == 41                      # the first epoch's batches were written before it


def test_checkpoints_hold_every_random_stream_on_the_cpu(finished):
    run, _ = finished
    last = torch.load(run.last_path, weights_only=True)
    assert set(last["rng"]) == {"torch", "generator", "cuda"} and last["rng"]["cuda"] is None   # a CPU run


def test_a_line_torn_by_a_kill_is_cut_before_a_resumed_run_appends(tmp_path, mnist):
    config = tiny_config(epochs=3, log_every=1)
    run = create_run(config, tmp_path)
    stop = threading.Event()
    fit(config, [RunRecorder(run), StopAt(stop, 1, 5)], stop=stop, data=mnist)
    with open(run.metrics_path, "a") as f:
        f.write('{"event": "batch", "epoch": 2, "lo')                   # killed in the middle of a write
    fit(config, [RunRecorder(run)], data=mnist, resume=resume_checkpoint(run))
    lines = run.metrics_path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)                     # every line parses: none glued to the tear
    assert [r["epoch"] for r in run.epochs()] == [1, 2, 3]
