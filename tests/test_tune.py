"""Optuna studies from the CLI on small slices of the real data, in SQLite (and PostgreSQL when present)."""
import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
import torch

from conftest import DATA_DIR, REPO, tiny_config, wait_until
from lstm_core.jobs import STOP_FILE
from lstm_core.storage import make_storage
from lstm_core.tune import MAX_FAILURES_IN_A_ROW, SEARCH_RANGES, FailureStreak, run_worker

SMALL = ["--limit-train", "1000", "--val-size", "500", "--epochs", "2", "--batch-size", "100",
         "--aug-rotate", "0", "--aug-translate", "0", "--aug-scale", "0"]
# two workers share a study only if a trial outlasts a second worker's start (importing torch, loading the
# data): on a fast CPU a 1,000-sample trial does not, and the first worker finishes the study alone
SHARED = ["--limit-train", "8000", *SMALL[2:]]
SPACE = {"hidden_size": {"type": "int", "low": 8, "high": 32},
         "lr": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
         "optimizer": {"type": "categorical", "choices": ["adam", "adamw"]}}


def tune(saves, *args, timeout=600):
    env = {**os.environ, "LSTM_SAVES": str(saves), "LSTM_DATA": str(DATA_DIR)}
    return subprocess.run([sys.executable, "-m", "lstm_core", "tune", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(SPACE))
    return path


def storage_of(saves):
    return f"sqlite:///{saves / 'optuna.db'}"


@pytest.mark.slow
def test_a_study_completes_resumes_and_keeps_a_run_directory_per_trial(saves, space):
    first = tune(saves, "--study", "s1", "--trials", 3, "--space", space, "--sampler-seed", 1, *SMALL, "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["counts"]["COMPLETE"] + summary["counts"]["PRUNED"] == 3
    again = tune(saves, "--study", "s1", "--trials", 5, "--space", space, *SMALL, "--json")
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="s1", storage=storage_of(saves))   # a plain Optuna study
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 5 and [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert study.metric_names == ["val_accuracy"]                           # named for every Optuna tool
    for trial in finished:
        run_dir = saves / "studies" / "s1" / f"trial_{trial.number}"
        assert trial.user_attrs["run_dir"] == str(run_dir)
        evaluation = json.loads((run_dir / "eval.json").read_text())
        assert len(evaluation["confusion_matrix"]) == 10 and 0 <= evaluation["test_accuracy"] <= 1
        config = json.loads((run_dir / "config.json").read_text())
        assert {k: config[k] for k in trial.params} == trial.params     # the trial trained what it suggested
        if trial.state == optuna.trial.TrialState.COMPLETE:
            epochs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                      if '"epoch"' in l and '"event": "epoch"' in l]
            assert trial.value == max(e["val_accuracy"] for e in epochs)  # validation, never the test set
    assert set(study.best_trial.params) == set(SPACE)


@pytest.mark.slow
def test_two_workers_share_one_study(saves, space):
    result = tune(saves, "--study", "w2", "--trials", 4, "--workers", 2, "--space", space, *SHARED)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="w2", storage=storage_of(saves))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 4 <= len(finished) <= 5                      # the target, plus at most one in flight at the end
    assert len({t.user_attrs["worker_pid"] for t in finished}) == 2


@pytest.mark.slow
def test_the_median_pruner_prunes_a_hopeless_trial(saves, tmp_path):
    hopeless = tmp_path / "hopeless.json"
    hopeless.write_text(json.dumps({"lr": {"type": "categorical", "choices": [0.01, 1e-6]},
                                    "hidden_size": {"type": "int", "low": 16, "high": 24}}))
    result = tune(saves, "--study", "p", "--trials", 7, "--space", hopeless, "--sampler", "random",
                  "--sampler-seed", 3, "--pruner", "median", *SMALL[:-6], "--epochs", "3")
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="p", storage=storage_of(saves))
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.params["lr"] == 1e-6 for t in pruned)
    evaluation = json.loads((saves / "studies" / "p" / f"trial_{pruned[0].number}" / "eval.json").read_text())
    assert evaluation["stopped"] == "pruned"


@pytest.mark.slow
def test_a_killed_worker_fails_its_trial_by_heartbeat_and_the_study_goes_on(saves, space):
    env = {**os.environ, "LSTM_SAVES": str(saves), "LSTM_DATA": str(DATA_DIR)}
    long_trial = [a if a != "2" else "200" for a in SMALL]        # a trial that would take minutes
    victim = subprocess.Popen([sys.executable, "-m", "lstm_core", "tune", "--study", "hb", "--trials", "1",
                               "--space", str(space), *long_trial], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = saves / "studies" / "hb" / "trial_0" / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and '"event": "epoch"' in metrics.read_text(), 120,
                   "trial 0's first epoch")
        # the storage's own judgement of which trials are stale, the one the next worker's Optuna acts on
        # (Optuna has no public question for it)
        storage = make_storage(storage_of(saves))
        study_id = storage.get_study_id_from_name("hb")
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, 0)
        stale = lambda: storage._get_stale_trial_ids(study_id)  # noqa: E731
        assert trial_id not in stale()                               # its worker's heartbeat keeps it fresh
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    wait_until(lambda: trial_id in stale(), 60, "the killed worker's trial going stale (its heartbeat stopped)")
    result = tune(saves, "--study", "hb", "--trials", 2, "--space", space, *SMALL)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="hb", storage=storage_of(saves))
    states = {t.number: t.state for t in study.trials}
    assert states[0] == optuna.trial.TrialState.FAIL
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) >= 2


@pytest.mark.slow
def test_a_journal_study_fails_the_trial_of_a_killed_worker_of_this_machine_when_the_next_worker_starts(
        saves, space, tmp_path):
    # a journal has no heartbeat: without this, the killed worker's trial would stay RUNNING for good
    journal = f"journal:{tmp_path / 'studies.log'}"
    env = {**os.environ, "LSTM_SAVES": str(saves), "LSTM_DATA": str(DATA_DIR)}
    long_trial = [a if a != "2" else "200" for a in SMALL]
    victim = subprocess.Popen([sys.executable, "-m", "lstm_core", "tune", "--study", "jk", "--trials", "1",
                               "--storage", journal, "--space", str(space), *long_trial], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = saves / "studies" / "jk" / "trial_0" / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and '"event": "epoch"' in metrics.read_text(), 120, "trial 0's first epoch")
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    study = optuna.load_study(study_name="jk", storage=make_storage(journal))
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING       # nothing else would ever end it
    result = tune(saves, "--study", "jk", "--trials", 1, "--storage", journal, "--space", space, *SMALL)
    assert result.returncode == 0, result.stderr
    assert "study jk: trial 0 was left running by a worker on this machine that is gone: marked failed" in result.stderr
    states = [t.state for t in optuna.load_study(study_name="jk", storage=make_storage(journal)).trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
def test_two_workers_on_postgresql(saves, space, postgres_url):
    result = tune(saves, "--study", "pg", "--trials", 4, "--workers", 2, "--storage", postgres_url, "--space", space,
                  *SHARED, "--json")
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 4 <= len(finished) <= 5 and len({t.user_attrs["worker_pid"] for t in finished}) == 2
    assert json.loads(result.stdout.strip().splitlines()[-1])["storage"] == postgres_url


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_that_is_absent_is_refused_before_any_trial(saves, space):
    result = tune(saves, "--study", "nogpu", "--trials", 2, "--space", space, *SMALL, "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: device 'cuda' was asked for, but no CUDA GPU is "
                                                  "available here"]
    assert not (saves / "studies").exists() and not (saves / "optuna.db").exists()


def test_a_worker_stops_after_a_few_failed_trials_in_a_row():
    study = optuna.create_study()
    streak = FailureStreak(limit=3)

    def broken(trial):
        trial.suggest_int("hidden_size", 8, 16)
        if trial.number == 1:
            return 1.0                                  # a success resets the count
        trial.set_user_attr("error", "RuntimeError: CUDA out of memory")
        raise RuntimeError("CUDA out of memory")
    study.optimize(broken, n_trials=100, callbacks=[streak], catch=(RuntimeError,))
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "FAIL", "FAIL", "FAIL"]
    assert streak.reason == ("stopped after 3 failed trials in a row; the last (trial 4) failed with "
                             "RuntimeError: CUDA out of memory")


@pytest.mark.slow
def test_a_study_whose_every_trial_fails_ends_with_one_line_not_a_runaway(saves, tmp_path):
    """Each value is valid on its own (the space passes its check), but together they make no valid config:
    whatever makes every trial fail, the worker stops after a few."""
    doomed = tmp_path / "doomed.json"
    doomed.write_text(json.dumps({"limit_train": {"type": "categorical", "choices": [1000]},
                                  "batch_size": {"type": "categorical", "choices": [1500]}}))
    result = tune(saves, "--study", "doomed", "--trials", 50, "--space", doomed, "--epochs", "1")
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: study doomed: stopped after {MAX_FAILURES_IN_A_ROW} failed trials in a row; the last "
                     "(trial 2) failed with ConfigError: limit_train (1000) must be at least batch_size (1500)"]
    study = optuna.load_study(study_name="doomed", storage=storage_of(saves))
    assert [t.state.name for t in study.trials] == ["FAIL"] * MAX_FAILURES_IN_A_ROW
    assert not list((saves / "studies" / "doomed").glob("trial_*"))      # no folder for a config that never was


@pytest.mark.slow
def test_commands_started_together_on_a_fresh_storage_all_join_the_study(saves, space):
    env = {**os.environ, "LSTM_SAVES": str(saves), "LSTM_DATA": str(DATA_DIR)}
    args = [sys.executable, "-m", "lstm_core", "tune", "--study", "together", "--trials", "3", "--space", str(space),
            *SMALL, "--epochs", "1"]
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in results]
    study = optuna.load_study(study_name="together", storage=storage_of(saves))
    assert len({t.user_attrs["worker_pid"] for t in study.trials}) == 3          # each command ran a trial


@pytest.mark.slow
def test_a_killed_worker_process_has_its_trial_failed_before_the_command_reports(saves, space):
    env = {**os.environ, "LSTM_SAVES": str(saves), "LSTM_DATA": str(DATA_DIR)}
    long_trial = [a if a != "2" else "200" for a in SMALL]
    command = subprocess.Popen([sys.executable, "-m", "lstm_core", "tune", "--study", "dk", "--trials", "4",
                                "--workers", "2", "--space", str(space), *long_trial], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = saves / "studies" / "dk"
    try:
        wait_until(lambda: len([m for m in folder.glob("trial_*/metrics.jsonl")
                                if '"event": "epoch"' in m.read_text()]) >= 2, 180, "two trials reaching an epoch")
    except AssertionError:
        (folder / STOP_FILE).touch()                                 # not minutes of trials after the failure
        command.kill()
        raise
    child = json.loads((folder / "workers.json").read_text())["workers"][0]["pid"]   # not the command itself
    os.kill(child, signal.SIGKILL)
    (folder / STOP_FILE).touch()                                     # and stop the study
    out, err = command.communicate(timeout=300)
    assert command.returncode == 1
    study = optuna.load_study(study_name="dk", storage=storage_of(saves))
    (victim,) = [t for t in study.trials if t.user_attrs["worker_pid"] == child]
    assert victim.state == optuna.trial.TrialState.FAIL                # at once, not after the heartbeat's grace
    assert f"worker {child} ended with status -9 in trial {victim.number}: marked failed" in err
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_a_study_in_a_journal_file_runs_and_reads_back_with_optunas_own_storage(saves, space):
    """journal:PATH is Optuna's journal file: a study with no database server, which machines can share on
    one filesystem. Two commands add to one study; Optuna's JournalStorage reads it back."""
    journal = saves / "study.log"
    for total in (2, 3):
        out = tune(saves, "--study", "j", "--trials", total, "--space", space, "--storage", f"journal:{journal}",
                   *SMALL, "--json")
        assert out.returncode == 0, out.stderr
    from optuna.storages.journal import JournalFileBackend
    study = optuna.load_study(study_name="j", storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    assert [t.number for t in study.trials if t.state.is_finished()] == [0, 1, 2]
    assert study.metric_names == ["val_accuracy"]
    assert all((saves / "studies" / "j" / f"trial_{n}" / "eval.json").exists() for n in (0, 1, 2))


def test_a_journal_in_a_missing_folder_is_one_line(saves, space, tmp_path):
    out = tune(saves, "--study", "j", "--trials", 1, "--space", space, "--storage",
               f"journal:{tmp_path / 'nowhere' / 'study.log'}", *SMALL)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "does not exist" in line and "nowhere" in line


@pytest.mark.slow
def test_a_study_can_search_every_field_the_tuning_page_offers(saves):
    """Scheduler, clipping, sequence mode, forget gates, augmentation, amp...: each trial trains what it was
    suggested (its config.json), whatever the field."""
    space = {**SEARCH_RANGES, "hidden_size": {"type": "int", "low": 8, "high": 16},
             "num_layers": {"type": "int", "low": 1, "high": 2}}
    base = tiny_config(epochs=1, limit_train=300, val_size=200, batch_size=50)
    study = run_worker("everything", 3, base, space=space, sampler="random", pruner="none", seed=3, root=saves)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3 and all(set(t.params) == set(SEARCH_RANGES) for t in trials)
    for trial in trials:
        config = json.loads((saves / "studies" / "everything" / f"trial_{trial.number}" / "config.json").read_text())
        assert {k: config[k] for k in trial.params} == trial.params


def test_a_study_searches_the_cell_and_each_trial_trains_the_one_it_drew(saves):
    """The cell is a parameter like any other: each trial's folder holds the config and the weights of the
    cell Optuna suggested (a GRU's weights under gru.*, an RNN's under rnn.*)."""
    space = {"cell": {"type": "categorical", "choices": ["gru", "rnn"]}}
    base = tiny_config(epochs=1, limit_train=300, val_size=200, batch_size=50, hidden_size=16)
    study = run_worker("cells", 4, base, space=space, sampler="random", pruner="none", seed=0, root=saves)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4 and {t.params["cell"] for t in trials} == {"gru", "rnn"}
    for trial in trials:
        folder = saves / "studies" / "cells" / f"trial_{trial.number}"
        assert json.loads((folder / "config.json").read_text())["cell"] == trial.params["cell"]
        weights = torch.load(folder / "best.pt", weights_only=True)["model"]
        assert f"{trial.params['cell']}.weight_hh_l0" in weights
