"""`make dashboard`: real studies (trials trained on a slice of the real data), served by optuna-dashboard
started the way the Makefile starts it, and read back through its HTTP API against optuna.load_study."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request

import optuna
import pytest

from conftest import REPO, free_port, tiny_config, wait_until
from lstm_core import dashboard
from lstm_core.storage import default_storage, make_storage
from lstm_core.tune import run_worker

pytest.importorskip("optuna_dashboard")

SPACE = {"hidden_size": {"type": "int", "low": 8, "high": 32},
         "lr": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
         "optimizer": {"type": "categorical", "choices": ["adam", "adamw"]}}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A saves root with two real two-trial studies: `sq` in the app's default SQLite storage, `jr` in a
    journal file. No pruner, so every trial completes and has a value to compare."""
    root = tmp_path_factory.mktemp("dashboard") / "saves"
    root.mkdir()
    base = tiny_config(limit_train=1000, val_size=500, batch_size=100)
    journal = f"journal:{root / 'studies.log'}"
    for name, storage in (("sq", default_storage(root)), ("jr", journal)):
        run_worker(name, 2, base, storage, SPACE, pruner="none", root=root, seed=0)
    return {"root": root, "sqlite": default_storage(root), "journal": journal}


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@contextlib.contextmanager
def served(saves, log_path, *args):
    """`python -m lstm_core.dashboard ARGS` (the Makefile's command) on a free port over `saves`; yields its
    URL once the API answers, and stops the server afterwards, passed or failed."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lstm_core.dashboard", *args, "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=REPO, env={**os.environ, "LSTM_SAVES": str(saves)},
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def answers():
        if proc.poll() is not None:
            raise AssertionError(f"the dashboard exited with {proc.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(OSError):
            return get_json(f"{url}/api/studies")

    try:
        wait_until(answers, 60, "the dashboard answering /api/studies")   # importing torch is most of it
        yield url
    finally:
        proc.kill()     # a reader with nothing to save: no need to ask it nicely
        proc.wait()


def assert_served_as_stored(url: str, name: str, storage: str) -> None:
    """The dashboard's view of study `name` is Optuna's: trials, states, values, params, epochs, run dirs."""
    summaries = get_json(f"{url}/api/studies")["study_summaries"]
    [summary] = [s for s in summaries if s["study_name"] == name]
    assert summary["directions"] == ["maximize"]
    assert json.loads({a["key"]: a["value"] for a in summary["user_attrs"]}["space"]) == SPACE
    # the list carries no trial counts or metric names in optuna-dashboard 0.21: the study's own page does
    detail = get_json(f"{url}/api/studies/{summary['study_id']}")
    study = optuna.load_study(study_name=name, storage=make_storage(storage, heartbeat=False))
    assert detail["name"] == name
    assert detail["objective_names"] == study.metric_names == ["val_accuracy"]
    assert len(detail["trials"]) == len(study.trials) == 2
    for shown, trial in zip(detail["trials"], study.trials):
        assert shown["number"] == trial.number and shown["state"] == "Complete" == trial.state.name.capitalize()
        assert shown["values"] == trial.values
        assert {p["name"]: p["param_external_value"] for p in shown["params"]} == \
            {k: str(v) for k, v in trial.params.items()}
        assert [(v["step"], v["value"]) for v in shown["intermediate_values"]] == \
            sorted(trial.intermediate_values.items())
        assert {a["key"]: a["value"] for a in shown["user_attrs"]}["run_dir"] == trial.user_attrs["run_dir"]
    [best] = detail["best_trials"]
    assert best["number"] == study.best_trial.number and best["values"] == [study.best_value]


@pytest.mark.slow
def test_the_apps_default_sqlite_storage_is_served_as_optuna_stores_it(studies, tmp_path):
    with served(studies["root"], tmp_path / "dashboard.log") as url:   # no STORAGE: $LSTM_SAVES/optuna.db
        assert_served_as_stored(url, "sq", studies["sqlite"])
        with urllib.request.urlopen(f"{url}/dashboard", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    assert f"(1 study in {studies['sqlite']})" in (tmp_path / "dashboard.log").read_text()


@pytest.mark.slow
def test_a_journal_storage_is_served_as_optuna_stores_it(studies, tmp_path):
    with served(studies["root"], tmp_path / "dashboard.log", studies["journal"]) as url:
        assert_served_as_stored(url, "jr", studies["journal"])


def test_a_missing_storage_file_is_one_line_and_exit_2_and_left_uncreated(tmp_path):
    missing = tmp_path / "nowhere.db"
    out = subprocess.run([sys.executable, "-m", "lstm_core.dashboard", f"sqlite:///{missing}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and "no such file" in line and str(missing) in line
    assert not missing.exists()


@pytest.mark.parametrize("storage, words", [
    ("journal:{tmp}/nowhere/studies.log", "does not exist"),
    ("journal:{tmp}/studies.log", "no such file"),
    ("{tmp}/studies.log", "not a storage URL"),           # optuna-dashboard's own CLI form: ours is journal:
    ("nosuchdb://host/db", "cannot open the study storage"),
])
def test_a_storage_that_cannot_be_opened_is_one_line(storage, words, tmp_path, capsys):
    assert dashboard.main([storage.format(tmp=tmp_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and words in line


def test_without_the_extra_it_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)   # what `import` sees when it is not installed
    assert dashboard.main([]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "make dashboard" in line and ".[dashboard]" in line


def test_a_port_in_use_is_one_line(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="empty", storage=storage)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = []
        # in a thread, so that a server that did start fails this test instead of hanging it
        worker = threading.Thread(target=lambda: result.append(dashboard.main([storage, "--port", str(port)])),
                                  daemon=True)
        worker.start()
        worker.join(timeout=30)
    assert result == [2]
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot serve on 127.0.0.1:{port}: ") and "--port" in line


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
@pytest.mark.parametrize("variables, command", [
    ([], "-m lstm_core.dashboard  --host 127.0.0.1 --port 8080"),
    (["STORAGE=journal:/srv/lstm.log", "DASHBOARD_PORT=9001"],
     "-m lstm_core.dashboard 'journal:/srv/lstm.log' --host 127.0.0.1 --port 9001"),
])
def test_make_dashboard_runs_this_entry(variables, command):
    """The Makefile's command, printed (-n) and not run; -o keeps a stale venv stamp from showing its install.
    Under `make test` this make is nested: without the outer one's variables it prints no directory lines."""
    outer = ("STORAGE", "DASHBOARD_PORT", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "dashboard", *variables],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].endswith(command)
