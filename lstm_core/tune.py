"""Optuna studies over TrainConfig: a thin objective (suggest -> TrainConfig -> fit with pruning).

    study = run_worker("lstm-search", trials=20, base=preset("default").replace(epochs=5))
    python -m lstm_core tune --study lstm-search --trials 20 --workers 2 --epochs 5

Each trial trains into its own run directory, SAVES/studies/<study>/trial_<n>/ (the layout of a run,
with eval.json), whose path is the trial's user attribute `run_dir`. The objective is the best
validation accuracy; the test set is only evaluated for the record. The study is a plain Optuna study
in any storage URL (SQLite by default, PostgreSQL for several machines): optuna-dashboard and
optuna.load_study open it as they would any other. The processes that run a study (launched from the
app, a command's extra workers, stopping them) are jobs.py's.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna

from .artifacts import STORE_ATTR, open_store, store_spec, upload_trial
from .config import CHOICES, FIELD_TYPES, RECURRENT_ONLY, ConfigError, TrainConfig, from_dict, read_mapping
from .jobs import StopRequest, device_lock, training_devices
from .recorder import RunRecorder
from .runs import create_run, os_error_text, process_alive, process_start_time, safe_name, study_dir
from .storage import check_writable, default_storage, journal_path, make_storage
from .train import Callback, fit

# Every TrainConfig field a study can search, with the range the Tuning page first offers for it. Left out:
# what fixes the comparison itself (epochs, the data sizes, seed) or only where and how a run computes (device,
# threads, logging), and arch: a CNN ignores the LSTM's fields, so a search over both would mix two spaces.
SEARCH_RANGES: dict[str, dict[str, Any]] = {
    "cell": {"type": "categorical", "choices": list(CHOICES["cell"])},
    "seq_mode": {"type": "categorical", "choices": ["rows", "pixels"]},
    "hidden_size": {"type": "int", "low": 32, "high": 128},
    "num_layers": {"type": "int", "low": 1, "high": 3},
    "dropout": {"type": "float", "low": 0.1, "high": 0.5},
    "bidirectional": {"type": "categorical", "choices": [False, True]},
    "forget_init": {"type": "categorical", "choices": list(CHOICES["forget_init"])},
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd", "adamw", "rmsprop"]},
    "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.99},
    "scheduler": {"type": "categorical", "choices": list(CHOICES["scheduler"])},
    "batch_size": {"type": "int", "low": 64, "high": 256, "step": 64},
    "patience": {"type": "int", "low": 1, "high": 10},
    "grad_clip": {"type": "float", "low": 0.5, "high": 5.0},
    "aug_rotate": {"type": "float", "low": 0.0, "high": 15.0},
    "aug_translate": {"type": "float", "low": 0.0, "high": 0.15},
    "aug_scale": {"type": "float", "low": 0.0, "high": 0.15},
    "aug_shear": {"type": "float", "low": 0.0, "high": 10.0},
    "amp": {"type": "categorical", "choices": ["off", "auto"]},    # bf16 only where the device has it
}
# What a study searches unless told otherwise: the space of the popular MNIST-LSTM Optuna scripts, plus
# AdamW, RMSprop and bidirectional.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {name: SEARCH_RANGES[name] for name in (
    "optimizer", "lr", "weight_decay", "hidden_size", "num_layers", "dropout", "batch_size", "bidirectional")}
SAMPLERS = ("tpe", "random", "cmaes", "gp")
PRUNERS = ("median", "hyperband", "none")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
MAX_FAILURES_IN_A_ROW = 3     # a worker whose trials fail this many times in a row stops


class StudyFailing(RuntimeError):
    """A worker stopped because its trials kept failing; the message says why."""


class SpaceError(ConfigError):
    """A search space that names unknown fields or has malformed ranges."""


def check_space(space: Any, base: TrainConfig | None = None) -> dict[str, dict[str, Any]]:
    """A search space (param -> spec) checked up front against TrainConfig's own rules, with one clear
    message for the first problem: known fields, well-formed ranges (a positive step no larger than the
    range, log ranges above zero), and, given the fixed `base` config, every choice and both ends of every
    range a valid config; and no LSTM-only field searched for trials that train a CNN, which would ignore it
    while the trials recorded it. What passes here cannot make every trial fail."""
    if not isinstance(space, dict) or not space:
        raise SpaceError("a search space must be a non-empty mapping of config fields to ranges")
    for name, spec in space.items():
        if name not in FIELD_TYPES:
            raise SpaceError(f"search space: {name!r} is not a TrainConfig field")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise SpaceError(f"search space: {name} needs a type of float, int or categorical")
        unknown = sorted(set(spec) - SPEC_KEYS[spec["type"]])
        if unknown:
            raise SpaceError(f"search space: {name} has an unknown key {unknown[0]!r} for a {spec['type']} range "
                             f"(known: {', '.join(sorted(SPEC_KEYS[spec['type']]))})")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise SpaceError(f"search space: {name} needs a non-empty list of choices")
            values = spec["choices"]
        else:
            values = check_range(name, spec)
        if base is not None:
            for value in values:
                try:
                    base.replace(**{name: value})
                except ConfigError as exc:
                    raise SpaceError(f"search space: with {name} = {value!r}: {exc}") from None
    cnn = (base is not None and base.arch == "cnn") or "cnn" in (space.get("arch") or {}).get("choices", ())
    ignored = [name for name in space if name in RECURRENT_ONLY]
    if cnn and ignored:
        raise SpaceError(f"search space: {', '.join(ignored)} only apply to recurrent models (LSTM, GRU, RNN), and "
                         "the trials would train a CNN "
                         "(arch cnn), which ignores them while its trials record them: drop them from the space, "
                         "or train a recurrent model (arch lstm, or an LSTM, GRU or RNN preset)")
    return space


SPEC_KEYS = {"categorical": {"type", "choices"}, "int": {"type", "low", "high", "step", "log"},
             "float": {"type", "low", "high", "step", "log"}}


def check_range(name: str, spec: dict) -> tuple:
    """An int or float range's ends, refused when Optuna could not sample it as written."""
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v   # noqa: E731
    if not (number(low) and number(high)) or low > high:
        raise SpaceError(f"search space: {name} needs numbers low <= high, got {low!r} and {high!r}")
    if FIELD_TYPES[name] is not float and spec["type"] == "float":
        raise SpaceError(f"search space: {name} takes whole numbers or choices, not a float range")
    if FIELD_TYPES[name] not in (int, float):
        raise SpaceError(f"search space: {name} is not a number: search it with choices")
    if not isinstance(log, bool):
        raise SpaceError(f"search space: {name}'s log must be true or false, got {log!r}")
    if log and low <= 0:
        raise SpaceError(f"search space: {name} is log-scaled, so low must be > 0, got {low}")
    if spec["type"] == "int" and not all(float(v).is_integer() for v in (low, high)):
        raise SpaceError(f"search space: {name} is an int range, got {low!r}..{high!r}")
    if step is not None:
        if not number(step) or step <= 0:
            raise SpaceError(f"search space: {name}'s step must be a number above 0, got {step!r}")
        if spec["type"] == "int" and not float(step).is_integer():
            raise SpaceError(f"search space: {name} is an int range, so its step must be whole, got {step!r}")
        if step > high - low and high > low:
            raise SpaceError(f"search space: {name}'s step {step:g} is larger than its range {low:g}..{high:g}: "
                             "it would sample one value only")
        if log and (spec["type"] == "float" or step != 1):
            raise SpaceError(f"search space: {name} cannot be log-scaled and stepped at once (Optuna samples "
                             "one or the other)")
    return low, high


def load_space(path: str | Path | None, base: TrainConfig | None = None) -> dict[str, dict[str, Any]]:
    """The search space in a JSON or TOML file (None: DEFAULT_SPACE), checked against `base` (check_space)."""
    return check_space(DEFAULT_SPACE if path is None else read_mapping(path), base)


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                             log=bool(spec.get("log", False)))
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                               step=spec.get("step"), log=bool(spec.get("log", False)))
    return params


class Pruning(Callback):
    """Reports validation accuracy each epoch and stops the trial when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial
        self.pruned = False

    def on_epoch_end(self, state, record: dict) -> None:
        self.trial.report(record["val_accuracy"], record["epoch"])
        if self.trial.should_prune():
            self.pruned = True
            state.should_stop = True
            state.stop_reason = "pruned"


def make_sampler(name: str, seed: int | None = None) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


TARGET = "val accuracy"        # what a person calls every trial's value (the best validation accuracy of its epochs)
METRIC_NAME = "val_accuracy"  # what the objective returns, named in the study for every Optuna tool


def fail_running(study: optuna.Study, whose: Callable[[optuna.trial.FrozenTrial], bool]) -> list[int]:
    """Mark failed the RUNNING trials `whose` says a dead worker left; their numbers."""
    numbers = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if whose(trial):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            numbers.append(trial.number)
    return numbers


def fail_trials_of(study_name: str, url: str, pid: int) -> list[int]:
    """Mark failed the trials that a dead worker process left RUNNING (the heartbeat would, but only after
    its grace period); their numbers."""
    study = optuna.load_study(study_name=study_name, storage=make_storage(url, heartbeat=False))
    return fail_running(study, lambda trial: trial.user_attrs.get("worker_pid") == pid)


def fail_dead_workers_trials(study: optuna.Study) -> list[int]:
    """Mark failed the RUNNING trials whose worker on this machine is gone (killed, or its machine restarted):
    what a heartbeat does for database storages, done for a journal storage, which has none, when a worker
    starts. Trials of other machines' workers are left alone: whether those run cannot be told from here."""
    def gone(trial: optuna.trial.FrozenTrial) -> bool:
        worker = trial.user_attrs.get("worker") or {}
        return worker.get("host") == socket.gethostname() and not process_alive(worker.get("pid"),
                                                                               worker.get("pid_start"))
    return fail_running(study, gone)


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def objective_for(study_name: str, base: TrainConfig, space: dict, root: str | Path | None,
                  stop: Callable[[], bool], unwritable: list[OSError],
                  artifacts: tuple[Any, str] | None = None) -> Callable[[optuna.Trial], float]:
    """suggest -> TrainConfig -> fit with pruning -> best validation accuracy. Each trial trains while it
    holds its device's lock (jobs.device_lock): alone on a GPU, the first free one for `auto`; shared
    with the study's other trials on the CPU; after a run that is using or waiting for the device.
    A trial whose folder cannot be written (a full disk, a folder gone or read-only) fails, stops the
    study and lands in `unwritable`: every trial after it would fail the same way, and run_worker says it
    in one line rather than as Optuna's logged traceback. With `artifacts` (an opened store and its name),
    a trial that ran to its end uploads its results there (artifacts.upload_trial); an upload that fails
    keeps the trial's value and says so in one line."""
    def objective(trial: optuna.Trial) -> float:
        pid = os.getpid()
        trial.set_user_attr("worker_pid", pid)
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": pid, "pid_start": process_start_time(pid)})
        pruning = Pruning(trial)
        try:
            config = from_dict({**base.to_dict(), **suggest(trial, space)})
            devices = training_devices(config)
            path = study_dir(study_name, root) / f"trial_{trial.number}"
            if path.exists():  # a retried trial of a dead worker gets a fresh directory
                path = path.with_name(f"{path.name}_{int(time.time())}")
            run = create_run(config, path=path)
            trial.set_user_attr("run_dir", str(run.path))
            with device_lock(devices, f"{study_name}/{run.id}", root, stop=stop,
                             shared=devices == ["cpu"]) as device:
                if device is None:
                    run.write_status(state="cancelled", ended_at=time.time())
                    raise optuna.TrialPruned("the study was stopped while the trial waited for its device")
                history = fit(config, [RunRecorder(run), pruning], stop=stop, device=device)
        except optuna.TrialPruned:
            raise
        except OSError as exc:
            trial.set_user_attr("error", os_error_text(exc))
            unwritable.append(exc)
            trial.study.stop()
            return float("nan")                 # failed, without a traceback in the log
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            raise
        if history.test:
            trial.set_user_attr("test_accuracy", history.test["accuracy"])
        if artifacts is not None:
            missing = upload_trial(trial, run, *artifacts)
            if missing:
                print(f"warning: study {study_name}, trial {trial.number}: its value is kept, but only {missing}",
                      file=sys.stderr, flush=True)
        if pruning.pruned:
            raise optuna.TrialPruned(f"pruned at epoch {len(history.epochs)}")
        if history.stopped == "cancelled":
            raise optuna.TrialPruned("the study was stopped")  # keep its record, but not as a result
        return max(r["val_accuracy"] for r in history.epochs)   # the best validation accuracy of any epoch
    return objective


class FailureStreak:
    """An Optuna callback that stops this worker after `limit` of its trials in a row failed: a cause
    that fails every trial (a broken device, a space the config refuses) must not spin out thousands of
    failed trials. `reason` then holds the last trial's error."""

    def __init__(self, limit: int = MAX_FAILURES_IN_A_ROW):
        self.limit, self.count, self.reason = limit, 0, None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != optuna.trial.TrialState.FAIL:
            self.count = 0
            return
        self.count += 1
        if self.count >= self.limit:
            self.reason = (f"stopped after {self.count} failed trials in a row; the last (trial {trial.number}) "
                           f"failed with {trial.user_attrs.get('error', 'an error (see the log above)')}")
            study.stop()


def open_study(name: str, storage: str | optuna.storages.BaseStorage, sampler: str = "tpe", pruner: str = "median",
               seed: int | None = None) -> optuna.Study:
    """Study `name` in `storage` (a URL, or a storage make_storage opened), created on first use. The name is
    checked before the storage is opened: a bad name creates no database."""
    name = safe_name(name, "study name")
    storage = make_storage(storage) if isinstance(storage, str) else storage
    study = optuna.create_study(study_name=name, storage=storage,
                                direction="maximize", load_if_exists=True, sampler=make_sampler(sampler, seed),
                                pruner=make_pruner(pruner))
    if study.metric_names != [METRIC_NAME]:
        with warnings.catch_warnings():       # "experimental" since Optuna 3.2, and what its tools read
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])
    return study


def run_worker(name: str, trials: int, base: TrainConfig, storage: str | None = None, space: dict | None = None,
               timeout: float | None = None, sampler: str = "tpe", pruner: str = "median",
               root: str | Path | None = None, stop_event: threading.Event | None = None,
               seed: int | None = None, artifacts: str | None = None) -> optuna.Study:
    """Run trials of study `name` until it has `trials` finished ones (counted across all workers),
    `timeout` seconds pass, or a stop is requested (SIGTERM, the study's STOP file). A storage that stops
    taking writes meanwhile ends the worker with StudyFailing, naming the storage and the cause. With
    `artifacts` (a folder or s3://BUCKET[/PREFIX]), every trial's results go to that store too, and the
    study records it: any machine that shares the study can then open any trial (artifacts.trial_run)."""
    storage = storage or default_storage(root)
    space = check_space(space or DEFAULT_SPACE, base)
    artifacts = store_spec(artifacts) if artifacts else None   # as every machine reads it: a folder made absolute
    folder = study_dir(name, root)
    folder.mkdir(parents=True, exist_ok=True)
    opened = make_storage(storage)
    study = open_study(name, opened, sampler, pruner, seed)
    study.set_user_attr("space", json.loads(json.dumps(space)))
    study.set_user_attr("base_config", base.to_dict())
    store = None
    if artifacts:
        store = (open_store(artifacts, create=True), artifacts)
        study.set_user_attr(STORE_ATTR, artifacts)
    if journal_path(storage) is not None:
        for number in fail_dead_workers_trials(study):
            print(f"study {name}: trial {number} was left running by a worker on this machine that is gone: marked "
                  "failed", file=sys.stderr, flush=True)
    stop = StopRequest(folder, stop_event or threading.Event())

    def stop_requested(study: optuna.Study, trial) -> None:
        if stop():
            study.stop()

    failures, unwritable = FailureStreak(), []
    if finished_trials(study) < trials and not stop():
        # the trial count is across every worker of the study: Optuna's callback counts the storage's trials
        try:
            with quiet_storage_failures_in_threads():
                study.optimize(objective_for(name, base, space, root, stop, unwritable, store), timeout=timeout,
                               callbacks=[optuna.study.MaxTrialsCallback(trials, states=FINISHED), stop_requested,
                                          failures],
                               catch=(RuntimeError, ValueError, MemoryError))
        except Exception as exc:
            # A failed write surfaces as whatever Optuna meets next (an OSError, a storage error, even an
            # assertion in its own bookkeeping of the trial it could not record): ask the storage itself.
            try:
                check_writable(opened, storage)
            except ConfigError as problem:
                raise StudyFailing(f"its storage stopped taking writes: {problem}; the trials finished before "
                                   "then stay in it") from None
            if isinstance(exc, optuna.exceptions.StorageInternalError):
                raise StudyFailing(f"its storage {storage!r} failed: {str(exc).splitlines()[0][:300]}") from None
            raise
    if unwritable:
        raise StudyFailing(f"{os_error_text(unwritable[0])}; the trials finished before then are kept")
    if failures.reason:
        raise StudyFailing(failures.reason)
    return study


@contextlib.contextmanager
def quiet_storage_failures_in_threads():
    """Keep Optuna's heartbeat thread from printing a traceback when the storage fails under it: the main
    thread meets the same failure at its next write and run_worker says it in one line."""
    previous = threading.excepthook

    def hook(args) -> None:
        if not isinstance(args.exc_value, (OSError, optuna.exceptions.StorageInternalError)):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def study_summaries(storage: str) -> list[dict]:
    """Every study in a storage with its trial counts by state and best value."""
    out = []
    for s in optuna.get_all_study_summaries(make_storage(storage, heartbeat=False), include_best_trial=True):
        out.append({"name": s.study_name, "trials": s.n_trials,
                    "best_value": s.best_trial.value if s.best_trial else None,
                    "started": s.datetime_start.isoformat() if s.datetime_start else None})
    return out


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial: number, state, value, duration, run_dir, test accuracy and every parameter."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "duration_s": duration,
                     "epochs": max(t.intermediate_values, default=0) if t.intermediate_values else 0,
                     "test_accuracy": t.user_attrs.get("test_accuracy"), "run_dir": t.user_attrs.get("run_dir"),
                     **{f"param_{k}": v for k, v in t.params.items()}})
    return rows


def trials_csv(study: optuna.Study) -> str:
    """Every trial as CSV, in Optuna's own columns (trials_dataframe: number, value, times, params_*,
    user_attrs_*, state), as optuna-dashboard and notebooks know them."""
    return study.trials_dataframe().to_csv(index=False)


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts

