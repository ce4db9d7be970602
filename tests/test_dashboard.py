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
from pathlib import Path

import optuna
import pytest

from conftest import REPO, S3_BUCKET, free_port, tiny_config, wait_until
from lstm_core import dashboard
from lstm_core.artifacts import FILES_ATTR, STORE_ATTR, open_store, upload_trial
from lstm_core.runs import Run
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
    ([], "-m lstm_core.dashboard   --host 127.0.0.1 --port 8080"),
    (["STORAGE=journal:/srv/lstm.log", "DASHBOARD_PORT=9001"],
     "-m lstm_core.dashboard 'journal:/srv/lstm.log'  --host 127.0.0.1 --port 9001"),
    (["ARTIFACTS=s3://lstm-studies/mnist"],
     "-m lstm_core.dashboard  --artifacts 's3://lstm-studies/mnist' --host 127.0.0.1 --port 8080"),
])
def test_make_dashboard_runs_this_entry(variables, command):
    """The Makefile's command, printed (-n) and not run; -o keeps a stale venv stamp from showing its install.
    Under `make test` this make is nested: without the outer one's variables it prints no directory lines."""
    outer = ("STORAGE", "ARTIFACTS", "DASHBOARD_PORT", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "dashboard", *variables],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].endswith(command)


# -- the trials' results, from the study's artifact store (tune --artifacts) ---------------------------------
@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A saves root with a real one-trial study whose results went to a folder store, as `tune --artifacts`
    leaves it (the study records the store's absolute path)."""
    top = tmp_path_factory.mktemp("stored")
    root, store = top / "saves", top / "store"
    root.mkdir()
    study = run_worker("art", trials=1, base=tiny_config(), storage=default_storage(root),
                       space={"hidden_size": {"type": "int", "low": 8, "high": 16}}, pruner="none", root=root,
                       artifacts=str(store))
    [trial] = study.trials
    assert study.user_attrs[STORE_ATTR] == str(store) and trial.user_attrs[FILES_ATTR]
    return {"root": root, "store": store, "storage": default_storage(root),
            "run": Run(Path(trial.user_attrs["run_dir"]))}


@contextlib.contextmanager
def serving(storage, store):
    """dashboard.serve in this process on a free port, until the block ends."""
    server = dashboard.serve(storage, "127.0.0.1", 0, store)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def assert_artifacts_served(url: str, name: str, storage: str, run: Run) -> None:
    """Study `name`'s only trial lists the run's result files as artifacts, as the trial recorded them, and
    each one the dashboard serves is byte for byte the file in the run folder."""
    [summary] = [s for s in get_json(f"{url}/api/studies")["study_summaries"] if s["study_name"] == name]
    [trial] = get_json(f"{url}/api/studies/{summary['study_id']}")["trials"]
    listed = {a["filename"]: a["artifact_id"] for a in trial["artifacts"]}
    [recorded] = optuna.load_study(study_name=name, storage=make_storage(storage, heartbeat=False)).trials
    assert listed == {file: artifact_id for file, (artifact_id, _) in recorded.user_attrs[FILES_ATTR].items()}
    assert {"eval.json", "best.pt", "metrics.jsonl", "config.json"} <= set(listed)
    for file in ("eval.json", "best.pt"):
        address = f"{url}/artifacts/{summary['study_id']}/{trial['trial_id']}/{listed[file]}"
        with urllib.request.urlopen(address, timeout=10) as response:
            assert response.status == 200 and response.read() == (run.path / file).read_bytes()


def test_the_store_the_study_records_serves_its_trials_results(stored):
    storage = make_storage(stored["storage"], heartbeat=False)
    store, spec, warning = dashboard.artifact_store(storage)          # no --artifacts
    assert spec == str(stored["store"]) and warning is None
    with serving(storage, store) as url:
        assert_artifacts_served(url, "art", stored["storage"], stored["run"])


@pytest.mark.slow
def test_make_dashboard_with_artifacts_serves_the_trials_results_from_that_store(stored, tmp_path):
    """--artifacts overrides the recorded store: here a copy of it, as another machine mounts it elsewhere."""
    elsewhere = tmp_path / "mounted-here"
    shutil.copytree(stored["store"], elsewhere)
    with served(stored["root"], tmp_path / "dashboard.log", "--artifacts", str(elsewhere)) as url:
        assert_artifacts_served(url, "art", stored["storage"], stored["run"])
    assert f"(1 study in {stored['storage']}, artifacts from {elsewhere})" in (tmp_path / "dashboard.log").read_text()


def test_an_s3_store_the_study_records_serves_its_trials_results(stored, s3, tmp_path):
    """The same run's results uploaded to S3 under a prefix (moto's server), as tune's objective does."""
    storage_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = f"s3://{S3_BUCKET}/studies"
    study = optuna.create_study(study_name="art", storage=storage_url, direction="maximize")
    study.set_user_attr(STORE_ATTR, spec)
    trial = study.ask()
    assert upload_trial(trial, stored["run"], open_store(spec), spec) is None
    study.tell(trial, 0.5)
    storage = make_storage(storage_url, heartbeat=False)
    store, served_spec, warning = dashboard.artifact_store(storage)
    assert served_spec == spec and warning is None
    with serving(storage, store) as url:
        assert_artifacts_served(url, "art", storage_url, stored["run"])
    # under the prefix (moto's servers in one process share their buckets: other tests' objects are there too)
    ids = [artifact_id for artifact_id, _ in study.trials[0].user_attrs["artifacts"].values()]
    assert ids and set(s3.keys()) >= {f"studies/{i}" for i in ids} and not set(s3.keys()) & set(ids)


@pytest.mark.parametrize("store, words", [
    ("{tmp}/nowhere", "no such folder"),
    ("{tmp}/optuna.db", "is a file, not a folder"),
    ("ftp://host/artifacts", "a store is a folder or s3://"),
    ("s3://", "name a bucket"),
])
def test_an_artifact_store_that_cannot_be_opened_is_one_line_and_exit_2(store, words, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="empty", storage=storage)
    assert dashboard.main([storage, "--artifacts", store.format(tmp=tmp_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and words in line


def test_an_s3_store_that_cannot_be_read_is_one_line_and_exit_2(s3, tmp_path, capsys, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="empty", storage=storage)
    assert dashboard.main([storage, "--artifacts", "s3://no-such-bucket/x"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot read the artifact store s3://no-such-bucket/x at http") and \
        "no such bucket" in line
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")     # nothing listens there
    assert dashboard.main([storage, "--artifacts", f"s3://{S3_BUCKET}"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot read the artifact store s3://{S3_BUCKET} at http://127.0.0.1:")


def test_recorded_stores_that_cannot_be_served_are_a_warning_and_the_studies_are_served_without(tmp_path):
    """The workers' stores may be another machine's: the studies still show, and the warning says what to do."""
    storage_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    for name, store in (("a", tmp_path / "store-a"), ("b", tmp_path / "store-b"), ("c", tmp_path / "store-a")):
        store.mkdir(exist_ok=True)
        optuna.create_study(study_name=name, storage=storage_url).set_user_attr(STORE_ATTR, str(store))
    optuna.create_study(study_name="none", storage=storage_url)       # no store: nothing to choose between
    storage = make_storage(storage_url, heartbeat=False)
    store, spec, warning = dashboard.artifact_store(storage)
    assert store is None and spec is None
    assert f"{tmp_path / 'store-a'} (a, c); {tmp_path / 'store-b'} (b)" in warning and "--artifacts" in warning
    store, spec, warning = dashboard.artifact_store(storage, str(tmp_path / "store-b"))    # the flag chooses
    assert spec == str(tmp_path / "store-b") and store is not None and warning is None

    lone = f"sqlite:///{tmp_path / 'lone.db'}"
    optuna.create_study(study_name="far", storage=lone).set_user_attr(STORE_ATTR, "/mnt/their-machine/store")
    store, spec, warning = dashboard.artifact_store(make_storage(lone, heartbeat=False))
    assert store is None and "/mnt/their-machine/store: no such folder (recorded by far)" in warning


def test_a_warning_is_one_line_before_the_dashboard_serves(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="far", storage=storage).set_user_attr(STORE_ATTR, "/mnt/their-machine/store")
    with socket.socket() as taken:          # a taken port: main() warns, then stops at the bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert dashboard.main([storage, "--port", str(taken.getsockname()[1])]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: ") and "serving the studies without artifacts" in warning
    assert error.startswith("error: cannot serve on")
