"""What the pages show of runs, as data, and what they do to several at once; over run folders made by
hand (no training)."""
import os

import pytest

from lstm_core.config import TrainConfig
from lstm_core.runs import append_jsonl, atomic_write_json, create_run, list_runs, open_run, process_start_time
from app.runview import (batch_progress, default_run, delete_runs, ended_note, epoch_metrics, eval_metrics,
                         evaluated_label, live_runs, model_label, run_curves, run_progress, run_step_gradients,
                         runs_table, selection_key, weight_files)

ROW = {"id": "r1", "arch": "lstm", "bidirectional": False, "num_layers": 1, "hidden_size": 128, "seq_mode": "rows",
       "test_accuracy": 0.9876, "best_val_accuracy": 0.99}
EPOCHS = [{"event": "epoch", "epoch": 1, "val_accuracy": 0.9, "val_loss": 0.3, "time": 10.0},
          {"event": "epoch", "epoch": 2, "val_accuracy": 0.95, "val_loss": 0.2, "time": 20.0}]
BATCH = {"event": "batch", "epoch": 3, "batch": 20, "batches": 40, "step": 100, "steps": 200, "eta": 75,
         "samples_per_s": 12345.6, "lr": 0.00123, "time": 25.0}


def made_run(saves, state: str = "completed", epochs: list[dict] = (), live: bool = False):
    run = create_run(TrainConfig(epochs=4), saves)
    run.write_status(state=state, **({"pid": os.getpid(), "pid_start": process_start_time(os.getpid())}
                                     if live else {"pid": None}))
    if epochs:
        append_jsonl(run.metrics_path, *epochs)
    return run


def test_labels_of_models_and_evaluated_runs():
    assert model_label(ROW) == "LSTM 1x128, rows · test 98.8% · r1"
    assert model_label({**ROW, "test_accuracy": None}) == "LSTM 1x128, rows · val 99.0% · r1"
    cnn = {**ROW, "arch": "cnn", "test_accuracy": None, "best_val_accuracy": None}
    assert model_label(cnn) == "CNN · val 0.0% · r1"
    assert evaluated_label(ROW) == "r1 · run · test 98.76%"
    assert evaluated_label({**ROW, "id": "s/trial_0", "kind": "trial"}) == "s/trial_0 · trial · test 98.76%"
    assert evaluated_label({**ROW, "test_accuracy": None}) == "r1"


def test_the_progress_of_a_run_being_waited_for(saves):
    queued = made_run(saves, "queued", live=True)
    assert run_progress(queued.id) == ("queued", f"Run `{queued.id}` is queued: loading the data, or waiting for "
                                                 "the CPU to be free.")
    running = made_run(saves, "running", EPOCHS, live=True)
    state, line = run_progress(running.id)
    assert state == "running" and ": epoch 2/4 done, validation accuracy 95.0%" in line
    assert ": first epoch" in run_progress(made_run(saves, "running", live=True).id)[1]
    failed = made_run(saves, "failed")
    failed.write_status(error="RuntimeError: out of memory")
    assert run_progress(failed.id) == ("failed", f"Run `{failed.id}` ended failed: RuntimeError: out of memory.")
    state, line = run_progress("no-such-run")
    assert state == "unknown" and line.startswith("Cannot read run `no-such-run`: no run 'no-such-run'")


def test_the_progress_bar_of_a_live_run():
    assert batch_progress({"state": "queued", "waiting_for": "r0"}, None, [], 4) == (
        0.0, "queued behind run r0: loading data and waiting for the device")
    assert batch_progress({"state": "queued"}, None, [], 4)[1].startswith("queued: loading data")
    assert batch_progress({"state": "running"}, None, [], 4) == (0.0, "starting: loading data")
    fraction, line = batch_progress({"state": "running"}, BATCH, EPOCHS, 4)
    assert fraction == 0.5
    assert line == "epoch 3/4 · batch 20/40 · ETA 1:15 · 12,346 samples/s · lr 1.23e-03"
    just_ended = EPOCHS + [{**EPOCHS[-1], "epoch": 3, "time": 30.0}]
    assert batch_progress({"state": "running"}, BATCH, just_ended, 4)[0] == 0.75


def test_the_run_to_show_first():
    runs = [{"id": "new", "state": "completed"}, {"id": "live", "state": "running"}, {"id": "old", "state": "failed"}]
    assert default_run(runs, "old") == "old"
    assert default_run(runs, "gone") == "live"
    assert default_run(runs[:1], None) == "new" and default_run([], None) is None


def test_how_a_run_ended():
    assert ended_note({"state": "failed", "error": "boom"}) == ("error", "Training failed: boom")
    level, line = ended_note({"state": "interrupted"})
    assert level == "warning" and "killed or crashed" in line and "last checkpoint is kept" in line
    assert ended_note({"state": "completed"}) is None and ended_note({"state": "cancelled"}) is None


def test_metrics_of_epochs_and_of_the_test_set():
    assert epoch_metrics(EPOCHS, 4) == [("epoch", "2/4"), ("val accuracy", "95.00%"), ("val loss", "0.2000"),
                                        ("best val accuracy", "95.00%")]
    evaluation = {"test_accuracy": 0.98765, "test_loss": 0.05, "macro_f1": 0.9876}
    assert eval_metrics(evaluation, "test_accuracy", "macro_f1") == [("test accuracy", "98.77%"),
                                                                     ("macro F1", "0.9876")]
    assert [label for label, _ in eval_metrics(evaluation)] == ["test accuracy", "test loss", "macro precision",
                                                                "macro recall", "macro F1"]
    assert dict(eval_metrics(evaluation))["macro recall"] == "–"


def test_the_runs_table_in_percent_with_models_in_words(saves):
    made_run(saves)
    table = runs_table([{**ROW, "created_at": 0.0}, {**ROW, "id": "r2", "test_accuracy": None, "created_at": None}])
    assert list(table["test_accuracy"])[0] == pytest.approx(98.76) and table["test_accuracy"].isna()[1]
    assert list(table["model"]) == ["LSTM 1x128, rows"] * 2 and str(table["created_at"][0]) == "1970-01-01 00:00:00"
    assert list(runs_table(list_runs())["state"]) == ["completed"]


def test_delete_runs_refuses_a_live_one_and_deletes_the_others(saves):
    done, live = made_run(saves), made_run(saves, "running", live=True)
    deleted, errors = delete_runs([done.id, live.id, "no-such-run"])
    assert deleted == [done.id] and not done.path.exists() and live.path.exists()
    assert errors[0].startswith(f"Could not delete `{live.id}`: ") and "stop it before deleting it" in errors[0]
    assert errors[1].startswith("Could not delete `no-such-run`: ")


def test_curves_of_the_runs_that_have_them(saves):
    trained, fresh = made_run(saves, epochs=EPOCHS), made_run(saves)
    curves, notes = run_curves([trained.id, fresh.id, "no-such-run"])
    assert curves == {trained.id: EPOCHS}
    assert notes[0] == ("caption", f"`{fresh.id}` has not finished an epoch yet.")
    assert notes[1][0] == "error" and notes[1][1].startswith("Could not read the metrics of `no-such-run`: ")


def test_weight_files_are_the_ones_saved(saves):
    run = made_run(saves)
    assert weight_files(run) == []
    run.best_path.write_bytes(b"best")
    run.final_path.write_bytes(b"final")
    assert weight_files(open_run(run.id)) == [("final_state_dict.pth", run.final_path), ("best.pt", run.best_path)]


def test_a_selection_key_changes_with_the_rows():
    assert selection_key("t", ["a", "b"]) == selection_key("t", ["a", "b"]) != selection_key("t", ["b"])
    assert selection_key("t", ["a"]).startswith("t-")


def test_the_environment_in_one_line():
    from app.runview import environment_text
    assert "not recorded" in environment_text({})
    cpu = {"python": "3.11.7", "torch": "2.14.1", "cuda": None, "optuna": "5.1.0", "cpu": "AMD EPYC", "threads": 2,
           "gpu": None, "git_commit": "0123456789abcdef-dirty"}
    assert environment_text(cpu) == ("Python 3.11.7 · torch 2.14.1 · Optuna 5.1.0 · CPU AMD EPYC, 2 threads · "
                                     "commit 0123456789ab (uncommitted changes)")
    gpu = {**cpu, "cuda": "13.0", "cudnn": 91000, "gpu": "NVIDIA H200", "gpu_capability": "9.0", "git_commit": None}
    line = environment_text(gpu)
    assert "CUDA 13.0, cuDNN 91000" in line and "GPU NVIDIA H200 (compute capability 9.0)" in line
    assert line.endswith("no git commit")


def test_a_folder_that_cannot_be_read_has_no_gradients_and_no_environment(tmp_path):
    from app.runview import gradient_records, run_environment
    assert gradient_records(tmp_path / "gone") == [] and run_environment(tmp_path / "gone") == {}


def gradient_run(saves, config: TrainConfig, norms: list[list[float]], test_accuracy: float | None = None):
    """A run that recorded the gradient over time once per list of `norms`, in that order."""
    run = create_run(config, saves)
    run.write_status(state="completed", pid=None)
    append_jsonl(run.metrics_path, *({**BATCH, "epoch": 1, "batch": b + 1, "batches": 4, "step_grad_norms": n}
                                     for b, n in enumerate(norms)), *EPOCHS)
    if test_accuracy is not None:
        atomic_write_json(run.eval_path, {"test_accuracy": test_accuracy})
    return run


def test_the_gradient_over_time_of_each_run_named_by_its_cell_and_accuracy(saves):
    lstm = gradient_run(saves, TrainConfig(), [[1.0] * 28, [0.5] * 28], test_accuracy=0.9876)
    rnn = gradient_run(saves, TrainConfig(cell="rnn", seq_mode="pixels", bidirectional=True),
                       [[10.0 ** (k - 27) for k in range(28)]])        # vanishing; no test evaluation yet
    series, notes = run_step_gradients([lstm.id, rnn.id])
    assert series == {f"{lstm.id} · LSTM · 98.8%": {"norms": [0.5] * 28, "steps": 28, "epoch": 0.5},   # the latest
                      f"{rnn.id} · BiRNN · val 95.0%": {"norms": [10.0 ** (k - 27) for k in range(28)], "steps": 784,
                                                        "epoch": 0.25}}
    assert notes == []


def test_runs_without_a_gradient_over_time_are_named_in_one_note(saves):
    cnn = made_run(saves)
    cnn.config_path.write_text(TrainConfig(arch="cnn").to_json())
    old = made_run(saves, epochs=EPOCHS + [BATCH])                     # progress records from before it was recorded
    series, notes = run_step_gradients([cnn.id, old.id, "no-such-run"])
    assert series == {}
    assert notes[0][0] == "error" and notes[0][1].startswith("Could not read the gradients of `no-such-run`: ")
    assert notes[1][0] == "caption" and notes[1][1].startswith(f"No gradient over time for `{cnn.id}`, `{old.id}`: ")


def test_the_live_runs_of_a_selection(saves):
    done, live = made_run(saves), made_run(saves, "running", live=True)
    assert live_runs([done.id, live.id, "no-such-run"]) == [live.id]
