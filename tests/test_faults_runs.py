"""Runs when the world around them fails: a disk that fills up mid-run, folders below the saves root that
cannot be written, damaged run folders, non-finite numbers in JSON, an export folder given with a trailing
separator, and two Starts at the same moment. Each ends in one line naming what and why, with the run's
status and checkpoints right.

The full disk and the read-only folder are real file systems (a small tmpfs, a read-only bind mount):
mounting needs root with CAP_SYS_ADMIN, and those tests are skipped, with the reason, where it is missing."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import DATA_DIR, REPO, StopAt, tiny_config, wait_until
from lstm_core.checkpoints import load_checkpoint, load_model
from lstm_core.jobs import request_stop
from lstm_core.recorder import RunRecorder
from lstm_core.runs import (LIVE_STATES, Run, WriteError, append_jsonl, atomic_write_json, create_run, list_models,
                            list_runs, open_run)
from lstm_core.train import fit
from app.runview import evaluated_label

PAGES = REPO / "pages"


# -- real file systems to break ------------------------------------------------------------------
def mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount here (needs root with CAP_SYS_ADMIN): {result.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """An empty 4 MiB file system (tmpfs): room for a tiny run, and quick to fill."""
    path = tmp_path / "disk"
    path.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path))
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def read_only(tmp_path):
    """read_only(folder): remount `folder` read-only for the rest of the test, root included (a bind
    mount of itself, remounted ro)."""
    mounted = []

    def make(folder: Path) -> Path:
        mount("--bind", str(folder), str(folder))
        mounted.append(folder)
        mount("-o", "remount,bind,ro", str(folder))
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(disk: Path) -> Path:
    """Write zeros onto `disk` until it is full; the file, to delete to free the space again."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    block = b"\0" * 65536
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


# -- the command line, as a person runs it -------------------------------------------------------
def cli(*args, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstm_core", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture
def main_cli(cli):
    """conftest's in-process `cli` (from tmp_path), its result as a CompletedProcess for one_error_line."""
    def run(*args) -> subprocess.CompletedProcess:
        code, err, out = cli(*args)
        return subprocess.CompletedProcess(args, code, out, err)
    return run


def one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one `error:` line of a command that ended with `code`, without `error: `; training's progress lines
    may come before it on stderr, a traceback never."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0][len("error: "):]


def strict_lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed as strict JSON (no NaN, no Infinity, no torn line)."""
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def refuse(constant: str):
    raise AssertionError(f"{constant} is not JSON")


# -- 1. the disk fills up mid-run ----------------------------------------------------------------
FULL = re.compile(r"no space left on device writing (?P<path>\S+); the run is stopped with its last complete "
                  r"checkpoint at epoch (?P<epoch>\d+)")
EPOCHS = 40     # a tenth of a second each on a CPU: the disk fills long before the last


def config_file(folder: Path) -> Path:
    path = folder / "tiny.json"
    path.write_text(json.dumps(tiny_config(epochs=EPOCHS, patience=0).to_dict()))     # no early stop
    return path


def fill_after(command: list, saves: Path, epochs_before: int, logs: Path) -> tuple[Run, subprocess.CompletedProcess,
                                                                                  Path]:
    """Run `command` (train or train --resume) with its saves folder on the small disk, and fill the disk once
    its run has logged more than `epochs_before` epochs: the run, the finished command, and the filler."""
    out, err = logs / "out.txt", logs / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "lstm_core", *map(str, command)], cwd=REPO,
                                   stdout=stdout, stderr=stderr, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            run = Run(wait_until(lambda: next((saves / "runs").glob("*"), None), 120, "the run folder"))
            wait_until(lambda: len(run.epochs()) > epochs_before or process.poll() is not None, 120,
                       f"epoch {epochs_before + 1}")
            filler = fill(saves.parent)
            process.wait(timeout=120)
        finally:
            process.kill()
    return run, subprocess.CompletedProcess(command, process.returncode, out.read_text(), err.read_text()), filler


def stopped_by_full_disk(run: Run, result: subprocess.CompletedProcess) -> int:
    """Assert the run ended failed in one line naming the file it could not write, and that its status,
    last.pt and best.pt are right; the epoch last.pt ends at."""
    line = one_error_line(result, 1)
    found = FULL.fullmatch(line)
    assert found, line
    assert Path(found["path"]).parent == run.path
    status = run.status()
    assert status["state"] == "failed" and status["error"] == line
    last = load_checkpoint(run.last_path)
    epoch = int(found["epoch"])
    assert last["epoch"] == epoch >= 1 and not last["partial"] and last["optimizer"]
    load_model(run.path)                                        # best.pt: whole, and a model
    assert not list(run.path.glob(".*.tmp"))                    # no half-written temporary file left
    strict_lines(run.metrics_path)                              # no torn last line
    return epoch


def test_a_full_disk_fails_a_training_run_in_one_line_and_keeps_its_checkpoints(small_disk, tmp_path):
    saves = small_disk / "saves"
    run, result, _ = fill_after(["train", "--config", config_file(tmp_path), "--saves", saves,
                                 "--data-dir", DATA_DIR], saves, 0, tmp_path)
    stopped_by_full_disk(run, result)


@pytest.mark.slow
def test_a_resumed_run_that_fills_the_disk_fails_again_and_resumes_to_its_end(small_disk, tmp_path):
    saves = small_disk / "saves"
    run, result, filler = fill_after(["train", "--config", config_file(tmp_path), "--saves", saves,
                                      "--data-dir", DATA_DIR], saves, 0, tmp_path)
    first = stopped_by_full_disk(run, result)
    filler.unlink()

    resume = ["train", "--resume", run.id, "--saves", saves, "--data-dir", DATA_DIR]
    again, result, filler = fill_after(resume, saves, first, tmp_path)
    assert again == run
    second = stopped_by_full_disk(run, result)
    assert second > first
    filler.unlink()

    result = cli(*resume)
    assert result.returncode == 0, result.stderr
    assert run.status()["state"] == "completed"
    assert [e["epoch"] for e in run.epochs()] == list(range(1, EPOCHS + 1))    # each epoch once, none lost
    assert run.eval()["test_accuracy"] > 0.5


def test_the_writers_leave_no_torn_line_and_status_still_records_the_failure_on_a_full_disk(small_disk):
    run = create_run(tiny_config(), small_disk)
    append_jsonl(run.metrics_path, {"event": "start"})
    before = run.metrics_path.read_bytes()
    fill(small_disk)
    with pytest.raises(WriteError) as refused:
        append_jsonl(run.metrics_path, {"event": "batch", "loss": 1.0, "pad": "x" * 20000})
    assert str(refused.value) == f"no space left on device writing {run.metrics_path}"
    assert run.metrics_path.read_bytes() == before                   # the torn line was cut off again
    with pytest.raises(WriteError, match=f"no space left on device writing {re.escape(str(run.eval_path))}"):
        atomic_write_json(run.eval_path, {"test_accuracy": 0.5, "pad": "x" * 20000})
    assert not run.eval_path.exists() and not list(run.path.glob(".*.tmp"))
    # an atomic replace needs room for a second copy; the failed state still has to be recorded
    run.write_status(state="failed", error="no space left on device writing last.pt")
    assert open_run(run.id, small_disk).status()["state"] == "failed"


# -- 2. a folder below the saves root that cannot be written -------------------------------------
def a_file_where(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder")
    return folder


def test_a_file_in_place_of_runs_locks_or_studies_is_refused_in_one_line(saves, tmp_path, main_cli):
    tiny = ["--config", config_file(tmp_path), "--saves", saves]
    runs = a_file_where(saves / "runs")
    for args in (["train", *tiny], ["runs", "--saves", saves]):
        line = one_error_line(main_cli(*args), 2)
        assert line.startswith(f"{runs} is a file, not a folder"), line
    runs.unlink()
    locks = a_file_where(saves / "locks")
    assert one_error_line(main_cli("train", *tiny), 2).startswith(f"{locks} is a file, not a folder")
    assert not (saves / "runs").exists() or not list((saves / "runs").iterdir())     # no run was made
    locks.unlink()
    studies = a_file_where(saves / "studies")
    line = one_error_line(main_cli("tune", "--study", "s", "--trials", "1", *tiny), 2)
    assert line.startswith(f"{studies} is a file, not a folder"), line


def test_a_run_folder_that_is_a_file_is_refused_by_resume_in_one_line(saves, main_cli):
    run = a_file_where(saves / "runs" / "20260101-000000-abcdef")
    line = one_error_line(main_cli("train", "--resume", run.name, "--saves", saves), 2)
    assert line == f"{run} is a file, not a run folder"


def test_a_read_only_runs_folder_or_run_folder_is_refused_in_one_line(saves, tmp_path, read_only, main_cli):
    run = create_run(tiny_config(epochs=1), saves)
    run.write_status(state="cancelled")                              # one that resume would take
    read_only(saves / "runs")
    line = one_error_line(main_cli("train", "--config", config_file(tmp_path), "--saves", saves), 2)
    assert line.startswith(f"cannot write to {saves / 'runs'}: Read-only file system"), line
    line = one_error_line(main_cli("train", "--resume", run.id, "--saves", saves), 2)
    assert line.startswith(f"cannot write to {run.path}: Read-only file system"), line
    listed = main_cli("runs", "--saves", saves, "--json")             # reading needs no writing
    assert listed.returncode == 0 and [r["id"] for r in json.loads(listed.stdout)] == [run.id]


def test_the_train_page_says_which_folder_cannot_take_a_run(saves):
    runs = a_file_where(saves / "runs")
    at = AppTest.from_file(str(PAGES / "train.py"), default_timeout=60).run()
    at.slider(key="epochs").set_value(1).run()
    (start,) = [b for b in at.button if b.label == "Start training"]
    start.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(e.value.startswith(f"{runs} is a file, not a folder") for e in at.error), [e.value for e in at.error]
    assert runs.read_text() == "not a folder"


def test_a_study_whose_folder_goes_away_mid_study_ends_in_one_line_keeping_its_trials(saves, tmp_path):
    """A study's folder replaced by a file while a trial trains (a disk unmounted, a folder moved away): the
    worker stops the study and says so in one line, not in Optuna's logged traceback; trial 0 stays."""
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"hidden_size": {"type": "int", "low": 8, "high": 32}}))
    # trials of several seconds: the folder must go while trial 1 trains, not after it has finished
    tiny = ["--limit-train", "1000", "--val-size", "500", "--epochs", "8", "--batch-size", "100", "--aug-rotate", "0",
            "--aug-translate", "0", "--aug-scale", "0"]
    worker = subprocess.Popen([sys.executable, "-m", "lstm_core", "tune", "--study", "s", "--trials", "4", "--space",
                               str(space), "--saves", str(saves), *tiny], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "LSTM_DATA": str(DATA_DIR)})
    folder = saves / "studies" / "s"
    try:
        wait_until(lambda: (folder / "trial_1").is_dir(), 180, "the study's second trial")
    except AssertionError:
        worker.kill()
        raise
    folder.rename(tmp_path / "moved")
    a_file_where(folder)
    out, err = worker.communicate(timeout=300)
    line = one_error_line(subprocess.CompletedProcess(worker.args, worker.returncode, out, err), 1)
    assert line.startswith(f"study s: not a directory writing {folder}/trial_1/"), line
    assert line.endswith("the trials finished before then are kept"), line
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{saves / 'optuna.db'}")
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert study.trials[1].state == optuna.trial.TrialState.FAIL and len(study.trials) == 2   # stopped there


def test_quick_train_on_the_draw_page_says_which_folder_cannot_take_a_run(saves):
    locks = a_file_where(saves / "locks")
    at = AppTest.from_file(str(PAGES / "draw.py"), default_timeout=60).run()
    (quick,) = [b for b in at.button if b.label == "Quick train"]
    quick.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(e.value.startswith(f"{locks} is a file, not a folder") for e in at.error), [e.value for e in at.error]
    assert not (saves / "runs").exists() or not list((saves / "runs").iterdir())     # no run was made


# -- 3. damaged run folders ----------------------------------------------------------------------
@pytest.fixture
def damaged(saves, trained_saves) -> tuple[str, str]:
    """Two copies of a completed run: (sound id, damaged id), the damaged one's config.json cut short, as a
    write killed mid-file (or a person's editor) leaves it."""
    row = next(r for r in list_runs(trained_saves) if r["state"] == "completed")
    ids = (row["id"], "20260101-000000-damage")
    for run_id in ids:
        shutil.copytree(row["path"], saves / "runs" / run_id)
    (saves / "runs" / ids[1] / "config.json").write_text('{"arch": "lstm", "hidden_size": ')   # cut short
    return ids


DAMAGE = "config.json: not JSON (line 1 column 33)"


def test_a_damaged_run_is_listed_as_damaged_with_the_reason(saves, damaged):
    sound, broken = damaged
    listed = cli("runs", "--saves", saves, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert rows[broken]["damaged"] == DAMAGE and rows[sound]["damaged"] is None
    assert rows[broken]["hidden_size"] is None and rows[sound]["hidden_size"] == 48    # no columns from junk
    table = cli("runs", "--saves", saves).stdout.splitlines()
    (line,) = [t for t in table if t.startswith(broken)]
    assert f"damaged: {DAMAGE}" in line
    (line,) = [t for t in table if t.startswith(sound)]
    assert line.split()[1] == "completed" and "lstm 1x48 rows" in line


@pytest.mark.parametrize("script", [PAGES / "runs.py", REPO / "streamlit_app.py"], ids=["runs", "home"])
def test_the_run_tables_show_a_damaged_run_and_why(saves, damaged, script):
    sound, broken = damaged
    at = AppTest.from_file(str(script), default_timeout=60).run()       # Home: the entrypoint's first page
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value.set_index("id")
    assert table.loc[broken, "model"] == f"damaged: {DAMAGE}"
    assert table.loc[sound, "model"] == "LSTM 1x48, rows"


def test_the_pickers_offer_no_damaged_run_as_a_model_or_say_why(saves, damaged):
    sound, broken = damaged
    assert [r["id"] for r in list_models(saves)] == [sound]                  # Draw
    rows = {r["id"]: r for r in list_runs(saves)}
    assert evaluated_label(rows[broken]) == f"{broken} · damaged: {DAMAGE}"  # Evaluate reads its eval.json
    assert "damaged" not in evaluated_label(rows[sound])
    with pytest.raises(Exception, match=re.escape(f"run {broken} is damaged: {DAMAGE}")):
        open_run(broken, saves).config()


# -- 4. strict JSON ------------------------------------------------------------------------------
def test_a_run_stopped_before_its_first_epoch_writes_strict_json(saves, mnist):
    run = create_run(tiny_config(log_every=1), saves)
    stop = threading.Event()
    fit(run.config(), [RunRecorder(run), StopAt(stop, 0, 2)], stop=stop, data=mnist)
    assert run.status()["state"] == "cancelled" and not run.epochs()
    records = strict_lines(run.metrics_path)
    (end,) = [r for r in records if r["event"] == "end"]
    assert end["best_val_loss"] is None                   # no epoch, no validation loss: not Infinity
    for path in run.path.glob("*.json"):
        json.loads(path.read_text(), parse_constant=refuse)


def test_the_json_writers_write_null_for_nan_and_infinity(tmp_path):
    values = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "numpy": np.float32("nan"),
              "tensor": torch.tensor(float("inf")), "nested": [1.5, {"x": math.nan}], "n": 3, "ok": True}
    expected = {"nan": None, "inf": None, "-inf": None, "numpy": None, "tensor": None,
                "nested": [1.5, {"x": None}], "n": 3, "ok": True}
    atomic_write_json(tmp_path / "a.json", values)
    assert json.loads((tmp_path / "a.json").read_text(), parse_constant=refuse) == expected
    append_jsonl(tmp_path / "a.jsonl", values, values)
    assert strict_lines(tmp_path / "a.jsonl") == [expected, expected]


# -- 5. export paths -----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")    # torch's, about itself
def test_export_output_ending_in_a_separator_is_a_folder_made_for_it(trained_saves, tmp_path, main_cli):
    row = next(r for r in list_runs(trained_saves) if r["state"] == "completed")
    result = main_cli("export", row["path"], "--format", "torchscript", "--output", "some/missing/folder/")
    assert result.returncode == 0, result.stderr
    written = tmp_path / "some" / "missing" / "folder" / "model.ts.pt"
    assert (tmp_path / result.stdout.strip()).resolve() == written.resolve()
    assert written.is_file() and torch.jit.load(str(written))(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    existing = tmp_path / "exports"
    existing.mkdir()
    assert main_cli("export", row["path"], "--format", "torchscript", "--output", existing).returncode == 0
    assert (existing / "model.ts.pt").is_file()
    (tmp_path / "plain").write_text("a file")
    line = one_error_line(main_cli("export", row["path"], "--format", "torchscript", "--output", "plain/"), 2)
    assert line == "cannot write into plain: it is a file, not a folder"
    assert (tmp_path / "plain").read_text() == "a file"


# -- 6. two Starts at the same moment --------------------------------------------------------------
LONG = {"hidden_size": 48, "epochs": 50, "batch_size": 50, "limit_train": 20000, "val_size": 1000,
        "aug_rotate": 0.0, "aug_translate": 0.0, "aug_scale": 0.0}


def train_tab() -> AppTest:
    at = AppTest.from_file(str(PAGES / "train.py"), default_timeout=60).run()
    for name, value in LONG.items():
        (widget,) = [w for kind in ("slider", "number_input") for w in getattr(at, kind) if w.key == name]
        widget.set_value(value)
    return at.run()


def press_start(at: AppTest) -> tuple[str, str]:
    """Press Start: the run it launched and the line the page says about it."""
    (button,) = [b for b in at.button if b.label == "Start training"]
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    (notice,) = [i.value for i in at.info]
    return at.session_state["train_run"], notice


def test_a_second_start_at_the_same_moment_says_it_is_queued_and_behind_which_run(saves):
    first_tab, second_tab = train_tab(), train_tab()
    first, first_notice = press_start(first_tab)
    second, second_notice = press_start(second_tab)     # before the first run's process has even started
    assert first_notice == f"Started run {first} on cpu."
    assert second_notice == f"Run {second} is queued: cpu is busy with run {first}; it starts when that ends."
    # and it is true: the first trains while the second's process waits for it
    wait_until(lambda: open_run(first).status()["state"] == "running", 120, f"run {first} running")
    log = open_run(second).path / "train.log"
    wait_until(lambda: f"busy with run {first}: queued" in log.read_text(), 120, f"run {second} waiting for {first}")
    assert open_run(second).status()["state"] == "queued" and open_run(second).status()["waiting_for"] == first
    for run_id in (second, first):
        request_stop(open_run(run_id))
    for run_id in (second, first):
        wait_until(lambda: open_run(run_id).status()["state"] not in LIVE_STATES, 120, f"run {run_id} stopping")
    assert open_run(second).status()["state"] == "cancelled" and open_run(second).epochs() == []
