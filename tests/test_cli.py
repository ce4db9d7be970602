import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA_DIR, REPO, wait_until

TINY = ["--hidden-size", "48", "--epochs", "2", "--batch-size", "50", "--limit-train", "2000", "--val-size", "1000",
        "--lr", "0.01", "--optimizer", "adam", "--scheduler", "none"]


def cli(*args, saves, check=False, timeout=300):
    env = {**os.environ, "LSTM_SAVES": str(saves), "LSTM_DATA": str(DATA_DIR)}
    result = subprocess.run([sys.executable, "-m", "lstm_core", *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_train_prints_the_run_dir_first_and_a_json_summary_last(tmp_path):
    result = cli("train", *TINY, "--json", saves=tmp_path, check=True)
    lines = result.stdout.strip().splitlines()
    run_dir = Path(lines[0])
    summary = json.loads(lines[-1])
    assert run_dir.parent == tmp_path / "runs" and summary["run_dir"] == str(run_dir)
    assert {"test_accuracy", "macro_f1", "train_seconds"} <= set(summary) and summary["test_accuracy"] > 0.4
    assert lines[1].startswith("completed: 2 epoch(s)")
    assert json.loads((run_dir / "eval.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    assert "epoch 2/2" in result.stderr                      # progress goes to stderr, results to stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["hidden_size"] == 48 and config["optimizer"] == "adam"

    evaluation = json.loads(cli("evaluate", run_dir.name, saves=tmp_path, check=True).stdout)
    assert evaluation["test_accuracy"] == summary["test_accuracy"] and len(evaluation["confusion_matrix"]) == 10
    from_file = json.loads(cli("evaluate", run_dir / "best.pt", saves=tmp_path, check=True).stdout)
    assert from_file["macro_f1"] == evaluation["macro_f1"]

    table = cli("runs", saves=tmp_path, check=True).stdout
    assert run_dir.name in table and "completed" in table
    rows = json.loads(cli("runs", "--json", saves=tmp_path, check=True).stdout)
    assert rows[0]["id"] == run_dir.name


@pytest.mark.slow
def test_presets_config_files_and_flags_layer_in_that_order(tmp_path):
    config_file = tmp_path / "c.toml"
    config_file.write_text('hidden_size = 40\nseed = 7\nbatch_size = 50\n')
    result = cli("train", "--preset", "tutorial", "--config", config_file, "--hidden-size", "24", "--epochs", "1",
                 "--limit-train", "500", "--val-size", "500", "--patience", "3", saves=tmp_path, check=True)
    config = json.loads((Path(result.stdout.splitlines()[0]) / "config.json").read_text())
    assert config["num_layers"] == 3 and config["dropout"] == 0.47   # preset
    assert config["seed"] == 7 and config["batch_size"] == 50        # file
    assert config["hidden_size"] == 24 and config["patience"] == 3   # flags


@pytest.mark.slow
def test_sigterm_stops_cooperatively_and_keeps_a_checkpoint(tmp_path):
    env = {**os.environ, "LSTM_SAVES": str(tmp_path), "LSTM_DATA": str(DATA_DIR)}
    proc = subprocess.Popen([sys.executable, "-m", "lstm_core", "train", "--hidden-size", "32", "--epochs", "50",
                             "--limit-train", "20000", "--log-every", "5", "--json"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = Path(proc.stdout.readline().strip())
    metrics = run_dir / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and '"event": "batch"' in metrics.read_text(), 120, "the first batches")
    except AssertionError:
        proc.kill()                                               # not 50 epochs behind the failure
        raise
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["state"] == "cancelled"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "cancelled" and (run_dir / "last.pt").exists() and (run_dir / "best.pt").exists()


@pytest.mark.slow
def test_resume_continues_a_killed_run_from_its_last_epoch(tmp_path):
    env = {**os.environ, "LSTM_SAVES": str(tmp_path), "LSTM_DATA": str(DATA_DIR)}
    proc = subprocess.Popen([sys.executable, "-m", "lstm_core", "train", *TINY[:2], "--epochs", "6",
                             "--limit-train", "4000", "--val-size", "1000", "--batch-size", "50"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    run_dir = Path(proc.stdout.readline().strip())
    metrics = run_dir / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and metrics.read_text().count('"event": "epoch"') >= 2, 180,
                   "two epochs", poll=0.1)
    finally:
        proc.kill()                                               # SIGKILL: no chance to clean up
        proc.wait()
    status = json.loads(cli("runs", "--json", saves=tmp_path, check=True).stdout)[0]
    assert status["state"] == "interrupted"
    done = status["epochs_done"]
    result = cli("train", "--resume", run_dir.name, "--json", saves=tmp_path, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["state"] == "completed" and summary["epochs"] == 6
    epochs = [json.loads(l)["epoch"] for l in metrics.read_text().splitlines() if '"event": "epoch"' in l]
    assert epochs == list(range(1, done + 1)) + list(range(done + 1, 7))   # nothing redone, nothing lost
    again = cli("train", "--resume", run_dir.name, saves=tmp_path)
    assert again.returncode == 2 and "is completed" in again.stderr
