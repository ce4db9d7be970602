"""The command line: `python -m lstm_core {train,evaluate,export,report,runs,tune}`.

    python -m lstm_core train --preset default --epochs 3 --json
    python -m lstm_core evaluate saves/runs/20261123-153412-a1b2c3
    python -m lstm_core export 20261123-153412-a1b2c3 --format onnx
    python -m lstm_core report 20261123-153412-a1b2c3 -o run.html
    python -m lstm_core evaluate --study lstm-search --trial 12 --storage postgresql://host/db
    python -m lstm_core runs
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

from .config import (CHOICES, FIELD_TYPES, PRESETS, RECURRENT_ONLY, ConfigError, DataUnavailable, TrainConfig,
                     flag, from_dict, preset, read_mapping)

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad flags or values: one message, exit status 2, nothing written."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line instead of argparse's usage dump
        raise UsageError(message)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`hidden_size` -> `--hidden-size`); unset flags keep the
    preset's or config file's value."""
    group = parser.add_argument_group("hyperparameters (TrainConfig fields)")
    for f in fields(TrainConfig):
        kind = FIELD_TYPES[f.name]
        help_text = f"default: {f.default}"
        if kind is bool:
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag(f.name), dest=f.name, type=kind, default=None, choices=CHOICES.get(f.name),
                               metavar=None if f.name in CHOICES else kind.__name__.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset, then config file, then flags; each later source overrides the earlier."""
    values = preset(args.preset).to_dict()
    if args.config:
        file_values = read_mapping(args.config)
        values.update(from_dict({**values, **file_values}).to_dict())  # validates the file on its own terms
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    values.update(flags)
    config = from_dict(values)
    if config.arch == "cnn":        # a CNN would ignore them, and its config would claim it had used them
        ignored = [f for f in RECURRENT_ONLY if f in flags or (args.config and f in file_values)]
        if ignored:
            raise UsageError(f"{', '.join(flag(f) for f in ignored)} only apply to recurrent models (LSTM, GRU, RNN), "
                             "and this config trains a CNN (arch cnn): drop them, or add --arch lstm")
    return config


def add_trial_flags(parser: argparse.ArgumentParser, study_help: str = "a tuning trial instead of a run: its "
                    "study's name (with --trial N)") -> None:
    """--study NAME --trial N [--storage URL] [--artifacts STORE]: a trial of a study, opened from its folder
    where this machine has it, else from the study's artifact store (artifacts.trial_run)."""
    parser.add_argument("--study", help=study_help)
    parser.add_argument("--trial", type=int, metavar="N", help="the trial's number in the study")
    parser.add_argument("--storage", help="the study's storage (default: sqlite:///SAVES/optuna.db)")
    parser.add_argument("--artifacts", metavar="STORE", help="the artifact store to download the trial from "
                        "(default: the one the study records; name it where this machine reaches it another way)")


def build_parser() -> Parser:
    parser = Parser(prog="python -m lstm_core", description="Train, evaluate and list LSTM MNIST classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser("train", help="train a model into a new run directory")
    train.add_argument("--preset", default="default", choices=list(PRESETS), help="starting hyperparameters")
    train.add_argument("--config", metavar="FILE", help="JSON or TOML file of TrainConfig fields")
    train.add_argument("--saves", metavar="DIR", help="saves root (default: $LSTM_SAVES or ./saves)")
    train.add_argument("--data-dir", metavar="DIR", help="MNIST folder (default: $LSTM_DATA or SAVES/data)")
    train.add_argument("--json", action="store_true", help="end stdout with one JSON summary line")
    train.add_argument("--run-dir", metavar="DIR", help="train the queued run in DIR (made by the app); "
                       "its config.json is the config, so no other config flags are allowed")
    train.add_argument("--resume", metavar="RUN", help="continue a cancelled, interrupted or failed run (id or "
                       "directory) from the end of its last finished epoch")
    train.add_argument("--device-lock", metavar="DEVICE:FD", help=argparse.SUPPRESS)  # taken by jobs.launch_training
    add_config_flags(train)

    evaluate = sub.add_parser("evaluate", help="test-set metrics of a run, trial or checkpoint, as JSON")
    evaluate.add_argument("path", nargs="?", help="a run directory, run id, or checkpoint file (.pt)")
    add_trial_flags(evaluate)
    evaluate.add_argument("--saves", metavar="DIR")
    evaluate.add_argument("--data-dir", metavar="DIR")
    evaluate.add_argument("--device", default="auto")

    export = sub.add_parser("export", help="a run's model as one ONNX or TorchScript file that takes images")
    export.add_argument("path", nargs="?", help="a run directory, run id, or checkpoint file (.pt)")
    add_trial_flags(export)
    export.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    export.add_argument("--output", metavar="PATH", help="file or folder to write (default: the run directory, "
                        "as model.onnx or model.ts.pt)")
    export.add_argument("--saves", metavar="DIR")
    export.add_argument("--json", action="store_true", help="one JSON line instead of the path")

    report = sub.add_parser("report", help="one self-contained HTML file of a run or a study, for people (opens "
                            "offline in any browser)")
    report.add_argument("path", nargs="?", metavar="RUN", help="a run directory or run id")
    add_trial_flags(report, "a study's report instead (every Optuna plot, the trials, the best trial), or with "
                    "--trial N its trial's")
    report.add_argument("-o", "--output", metavar="FILE", help="file or folder to write (default: report.html in "
                        "the run's folder, or the study's)")
    report.add_argument("--saves", metavar="DIR")
    report.add_argument("--data-dir", metavar="DIR", help="MNIST, for the images of the most confident mistakes")

    tune = sub.add_parser("tune", help="an Optuna study over the hyperparameters (resumes an existing one)")
    tune.add_argument("--study", required=True, help="study name (letters, digits, '.', '_', '-')")
    tune.add_argument("--trials", type=int, default=20, help="run until the study has this many finished trials")
    tune.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop starting trials after this")
    tune.add_argument("--workers", type=int, default=None, help="worker processes on the same storage (default: "
                      "one per GPU when the device is auto and there are several, else 1)")
    tune.add_argument("--storage", help="Optuna storage: a database URL (default: sqlite:///SAVES/optuna.db) or "
                                        "journal:PATH, Optuna's journal file")
    tune.add_argument("--artifacts", metavar="STORE", help="also upload every trial's results to this artifact "
                      "store, a folder or s3://BUCKET[/PREFIX] (endpoint and credentials from boto3's configuration, "
                      "e.g. AWS_ENDPOINT_URL), so that any machine sharing the study can open any trial")
    tune.add_argument("--sampler", default="tpe", choices=["tpe", "random", "cmaes", "gp"])
    tune.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    tune.add_argument("--space", metavar="FILE", help="JSON or TOML search space (default: the built-in one)")
    tune.add_argument("--sampler-seed", type=int, default=None, help="seed of the sampler")
    tune.add_argument("--preset", default="default", choices=list(PRESETS), help="the fixed hyperparameters")
    tune.add_argument("--config", metavar="FILE", help="JSON or TOML file of fixed TrainConfig fields")
    tune.add_argument("--saves", metavar="DIR")
    tune.add_argument("--json", action="store_true", help="end stdout with one JSON summary line")
    tune.add_argument("--repair-journal", action="store_true", help="cut the torn last line a killed writer left "
                      "in a journal:PATH storage, after copying the file to PATH.bak")
    tune.add_argument("--force-workers", action="store_true",
                      help="start --workers N even where N is more than the cores or memory can run at once")
    tune.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a child of --workers
    add_config_flags(tune)

    runs = sub.add_parser("runs", help="list runs with state and best metrics")
    runs.add_argument("--saves", metavar="DIR")
    runs.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    return parser


# -- train -------------------------------------------------------------------------------------
def command_train(args: argparse.Namespace) -> int:
    from .data import load_mnist
    from .checkpoints import resume_checkpoint
    from .jobs import STOP_FILE, StopRequest, describe_holder, device_lock, inherited_lock, training_devices
    from .recorder import RunRecorder
    from .runs import (LIVE_STATES, check_saves, check_writable, create_run, os_error_text, process_start_time,
                       to_json)
    from .train import fit

    stop_event = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_event.set())  # cooperative: the run ends between batches, checkpointed
    held = inherited_lock(args.device_lock) if args.device_lock else None   # the app took it for this run
    resume = None
    if args.run_dir or args.resume:
        run = existing_run(args)
        config = run.config()
        devices = training_devices(config)
        check_saves(args.saves, below=("locks",))
        check_writable(run.path, "make it writable, or copy the run folder somewhere writable and resume that copy")
        if args.resume:
            resume = resume_checkpoint(run)
    else:
        config = config_from_args(args)
        devices = training_devices(config)          # an absent device or amp mode: refused before any folder
        check_saves(args.saves, below=("runs", "locks"))
    if args.resume:
        run.write_status(state="queued", resuming=False, ended_at=None, error=None)
        (run.path / STOP_FILE).unlink(missing_ok=True)
    mnist = load_mnist(args.data_dir)
    if not (args.run_dir or args.resume):
        run = create_run(config, args.saves)
    print(run.path, flush=True)
    recorder = None
    try:
        run.write_status(pid=os.getpid(), pid_start=process_start_time(os.getpid()))
        stop = StopRequest(run.path, stop_event)

        def waiting(holder: str | None) -> None:
            run.write_status(waiting_for=holder or "another process")
            print(f"{' and '.join(devices)} {'is' if len(devices) == 1 else 'are'} busy with "
                  f"{describe_holder(holder) if holder else 'another process'}: queued until one is free",
                  file=sys.stderr, flush=True)

        with device_lock(devices, run.id, args.saves, stop=stop, on_wait=waiting, held=held) as device:
            if device is None:
                run.write_status(state="cancelled", ended_at=time.time(), waiting_for=None)
                print(f"cancelled while queued -> {run.path}", flush=True)
                return 0
            run.write_status(waiting_for=None)
            recorder = RunRecorder(run)
            history = fit(config, [recorder, ProgressPrinter()], stop=stop, data=mnist, resume=resume, device=device)
    except OSError as exc:        # a full disk, a folder gone read-only: the run fails, saying where and why
        error = recorder.failure(exc) if recorder else f"{os_error_text(exc)}; run {run.id} did not start"
        with contextlib.suppress(OSError):
            if run.status().get("state") in LIVE_STATES:     # (the recorder has said it already)
                run.write_status(state="failed", ended_at=time.time(), waiting_for=None, error=error)
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    summary = history.summary()
    test_acc = summary["test_accuracy"]
    print(f"{history.stopped}: {len(history.epochs)} epoch(s) in {history.train_seconds:.1f} s, "
          f"best val acc {history.best_val_accuracy:.2%} (epoch {history.best_epoch}), "
          f"test acc {test_acc:.2%}, macro-F1 {summary['macro_f1']:.4f} -> {run.path}", flush=True)
    if args.json:
        print(to_json({"run_dir": str(run.path), "state": run.status().get("state"), "test_accuracy": test_acc,
                       "macro_f1": summary["macro_f1"], "train_seconds": history.train_seconds,
                       "best_val_accuracy": history.best_val_accuracy, "epochs": len(history.epochs)}))
    return 0


def existing_run(args: argparse.Namespace):
    """The run named by --run-dir (queued, made by the app) or --resume (stopped, to continue); both
    carry their own config, so no config flags may come with them."""
    from .runs import RunError, open_run, run_at

    given = [flag(f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None]
    which = "--run-dir" if args.run_dir else "--resume"
    if given or args.config or args.preset != "default":
        raise UsageError(f"{which} trains the config stored in the run; drop {(given or ['--config/--preset'])[0]}")
    target = args.run_dir or args.resume
    run = run_at(target) if Path(target).is_dir() else open_run(target, args.saves)
    status = run.status()
    state = status.get("state")
    allowed = ("queued",) if args.run_dir else ("cancelled", "interrupted", "failed")
    if args.resume and state == "queued" and status.get("resuming"):
        return run                                   # queued for resuming by the app (jobs.launch_resume)
    if state not in allowed:
        raise RunError(f"run {run.id} is {state}: {which} needs a run that is {' or '.join(allowed)}")
    return run


class ProgressPrinter:
    """A one-line progress bar with ETA on stderr (a line per epoch when stderr is not a terminal)."""

    def __init__(self, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()

    def on_run_start(self, state) -> None:
        from .runs import cell_name

        config = state.config
        model = config.arch if config.arch == "cnn" else cell_name(config.to_dict()).lower()
        self.stream.write(f"training {model} on {state.device}: {state.n_train} samples, "
                          f"{state.steps_per_epoch} batches/epoch, {state.config.epochs} epoch(s)\n")

    def on_batch(self, state, r: dict) -> None:
        if not self.tty:
            return
        from .runs import format_seconds
        done = int(self.width * r["step"] / r["steps"])
        self.stream.write(f"\repoch {r['epoch']}/{state.config.epochs} [{'#' * done}{'.' * (self.width - done)}] "
                          f"loss {r['loss']:.4f} acc {r['accuracy']:.2%} {r['samples_per_s']:.0f} samples/s "
                          f"ETA {format_seconds(r['eta'])}  ")
        self.stream.flush()

    def on_epoch_end(self, state, r: dict) -> None:
        from .runs import format_seconds
        self.stream.write(("\r" if self.tty else "") +
                          f"epoch {r['epoch']}/{r['epochs']}: train loss {r['train_loss']:.4f} "
                          f"acc {r['train_accuracy']:.2%} | val loss {r['val_loss']:.4f} acc {r['val_accuracy']:.2%}"
                          f"{' *' if r['improved'] else ''} | {r['epoch_seconds']:.1f} s, "
                          f"ETA {format_seconds(r['eta'])}" + " " * 12 + "\n")
        self.stream.flush()

    def on_train_end(self, state) -> None: ...
    def on_run_end(self, state, history) -> None: ...
    def on_exception(self, state, exc) -> None: ...


# -- evaluate and runs -------------------------------------------------------------------------
def command_evaluate(args: argparse.Namespace) -> int:
    from .data import load_mnist
    from .devices import resolve_device
    from .evaluate import evaluate
    from .checkpoints import load_model
    from .runs import to_json

    path = weights_path(args)
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    model, config = load_model(path, device)
    mnist = load_mnist(args.data_dir)
    started = time.perf_counter()
    result = evaluate(model, mnist.test_images.to(device), mnist.test_labels.to(device), config)
    print(to_json({"path": str(path), "test_accuracy": result["accuracy"], "test_loss": result["loss"],
                   "test_error": result["error"], "macro_precision": result["macro_precision"],
                   "macro_recall": result["macro_recall"], "macro_f1": result["macro_f1"],
                   "per_class": result["per_class"], "confusion_matrix": result["confusion_matrix"],
                   "n": result["n"], "misclassified": len(result["misclassified"]),
                   "seconds": round(time.perf_counter() - started, 3)}))
    return 0


def weights_path(args: argparse.Namespace) -> Path:
    """The run directory or checkpoint file that `path` (a directory, run id or file) names, or the run folder
    of the trial that --study and --trial name."""
    from .runs import RunError, check_saves, open_run, run_at

    if args.study is not None or args.trial is not None or args.path is None:
        if args.path is not None or args.study is None or args.trial is None:
            raise UsageError("name a run (its id, folder or checkpoint file) or a trial (--study NAME --trial N), "
                             "one of them")
        return study_trial(args).path
    path = Path(args.path)
    if not path.is_file():
        if not path.is_dir() and (path.suffix in (".pt", ".pth") or path.is_absolute()):
            raise RunError(f"no such file or run directory: {path}")
        check_saves(args.saves, write=False, below=("runs",))
        path = (run_at(path) if path.is_dir() else open_run(args.path, args.saves)).path
    return path


def command_export(args: argparse.Namespace) -> int:
    from .export import MissingDependency, export_run
    from .runs import to_json

    try:
        written = export_run(weights_path(args), args.format, args.output)
    except MissingDependency as exc:      # the environment lacks a package, not a usage error
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(to_json({"path": str(written), "format": args.format, "bytes": written.stat().st_size})
          if args.json else written)
    return 0


def command_report(args: argparse.Namespace) -> int:
    from .data import load_mnist
    from .report import run_report, study_report, write_report
    from .runs import check_saves, open_run, output_file, run_at, study_dir

    if (args.path is None) == (args.study is None) or (args.trial is not None and args.study is None):
        raise UsageError("name a run (its id or folder), a study (--study NAME) or a trial (--study NAME --trial N), "
                         "one of them")
    check_saves(args.saves, write=False)

    def test_images():
        return load_mnist(args.data_dir).test_images.numpy()

    if args.trial is not None:
        run = study_trial(args)
        text, default = run_report(run, test_images), run.path / "report.html"
    elif args.study:
        study = load_study_of(args)
        text = study_report(study, test_images, args.artifacts, args.saves)
        default = study_dir(args.study, args.saves) / "report.html"
    else:
        path = Path(args.path)
        run = run_at(path) if path.is_dir() else open_run(args.path, args.saves)
        text, default = run_report(run, test_images), run.path / "report.html"
    output = output_file(args.output, default)
    write_report(text, output)
    print(output)
    return 0


def load_study_of(args: argparse.Namespace):
    """The study --study names in --storage (default: the saves root's)."""
    import optuna
    from .storage import default_storage, make_storage

    storage = args.storage or default_storage(args.saves)
    try:
        return optuna.load_study(study_name=args.study, storage=make_storage(storage, heartbeat=False))
    except KeyError:
        raise UsageError(f"no study {args.study!r} in {storage}") from None


def study_trial(args: argparse.Namespace):
    """The run folder of trial --trial of study --study: its own on this machine, else downloaded from the
    artifact store (--artifacts, else the study's) into SAVES/cache/."""
    from .artifacts import trial_run

    return trial_run(load_study_of(args), args.trial, args.artifacts, args.saves)


def command_runs(args: argparse.Namespace) -> int:
    from .runs import cell_name, check_saves, format_seconds, list_runs, to_json

    rows = list_runs(check_saves(args.saves, write=False, below=("runs",)))
    if args.json:
        print(to_json(rows))
        return 0
    if not rows:
        print("no runs yet: python -m lstm_core train --preset default")
        return 0
    pct = lambda x: f"{x:.2%}" if x is not None else "-"  # noqa: E731
    table = [("run", "state", "model", "epochs", "best val", "test", "time", "device")]
    for r in rows:
        model = ("cnn" if r["arch"] == "cnn"
                 else f"{cell_name(r).lower()} {r['num_layers']}x{r['hidden_size']} {r['seq_mode']}")
        if r["damaged"]:                # no model to describe: say why instead
            model = f"damaged: {r['damaged']}"
        table.append((r["id"], r["state"], model, f"{r['epochs_done']}/{r['epochs'] or '?'}",
                      pct(r["best_val_accuracy"]), pct(r["test_accuracy"]),
                      format_seconds(r["duration_s"]) if r["duration_s"] else "-", r["device"] or "-"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def command_tune(args: argparse.Namespace) -> int:
    from .artifacts import check_store, store_spec
    from .jobs import start_workers, training_devices, wait_workers
    from .runs import check_saves, safe_name
    from .storage import REPAIRED, check_writable, default_storage, journal_path, make_storage, repair_journal
    from .tune import StudyFailing, fail_trials_of, finished_trials, load_space, run_worker, state_counts

    safe_name(args.study, "study name")
    timeout_ok = args.timeout is None or (args.timeout > 0 and math.isfinite(args.timeout))   # nan is not > 0
    if args.trials < 1 or (args.workers is not None and args.workers < 1) or not timeout_ok:
        raise UsageError("--trials and --workers must be at least 1, and --timeout positive and finite"
                         + ("" if timeout_ok else f", got --timeout {args.timeout:g}"))
    if args.sampler_seed is not None and not 0 <= args.sampler_seed < 2**32:     # what Optuna's samplers take
        raise UsageError(f"--sampler-seed must be between 0 and {2**32 - 1}, got {args.sampler_seed}")
    base = config_from_args(args)
    devices = training_devices(base)           # an absent device is refused before any trial or folder exists
    if args.workers is None:                   # one worker per GPU that `auto` may take, else one
        args.workers = len(devices) if base.device == "auto" and devices[0] != "cpu" else 1
    space = load_space(args.space, base)
    fixed = [name for name in space if getattr(args, name) is not None]     # every trial's value would be searched
    if fixed:
        raise UsageError(f"the search space searches {', '.join(fixed)}, which {', '.join(flag(f) for f in fixed)} "
                         "would fix: drop the flag, or drop the field from the space (--space FILE)")
    storage = args.storage or default_storage(args.saves)
    artifacts = store_spec(args.artifacts) if args.artifacts is not None else None
    if not args.worker:                         # (a --workers child: its parent checked all this already)
        check_workers(args.workers, devices, args.force_workers)
        check_saves(args.saves)                 # the default SQLite file and the trials' folders live there
        if args.repair_journal:
            backup = repair_journal(storage)
            if backup:
                print(REPAIRED.format(journal=journal_path(storage), backup=backup), flush=True)
        check_writable(make_storage(storage), storage)   # an unreachable, malformed or read-only storage fails here
        if artifacts:
            check_store(artifacts)              # so does a store: a missing bucket, a refused write
    if base.num_threads == 0:                   # K workers share the cores instead of fighting over them
        base = base.replace(num_threads=max(1, (os.cpu_count() or 1) // args.workers))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    children = []
    argv = sys.argv[1:] if args.storage else [*sys.argv[1:], "--storage", storage]
    if not args.worker:
        children = start_workers(argv, args.workers, args.study, storage, args.saves)
        print(f"study {args.study} in {storage}: {args.workers} worker(s), until {args.trials} finished trials",
              flush=True)
    try:
        study, failing = run_worker(args.study, args.trials, base, storage, space, args.timeout, args.sampler,
                                    args.pruner, args.saves, stop, args.sampler_seed, artifacts), None
    except StudyFailing as exc:
        study, failing = None, exc
    failed_children = 0
    for child in wait_workers(children):
        failed_children += 1
        try:
            numbers = fail_trials_of(args.study, storage, child.pid)   # so the study and the folders agree
        except Exception:
            if failing is None:
                raise
            numbers = []        # the storage that failed this worker cannot record the child's trials either
        for number in numbers:
            print(f"worker {child.pid} ended with status {child.returncode} in trial {number}: marked failed",
                  file=sys.stderr, flush=True)
    if failing:
        print(f"error: study {args.study}: {failing}", file=sys.stderr, flush=True)
        return 1
    if args.worker:
        return 0
    if failed_children:
        print(f"error: study {args.study}: {failed_children} of its worker processes failed (see above)",
              file=sys.stderr, flush=True)
    counts = state_counts(study)
    best = study.best_trial if counts["COMPLETE"] else None
    print(f"study {args.study}: {finished_trials(study)} finished ({counts['COMPLETE']} complete, "
          f"{counts['PRUNED']} pruned, {counts['FAIL']} failed)" +
          (f", best val acc {best.value:.2%} (trial {best.number})" if best else ""), flush=True)
    if args.json:
        print(json.dumps({"study": args.study, "storage": storage, "artifacts": artifacts, "counts": counts,
                          "best_value": best.value if best else None, "best_trial": best.number if best else None,
                          "best_params": best.params if best else None,
                          "best_run_dir": best.user_attrs.get("run_dir") if best else None}))
    return 1 if failed_children else 0


WORKER_MEMORY = 1.5 * 2**30     # what one tuning worker holds: torch, the data on its device, a trial's model


def check_workers(workers: int, devices: list[str], force: bool) -> None:
    """Refuse more workers than this machine runs at once, unless forced: on a CPU one per core, and
    anywhere no more than the free memory holds (each worker is a process of its own)."""
    cores = os.cpu_count() or 1
    free = available_memory()
    by_memory = max(1, int(free // WORKER_MEMORY)) if free else workers
    by_device = cores if devices == ["cpu"] else max(len(devices), cores)
    limit = min(by_memory, by_device)
    if workers > limit and not force:
        why = f"{cores} cores" + (f" and {free / 2**30:.1f} GiB of free memory (about "
                                  f"{WORKER_MEMORY / 2**30:.1f} GiB a worker)" if free else "")
        raise UsageError(f"--workers {workers} is more than this machine runs at once: at most {limit} with {why}; "
                         "add --force-workers to start them anyway")


def available_memory() -> float | None:
    """Bytes of memory free for new processes (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


COMMANDS = {"train": command_train, "evaluate": command_evaluate, "export": command_export, "report": command_report,
            "runs": command_runs, "tune": command_tune}


def main(argv: list[str] | None = None) -> int:
    from .runs import RunError

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DataUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:      # a full disk or an unwritable folder mid-command: one line, not a traceback
        from .runs import os_error_text
        print(f"error: {os_error_text(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
