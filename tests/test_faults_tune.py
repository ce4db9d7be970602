"""Faults around studies, each ending in one line and never a traceback:

- journal:PATH storages that are damaged (garbage, a torn last line, a folder given as the file): refused by
  every opener before anything writes, the file left byte for byte; --repair-journal cuts a torn line only,
  keeping a copy
- a storage whose folder stops taking writes while `tune` runs: the worker ends naming the storage and the
  cause, and the trials finished before stay in it
- values that overflow: config and space files nested far beyond any real one, a dashboard port outside
  0-65535, timeouts that never fire, sampler seeds Optuna's samplers refuse
- a key written twice in a JSON or TOML file
- searches that would train what they do not record: LSTM-only fields searched for CNN trials, a flag that
  fixes a field the space searches
"""
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from streamlit.testing.v1 import AppTest

from conftest import DATA_DIR, REPO, wait_until
from lstm_core import dashboard
from lstm_core.config import ConfigError, preset, read_mapping
from lstm_core.storage import make_storage
from lstm_core.tune import DEFAULT_SPACE, SpaceError, check_space, quiet_storage_failures_in_threads
from app.studyview import storage_studies
from app.tuneform import LAUNCH, plan_study

SMALL = ["--limit-train", "1000", "--val-size", "500", "--epochs", "2", "--batch-size", "100",
         "--aug-rotate", "0", "--aug-translate", "0", "--aug-scale", "0"]
SPACE = {"lr": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True}}


def one_line(code: int, err: str, status: int = 2) -> str:
    """The single stderr line of a command that exited with `status`."""
    assert code == status and "Traceback" not in err, err
    [line] = err.strip().splitlines()
    assert line.startswith("error: ")
    return line


def space_file(tmp_path, space=SPACE):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    return path


# -- damaged journals ---------------------------------------------------------------------------------
def real_journal(path, trials: int = 3) -> optuna.Study:
    """A journal written by Optuna itself: study "s" with `trials` complete trials."""
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)
    return study


def refused_by_every_opener(cli, url: str, words: str) -> None:
    """tune, tune --repair-journal, the dashboard (plain and --repair-journal) and the Tuning page's study list
    all refuse `url` in one line holding `words`."""
    assert words in one_line(*cli("tune", "--study", "s", "--storage", url)[:2])
    assert words in one_line(*cli("tune", "--study", "s", "--storage", url, "--repair-journal")[:2])
    if importlib.util.find_spec("optuna_dashboard"):    # without it, the dashboard says how to install it
        assert words in one_line(*cli.dashboard(url)[:2])
        assert words in one_line(*cli.dashboard(url, "--repair-journal")[:2])
    with pytest.raises(ConfigError, match=words):
        storage_studies(url)


GARBAGE = {
    "text": b"these are my notes\nnot a journal\n",
    "one-line": b"notes without a newline at the end",
    "json-not-a-journal": b'{"lr": 0.01}\n',
    "binary": bytes(range(256)) * 4,
    "blank-line": b"\n",
}


@pytest.mark.parametrize("content", GARBAGE.values(), ids=GARBAGE)
def test_a_file_that_is_not_a_journal_is_refused_by_every_opener_and_never_touched(cli, saves, tmp_path, content):
    path = tmp_path / "notes.log"
    path.write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    refused_by_every_opener(cli, f"journal:{path}", "line 1 of")
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == before   # no .bak, no .lock
    assert not (saves / "studies").exists()


def test_a_journal_damaged_in_the_middle_is_refused_not_repaired(cli, saves, tmp_path):
    path = tmp_path / "studies.log"
    real_journal(path)
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = b"".join([*lines[:4], b"scribbled over\n", *lines[4:]])
    path.write_bytes(damaged)
    refused_by_every_opener(cli, f"journal:{path}", "line 5 of")
    assert path.read_bytes() == damaged and not (tmp_path / "studies.log.bak").exists()


def test_a_folder_given_as_the_journal_is_one_line(cli, saves, tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    refused_by_every_opener(cli, f"journal:{folder}", f"{folder} is a folder, not a journal file")
    assert list(folder.iterdir()) == []


def test_a_torn_last_line_is_refused_until_repair_journal_cuts_it_keeping_a_copy(cli, saves, tmp_path):
    """What a writer killed mid-write (or a full disk) leaves: every opener refuses it untouched and says how to
    repair it; --repair-journal copies the file, cuts the torn line, and the study goes on with its trials."""
    path = tmp_path / "studies.log"
    values = [t.value for t in real_journal(path).trials]
    whole = path.read_bytes()
    torn = whole + whole.splitlines(keepends=True)[-1][:30]
    path.write_bytes(torn)
    refused = one_line(*cli("tune", "--study", "s", "--storage", f"journal:{path}")[:2])
    assert "its last line (line 11) is cut short" in refused and "--repair-journal" in refused
    if importlib.util.find_spec("optuna_dashboard"):
        assert "cut short" in one_line(*cli.dashboard(f"journal:{path}")[:2])
    with pytest.raises(ConfigError, match="cut short"):
        storage_studies(f"journal:{path}")
    assert path.read_bytes() == torn and not (tmp_path / "studies.log.bak").exists()

    code, err, out = cli("tune", "--study", "s", "--trials", 3, "--storage", f"journal:{path}", "--repair-journal")
    assert code == 0, err
    assert f"cut the torn last line of {path}; the file as it was is kept in {path}.bak" in out
    assert (tmp_path / "studies.log.bak").read_bytes() == torn                     # the copy is the file as it was
    assert path.read_bytes().startswith(whole)                                     # the cut left every record
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))
    assert [t.value for t in study.trials] == values and study.metric_names == ["val_accuracy"]   # written after
    [summary] = storage_studies(f"journal:{path}")
    assert (summary["name"], summary["trials"]) == ("s", 3)


def test_the_tuning_page_shows_a_damaged_journal_in_one_line_and_leaves_it(saves, tmp_path):
    path = tmp_path / "studies.log"
    real_journal(path)
    torn = path.read_bytes() + b'{"op_code":6,"worker'
    path.write_bytes(torn)
    at = AppTest.from_file(str(REPO / "pages" / "tuning.py"), default_timeout=120).run()
    at.text_input(key="tune_storage").set_value(f"journal:{path}").run()
    assert not at.exception, [e.value for e in at.exception]
    [error] = [e.value for e in at.error]
    assert "is cut short" in error and "--repair-journal" in error and "\n" not in error
    assert path.read_bytes() == torn and not (tmp_path / "studies.log.bak").exists()


def test_repair_journal_is_for_journals_only(cli, saves, tmp_path):
    assert "--repair-journal repairs journal:PATH storages" in one_line(
        *cli("tune", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--repair-journal")[:2])
    assert not (tmp_path / "x.db").exists()


def test_the_dashboard_repairs_a_torn_journal_and_serves_it(saves, tmp_path):
    pytest.importorskip("optuna_dashboard")
    from test_dashboard import get_json, served

    path = tmp_path / "studies.log"
    real_journal(path)
    torn = path.read_bytes() + b'{"op_code":6,"worker'
    path.write_bytes(torn)
    with served(saves, tmp_path / "dashboard.log", f"journal:{path}", "--repair-journal") as url:
        [summary] = get_json(f"{url}/api/studies")["study_summaries"]
        assert summary["study_name"] == "s"
    assert (tmp_path / "studies.log.bak").read_bytes() == torn
    assert "cut the torn last line" in (tmp_path / "dashboard.log").read_text()


# -- a storage that stops taking writes mid-study -------------------------------------------------------
def complete_trials(url: str) -> int:
    if not Path(url.split(":", 1)[1].removeprefix("///")).exists():
        return 0                                # not created yet: opening it here would create it
    try:
        study = optuna.load_study(study_name="s", storage=make_storage(url, heartbeat=False))
    except (KeyError, ConfigError):             # not created yet
        return 0
    return len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_storage_folder_that_stops_taking_writes_ends_the_worker_in_one_line(saves, tmp_path, kind):
    """Root writes through any permission bits, so the folder is taken away instead: renamed, and a file put
    where it was. Every later write then fails as it does in a folder made read-only or a mount gone away
    (the worker meets an OSError or a database error mid-trial); the storage file itself, renamed with its
    folder, keeps what was written before."""
    folder = tmp_path / "store"
    folder.mkdir()
    name = "optuna.db" if kind == "sqlite" else "studies.log"
    url = f"sqlite:///{folder / name}" if kind == "sqlite" else f"journal:{folder / name}"
    env = {**os.environ, "LSTM_SAVES": str(saves), "LSTM_DATA": str(DATA_DIR)}
    with open(tmp_path / "stderr.log", "wb") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "lstm_core", "tune", "--study", "s", "--trials", "100",
                                   "--storage", url, "--space", str(space_file(tmp_path)), "--sampler", "random",
                                   "--pruner", "none", *SMALL], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=stderr)
    try:
        def finished():
            assert worker.poll() is None, (tmp_path / "stderr.log").read_text()
            return complete_trials(url)

        done = wait_until(finished, 300, "the first complete trial", poll=1)
        folder.rename(tmp_path / "moved")
        folder.write_text("the storage's folder is gone")
        worker.wait(timeout=300)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    line = one_line(worker.returncode, (tmp_path / "stderr.log").read_text().strip().splitlines()[-1], status=1)
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()
    assert line.startswith(f"error: study s: its storage stopped taking writes: cannot write the study storage "
                           f"file {folder / name}: ")
    assert "the trials finished before then stay in it" in line
    moved = tmp_path / "moved" / name
    assert complete_trials(f"sqlite:///{moved}" if kind == "sqlite" else f"journal:{moved}") >= done


# -- values that overflow -------------------------------------------------------------------------------
DEEP = {"deep.json": "[" * 100_000 + "]" * 100_000, "deep-objects.json": '{"a":' * 100_000 + "1" + "}" * 100_000,
        "deep.toml": "lr = " + "[" * 100_000 + "]" * 100_000}


@pytest.mark.parametrize("name", DEEP)
def test_files_nested_far_beyond_any_config_are_one_line(cli, saves, tmp_path, name):
    path = tmp_path / name
    path.write_text(DEEP[name])
    for args in (["train", "--config", path], ["tune", "--study", "s", "--space", path]):
        assert f"config file {path} is nested too deeply" in one_line(*cli(*args)[:2])
    assert not (saves / "runs").exists() and not (saves / "studies").exists()


@pytest.mark.parametrize("port", ["70000", "-1", "65536", "99999999999999999999"])
def test_a_dashboard_port_out_of_range_is_one_line(port, capsys):
    assert dashboard.main(["--port", port]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: argument --port: port {int(port)} is out of range: ports run from 0 to 65535"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-5", "0"])
def test_a_timeout_that_would_never_fire_or_fires_at_once_is_refused(cli, saves, value):
    line = one_line(*cli("tune", "--study", "s", f"--timeout={value}")[:2])
    assert line.endswith(f"--timeout positive and finite, got --timeout {float(value):g}")
    assert not (saves / "studies").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_sampler_seed_the_samplers_refuse_is_one_line(cli, saves, seed):
    assert one_line(*cli("tune", "--study", "s", "--sampler-seed", seed)[:2]) == \
        f"error: --sampler-seed must be between 0 and 4294967295, got {seed}"


def test_an_accepted_timeout_and_seed_run(cli, saves, tmp_path):
    """The refusals above are about the values: a finite timeout and a seed in range start the study."""
    code, err, _ = cli("tune", "--study", "s", "--trials", 1, "--timeout", 600, "--sampler-seed", 2**32 - 1,
                       "--space", space_file(tmp_path), *SMALL)
    assert code == 0, err
    assert complete_trials(f"sqlite:///{saves / 'optuna.db'}") == 1


# -- duplicate keys -------------------------------------------------------------------------------------
DUPLICATES = {
    "config.json": ('{"lr": 0.01, "epochs": 2, "lr": 0.1}', "lr"),
    "config.toml": ("lr = 0.01\nepochs = 2\nlr = 0.1\n", "lr"),
    "space.json": ('{"lr": {"type": "float", "low": 0.001, "high": 0.1, "low": 0.01}}', "low"),
    "space.toml": ("[lr]\ntype = \"float\"\nlow = 0.001\nhigh = 0.1\nlow = 0.01\n", "low"),
}


@pytest.mark.parametrize("name", DUPLICATES)
def test_a_key_written_twice_is_refused_naming_it_in_json_as_in_toml(cli, saves, tmp_path, name):
    text, key = DUPLICATES[name]
    path = tmp_path / name
    path.write_text(text)
    args = ["train", "--config", path] if name.startswith("config") else ["tune", "--study", "s", "--space", path]
    assert f"config file {path} has the key {key!r} twice: keep one" in one_line(*cli(*args)[:2])
    once = text.replace(', "lr": 0.1', "").replace("lr = 0.1\n", "").replace(', "low": 0.01', "").replace(
        "low = 0.01\n", "")
    path.write_text(once)
    assert read_mapping(path)                   # the same file with the key once reads


# -- searches that would train what they do not record --------------------------------------------------
def test_lstm_only_fields_searched_for_cnn_trials_are_refused_by_the_cli_and_the_tuning_page(cli, saves, tmp_path):
    for args in (["--arch", "cnn"], ["--preset", "cnn"]):
        line = one_line(*cli("tune", "--study", "s", *args)[:2])
        assert "search space: hidden_size, num_layers, bidirectional only apply to recurrent models" in line
        assert "(arch cnn)" in line
    cnn_trials = {**SPACE, "arch": {"type": "categorical", "choices": ["lstm", "cnn"]}, "seq_mode": {
        "type": "categorical", "choices": ["rows", "pixels"]}}
    with pytest.raises(SpaceError, match="seq_mode only apply to recurrent models"):
        check_space(cnn_trials, preset("default"))
    with pytest.raises(SpaceError, match="hidden_size, num_layers, bidirectional only apply to recurrent models"):
        plan_study("s", {**LAUNCH, "preset": "cnn"}, DEFAULT_SPACE, f"sqlite:///{saves / 'optuna.db'}")
    # what a CNN does read can be searched
    assert plan_study("s", {**LAUNCH, "preset": "cnn"}, SPACE, f"sqlite:///{saves / 'optuna.db'}").space == SPACE
    assert check_space(DEFAULT_SPACE, preset("default")) == DEFAULT_SPACE
    assert not (saves / "studies").exists()


@pytest.mark.parametrize("flag, field", [("--hidden-size=8", "hidden_size"), ("--bidirectional", "bidirectional"),
                                         ("--lr=0.01", "lr")])
def test_a_flag_that_fixes_a_searched_field_is_refused(cli, saves, flag, field):
    line = one_line(*cli("tune", "--study", "s", flag)[:2])
    assert line == (f"error: the search space searches {field}, which {flag.split('=')[0]} would fix: drop the flag, "
                    "or drop the field from the space (--space FILE)")
    assert not (saves / "studies").exists()


def test_a_storage_failure_in_optunas_heartbeat_thread_prints_no_traceback(monkeypatch):
    """The heartbeat thread writes every few seconds on its own: when the storage fails under it, the main
    thread's next write meets the same failure and says it in one line, so the thread's traceback is dropped.
    Any other failure in a thread still reaches the hook."""
    reached = []
    monkeypatch.setattr(threading, "excepthook", reached.append)
    for error in (OSError(30, "Read-only file system"), optuna.exceptions.StorageInternalError("gone"),
                  ValueError("a bug")):
        def fail(error=error):
            raise error

        with quiet_storage_failures_in_threads():
            thread = threading.Thread(target=fail)
            thread.start()
            thread.join()
    assert [args.exc_value for args in reached] == [error]
    assert threading.excepthook == reached.append            # given back
