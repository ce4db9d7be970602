"""Several machines on one study, with real parts: a real PostgreSQL or a journal file for the study, a real S3
server (moto's) or a folder for the artifact store. A "machine" is a process with a saves root, a HOME and a
working directory of its own: what machines share is only the study storage and the artifact store, so a test
passes only if those two carry everything one machine needs of another's trials."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
from torch.utils.cpp_extension import get_default_build_root

from conftest import DATA_DIR, S3_BUCKET, wait_until
from lstm_core.artifacts import FILES_ATTR, MISSING_ATTR, SOURCE_FILE, STORE_ATTR, cache_dir
from lstm_core.jobs import STOP_FILE
from lstm_core.storage import make_storage

# Tiny trials: two machines share this 2-core box, one thread each.
TINY = ["--val-size", "500", "--batch-size", "100", "--aug-rotate", "0", "--aug-translate", "0", "--aug-scale", "0",
        "--num-threads", "1", "--pruner", "none"]
SHORT = ["--limit-train", "1000", "--epochs", "1", *TINY]
# two machines started together both get trials only if a trial outlasts the gap between their starts
SHARED = ["--limit-train", "4000", "--epochs", "1", *TINY]
SPACE = {"hidden_size": {"type": "int", "low": 8, "high": 32},
         "lr": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
         "optimizer": {"type": "categorical", "choices": ["adam", "adamw"]}}
# Optuna >= 4.9's name for the callback that queues a stale trial again (storage.make_storage picks the same)
RetryCallback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
    optuna.storages.RetryFailedTrialCallback
WARNING = "warning: study {study}, trial {number}: its value is kept, but only "


class Machine(dict):
    """The environment of one simulated machine (a dict for subprocess's env), with its own folders."""

    def __init__(self, env: dict, root: Path):
        super().__init__(env)
        self.root, self.saves, self.cwd = root, Path(env["LSTM_SAVES"]), root / "work"

    def command(self, *args) -> list[str]:
        return [sys.executable, "-m", "lstm_core", *map(str, args)]

    def start(self, *args) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), cwd=self.cwd, env=self, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), cwd=self.cwd, env=self, capture_output=True, text=True,
                              timeout=timeout)


# What a machine has installed, as `make` leaves it: the CPU kernel built into torch's extension cache, under
# the real HOME (a fresh HOME alone would rebuild it, ~40 s, in every process).
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def machine(tmp_path: Path, name: str, extra_env: dict | None = None) -> Machine:
    """A machine: its own saves root, HOME and working directory under tmp_path/name, the MNIST files (every
    machine has the data), and `extra_env` (how it reaches the artifact store). Nothing of this process's
    saves root or S3 settings leaks in: a machine reaches only what it is given."""
    root = tmp_path / name
    for folder in ("saves", "home", "work"):
        (root / folder).mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LSTM_", "AWS_", "XDG_"))}
    env.update(LSTM_SAVES=str(root / "saves"), LSTM_DATA=str(DATA_DIR), HOME=str(root / "home"),
               TORCH_EXTENSIONS_DIR=EXTENSIONS, **(extra_env or {}))
    return Machine(env, root)


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(SPACE))
    return path


def unique(name: str) -> str:
    """A study name of its own: the PostgreSQL server is shared by the whole test session."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def load(study_name: str, url: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=make_storage(url, heartbeat=False))


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Each process's (exit status, stdout, stderr), once all have ended."""
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def evaluation(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- two worker machines, and a third that opens their trials after they are gone -------------------------
@pytest.fixture(params=["postgresql+s3", "journal+folder"])
def shared(request, tmp_path):
    """(study storage URL, artifact store, env a machine needs to reach them, a way to make the store
    unreachable): a real PostgreSQL and S3 server, or a journal file and a folder on a disk the machines
    share."""
    if request.param == "postgresql+s3":
        url, s3 = request.getfixturevalue("postgres_url"), request.getfixturevalue("s3")
        return url, f"s3://{S3_BUCKET}/studies", s3.env, s3.stop
    disk = tmp_path / "shared"
    disk.mkdir()
    store = disk / "artifacts"
    return f"journal:{disk / 'studies.log'}", str(store), {}, lambda: store.rename(disk / "artifacts-gone")


@pytest.mark.slow
def test_trials_two_machines_ran_open_anywhere_after_both_are_gone(tmp_path, space, shared):
    url, store, env, make_store_unreachable = shared
    study_name = unique("shared")
    workers = [machine(tmp_path, name, env) for name in ("worker-a", "worker-b")]
    procs = [w.start("tune", "--study", study_name, "--trials", 3, "--storage", url, "--artifacts", store,
                     "--space", space, *SHARED) for w in workers]
    try:
        results = finish(procs)
    finally:
        kill_all(procs)
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert not any("warning: study" in err for _, _, err in results), [err for _, _, err in results]

    study = load(study_name, url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 3
    assert len({t.user_attrs["worker_pid"] for t in complete}) == 2      # both machines ran trials
    assert study.user_attrs[STORE_ATTR] == (store if store.startswith("s3://") else str(Path(store).resolve()))
    for worker in workers:                # the machines are gone: nothing of theirs remains where they were
        worker.saves.rename(worker.root / "gone")

    reader = machine(tmp_path, "reader", env)
    for trial in complete:
        # no --artifacts: the study says where its trials' results are
        got = evaluation(reader.run("evaluate", "--study", study_name, "--trial", trial.number, "--storage", url))
        folder = cache_dir(study_name, trial.number, reader.saves)
        assert got["path"] == str(folder)
        assert got["test_accuracy"] == trial.user_attrs["test_accuracy"]        # the trial's own model
        assert {"config.json", "eval.json", "best.pt", SOURCE_FILE} <= {p.name for p in folder.iterdir()}
        for name, (_, size) in trial.user_attrs[FILES_ATTR].items():          # every file, whole
            assert (folder / name).stat().st_size == size, name

    first = complete[0].number
    folder = cache_dir(study_name, first, reader.saves)
    report = reader.run("report", "--study", study_name, "--trial", first, "--storage", url)
    assert report.returncode == 0, report.stderr
    assert Path(report.stdout.strip()) == folder / "report.html" and "<html" in (folder / "report.html").read_text()
    export = reader.run("export", "--study", study_name, "--trial", first, "--storage", url, "--format", "torchscript")
    assert export.returncode == 0, export.stderr
    assert Path(export.stdout.strip()) == folder / "model.ts.pt" and (folder / "model.ts.pt").stat().st_size > 0

    # a trial opened once is read from the cache: with the store out of reach, it still opens, unchanged
    source = (folder / SOURCE_FILE).read_text()
    assert json.loads(source)["store"] == study.user_attrs[STORE_ATTR]
    make_store_unreachable()
    again = evaluation(reader.run("evaluate", "--study", study_name, "--trial", first, "--storage", url))
    assert again["test_accuracy"] == complete[0].user_attrs["test_accuracy"]
    assert (folder / SOURCE_FILE).read_text() == source                       # not downloaded again


# -- a machine that dies mid-trial ------------------------------------------------------------------------
def retried_from(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial that `trial` retries (Optuna's own record of it), else None."""
    with warnings.catch_warnings():       # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryCallback.retried_trial_number(trial)


def past_an_epoch(saves: Path, study_name: str) -> list[int]:
    """The numbers of the trials of `study_name` that finished an epoch on the machine with saves root `saves`."""
    return [int(metrics.parent.name.split("_")[1])
            for metrics in (saves / "studies" / study_name).glob("trial_*/metrics.jsonl")
            if '"event": "epoch"' in metrics.read_text()]


@pytest.mark.slow
def test_a_machine_killed_mid_trial_has_its_trial_failed_by_heartbeat_and_retried_by_another(
        tmp_path, space, postgres_url):
    study_name = unique("killed")
    a, b = machine(tmp_path, "worker-a"), machine(tmp_path, "worker-b")
    # A's trial would take minutes (200 epochs, no early stopping); B's take a few seconds each, and B goes on
    # until told to stop, so it is still starting trials (each start is when Optuna fails the stale ones) when
    # A's trial goes stale.
    victim = a.start("tune", "--study", study_name, "--trials", 1, "--storage", postgres_url, "--space", space,
                     *SHORT, "--epochs", 200, "--patience", 0)
    survivor = b.start("tune", "--study", study_name, "--trials", 1000, "--storage", postgres_url, "--space", space,
                       *SHORT)

    def trial(n: int) -> optuna.trial.FrozenTrial:
        return next(t for t in study.get_trials() if t.number == n)

    try:
        [number] = wait_until(lambda: past_an_epoch(a.saves, study_name) if victim.poll() is None else
                              pytest.fail(f"machine A ended first: {victim.communicate()[1][-2000:]}"), 120,
                              "a trial of machine A finishing an epoch")
        study = load(study_name, postgres_url)
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
        killed_at = time.monotonic()
        # Its heartbeat stops; once the grace period is over, the next trial machine B starts fails it and
        # queues it again, and B runs that copy.
        wait_until(lambda: trial(number).state == optuna.trial.TrialState.FAIL, 60, f"trial {number} failing")
        failed_after = time.monotonic() - killed_at
        retry = wait_until(lambda: next((t for t in study.get_trials() if retried_from(t) == number
                                         and t.state.is_finished()), None), 60, f"the retry of trial {number} ending")
        (b.saves / "studies" / study_name / STOP_FILE).touch()        # B's person stops B: the study is done
        [(code, _, err)] = finish([survivor], timeout=120)
    finally:
        kill_all([victim, survivor])
    assert code == 0, err[-2000:]
    assert failed_after < 45, f"trial {number} failed {failed_after:.0f} s after its worker was killed"

    killed = trial(number)
    assert killed.user_attrs["worker_pid"] == victim.pid
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == killed.params   # the same trial
    assert retry.user_attrs["worker_pid"] == survivor.pid                                    # run by machine B
    assert Path(retry.user_attrs["run_dir"]).parent == b.saves / "studies" / study_name
    trials = study.get_trials()
    assert [t.number for t in trials if retried_from(t) is not None] == [retry.number]         # retried once
    # no other trial is lost: only the killed one failed, and nothing is left running or queued (B's last
    # trial, cut short by the stop, is kept as pruned)
    assert [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL] == [number]
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
               for t in trials if t.number != number)


# -- an artifact store that fails mid-study ---------------------------------------------------------------
@pytest.mark.slow
def test_a_store_that_goes_away_mid_study_keeps_every_trials_value_and_says_why(tmp_path, space, s3):
    study_name = unique("outage")
    url = f"journal:{tmp_path / 'studies.log'}"
    store = f"s3://{S3_BUCKET}/outage"
    worker = machine(tmp_path, "worker", s3.env)
    proc = worker.start("tune", "--study", study_name, "--trials", 3, "--storage", url, "--artifacts", store,
                        "--space", space, *SHORT)
    try:
        def uploaded():
            try:
                trials = load(study_name, url).trials
            except (KeyError, optuna.exceptions.OptunaError):
                return False
            return bool(trials and trials[0].user_attrs.get(FILES_ATTR))
        wait_until(uploaded, 120, "trial 0's results reaching the store")
        s3.stop()
        stopped_at = time.time()
        [(code, out, err)] = finish([proc])
    finally:
        kill_all([proc])
    if code != 0 or "Traceback" in err:
        pytest.fail(f"the worker ended with status {code}, saying:\n{err}")     # all of it: not cut short

    trials = load(study_name, url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(t.value is not None for t in trials)
    assert trials[0].user_attrs.get(FILES_ATTR) and MISSING_ATTR not in trials[0].user_attrs
    missing = [t for t in trials if MISSING_ATTR in t.user_attrs]
    for trial in trials:
        if trial.datetime_start.timestamp() >= stopped_at:      # its upload came after the store went away
            assert trial in missing
    assert missing and missing[-1].number == 2
    for trial in missing:
        reason = trial.user_attrs[MISSING_ATTR]
        assert FILES_ATTR not in trial.user_attrs and "\n" not in reason
        assert f"artifact store {store} at {s3.endpoint}: " in reason and "Could not connect" in reason
        assert f"they stay in {worker.saves / 'studies' / study_name / f'trial_{trial.number}'}" in reason
    # one line per trial whose results did not reach the store, saying why and where they are instead
    assert [line for line in err.splitlines() if line.startswith("warning:")] == \
        [WARNING.format(study=study_name, number=t.number) + t.user_attrs[MISSING_ATTR] for t in missing]

    # another machine asking for such a trial is told why it cannot have it, in one line
    worker.saves.rename(worker.root / "gone")        # (only the worker's own disk has its folders)
    reader = machine(tmp_path, "reader", s3.env)
    asked = reader.run("evaluate", "--study", study_name, "--trial", missing[-1].number, "--storage", url)
    assert asked.returncode == 2
    [line] = asked.stderr.strip().splitlines()
    assert line == (f"error: trial {missing[-1].number} of study {study_name} is not in the artifact store: "
                    + missing[-1].user_attrs[MISSING_ATTR])


# -- a store that cannot be written is refused before any trial ------------------------------------------------
@pytest.mark.parametrize("where", ["missing bucket", "unreachable endpoint"])
def test_a_store_that_cannot_be_written_is_refused_before_any_trial(tmp_path, space, s3, where):
    if where == "missing bucket":
        store, why = "s3://no-such-bucket/studies", "NoSuchBucket"
    else:
        s3.stop()                                   # its port now refuses connections
        store, why = f"s3://{S3_BUCKET}/studies", "Could not connect to the endpoint URL"
    worker = machine(tmp_path, "worker", s3.env)
    result = worker.run("tune", "--study", "refused", "--trials", 1, "--artifacts", store, "--space", space, *SHORT,
                        timeout=120)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write to the artifact store {store} at {s3.endpoint}: ") and why in line
    assert result.stdout == ""
    # refused before the study began: no trial, no trial folder
    assert not (worker.saves / "studies").exists()
    assert optuna.get_all_study_names(f"sqlite:///{worker.saves / 'optuna.db'}") == []
