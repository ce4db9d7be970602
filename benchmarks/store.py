"""What an artifact store costs: the upload's share of a `default` trial's wall time (a folder store, and S3
through moto's server in this process), a trial's first open from each store (the download into an empty
saves root, as on another machine), and a run's and a study's report: size and write time. The bar:
a store adds under BUDGET_PERCENT to a `default` trial. Written to SAVES/bench/store-<time>.json.

    .venv/bin/python -m benchmarks.store              # or: make bench-store (about 2 to 3 minutes on a CPU)
    .venv/bin/python -m benchmarks.store --epochs 1   # a quick look: the share is then not the default's

The trial trains once, without a store; its result files are then uploaded REPEATS times to each store by
artifacts.upload_trial on real trials of a study of their own in SQLite (the tuner's code path, the trial's
Optuna writes included), and the median is taken; "store alone" is the same with the study in memory.
moto's server shares this process's cores and Python with the upload, but not a network's latency: a real
bucket adds its round trip to each of the dozen or so requests.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna

from lstm_core.artifacts import STORE_ATTR, open_store, result_files, trial_run, upload_trial
from lstm_core.config import TrainConfig, preset
from lstm_core.report import run_report, study_report, write_report
from lstm_core.runs import Run, atomic_write_json, saves_root
from lstm_core.storage import default_storage
from lstm_core.tune import run_worker

from .harness import free_port

BUDGET_PERCENT = 2.0        # the most a store may add to a `default` trial's wall time
REPEATS = 5                 # uploads, first opens and reports per figure: their median is the figure
BUCKET = "lstm-studio"
PRESET = "default"


def train_trial(base: TrainConfig, root: Path) -> dict[str, Any]:
    """One real trial of a study of `base` (its own values: the space offers nothing else), no store, in the
    saves root `root`: the study, the trial's run folder and its wall time (Optuna's start to complete)."""
    started = time.perf_counter()
    study = run_worker("bench-store", trials=1, base=base, storage=default_storage(root), pruner="none", root=root,
                       space={"hidden_size": {"type": "categorical", "choices": [base.hidden_size]}})
    worker_seconds = time.perf_counter() - started
    [trial] = study.trials
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise RuntimeError(f"the benchmark's trial ended {trial.state.name}: {trial.user_attrs}")
    return {"study": study, "run": Run(Path(trial.user_attrs["run_dir"])), "worker_seconds": worker_seconds,
            "trial_seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()}


def time_uploads(run: Run, spec: str, repeats: int, storage: str | None) -> tuple[optuna.Study, list[float]]:
    """Seconds for each of `repeats` uploads of `run`'s results to the store `spec`, each by upload_trial on a
    fresh trial (asked, uploaded, told) of a study of its own in `storage` (None: Optuna's memory, leaving the
    store's own share), so the trial's writes to its storage count as a worker's do. Returns that study: its
    trials record where their files went, for time_first_opens."""
    store = open_store(spec, create=True)           # once, as a tune worker does before its trials
    study = optuna.create_study(study_name="uploads", direction="maximize", storage=storage)
    study.set_user_attr(STORE_ATTR, spec)
    seconds = []
    for _ in range(repeats):
        trial = study.ask()
        started = time.perf_counter()
        missing = upload_trial(trial, run, store, spec)
        seconds.append(time.perf_counter() - started)
        if missing:
            raise RuntimeError(missing)
        study.tell(trial, 0.0)
    return study, seconds


def time_first_opens(study: optuna.Study, workdir: Path) -> list[float]:
    """Seconds for artifacts.trial_run to open each of `study`'s trials into a fresh empty saves root: a
    download of every file, checked against the sizes the trial recorded."""
    seconds = []
    for trial in study.trials:
        root = workdir / f"reader-{trial.number}"
        started = time.perf_counter()
        run = trial_run(study, trial.number, root=root)
        seconds.append(time.perf_counter() - started)
        if not run.path.is_relative_to(root):
            raise RuntimeError(f"trial {trial.number} opened from {run.path}, not downloaded into {root}")
    return seconds


def time_report(make: Callable[[], str], path: Path, repeats: int) -> dict[str, Any]:
    """A report's size in bytes and the seconds to build and write it, `repeats` times."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        write_report(make(), path)
        seconds.append(time.perf_counter() - started)
    return {"bytes": path.stat().st_size, **figures(seconds)}


def figures(seconds: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(seconds), "seconds": [round(s, 4) for s in seconds]}


def set_environment(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set each variable (None: unset it); returns what they were, for the same call to put back."""
    before = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return before


@contextlib.contextmanager
def s3_store() -> Iterator[str]:
    """A store on moto's S3 server, started here on a free loopback port with one bucket, reached through
    boto3's environment as a real endpoint is (AWS_ENDPOINT_URL); the environment is restored afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)     # moto's server: no line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    before = set_environment({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                              "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                              "AWS_PROFILE": None})
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}/bench"
    finally:
        set_environment(before)
        server.stop()


def measure(base: TrainConfig, workdir: Path, repeats: int = REPEATS,
            mistakes_from: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Every figure for one trial of `base`, in the scratch folder `workdir` (see the module's docstring)."""
    trained = train_trial(base, workdir / "saves")
    run, trial_seconds = trained["run"], trained["trial_seconds"]
    files = {path.name: path.stat().st_size for path in result_files(run)}
    result: dict[str, Any] = {"epochs": base.epochs, "trial_seconds": trial_seconds,
                              "worker_seconds": trained["worker_seconds"], "repeats": repeats,
                              "result_files": files, "result_bytes": sum(files.values()), "stores": {}}
    with contextlib.ExitStack() as stack:
        stores = {"folder": str(workdir / "store")}
        try:
            stores["s3"] = stack.enter_context(s3_store())
        except ImportError as exc:      # moto and boto3 are extras: the folder's figures alone
            result["stores"]["s3"] = {"skipped": f"{exc} (make bench-store installs the test extra)"}
        for kind, spec in stores.items():
            folder = workdir / f"{kind}-bench"
            folder.mkdir()
            # the study in SQLite beside the saves, as a tune worker's default storage is
            study, uploads = time_uploads(run, spec, repeats, default_storage(folder))
            upload = figures(uploads)
            result["stores"][kind] = {
                "spec": spec, "upload": upload, "upload_percent_of_trial": 100 * upload["median_s"] / trial_seconds,
                # the same uploads with the study in memory: what the store itself costs, without the one
                # storage write per file that Optuna's upload_artifact makes
                "upload_store_only": figures(time_uploads(run, spec, repeats, None)[1]),
                "first_open": figures(time_first_opens(study, folder))}
    reports = workdir / "reports"
    reports.mkdir()
    result["reports"] = {
        "run": time_report(lambda: run_report(run, mistakes_from), reports / "run.html", repeats),
        "study": time_report(lambda: study_report(trained["study"], mistakes_from, None, workdir / "saves"),
                             reports / "study.html", repeats)}
    return result


def table(result: dict[str, Any]) -> str:
    """The figures as the lines main() prints."""
    lines = [f"`{PRESET}` trial ({result['epochs']} epochs, no store): {result['trial_seconds']:.1f} s; its "
             f"{len(result['result_files'])} result files: {result['result_bytes'] / 1e6:.2f} MB",
             f"{'store':<8}{'upload (median)':>18}{'% of trial':>12}{'store alone':>14}{'first open (median)':>22}"]
    for kind, row in result["stores"].items():
        if "skipped" in row:
            lines.append(f"{kind:<8}skipped: {row['skipped']}")
        else:
            upload, alone, opened = (row[k]["median_s"] * 1000 for k in ("upload", "upload_store_only", "first_open"))
            lines.append(f"{kind:<8}{upload:>15.1f} ms{row['upload_percent_of_trial']:>11.3f}%{alone:>11.1f} ms"
                         f"{opened:>19.1f} ms")
    for kind, row in result["reports"].items():
        lines.append(f"{kind} report: {row['bytes'] / 1e6:.2f} MB, written in {row['median_s']:.2f} s (median)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    full = preset(PRESET)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=full.epochs,
                        help=f"the trial's epochs (default: the preset's {full.epochs}; fewer is a quick look)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="uploads, opens and reports per figure")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats are at least 1")
    from lstm_core.data import load_mnist

    optuna.logging.set_verbosity(optuna.logging.WARNING)     # the table is the output
    load = os.getloadavg()[0]
    images = load_mnist().test_images.numpy()        # loaded once: the reports' figures are the reports
    out = saves_root() / "bench" / f"store-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # scratch beside the saves: the disk a worker's SQLite study and folder store would be on
    with tempfile.TemporaryDirectory(prefix=".store-", dir=out.parent) as scratch:
        measured = measure(full.replace(epochs=args.epochs), Path(scratch), args.repeats,
                           mistakes_from=lambda: images)
    full_default = args.epochs == full.epochs
    # the bar is a `default` trial's: a shorter one's share says nothing about it
    within = all(row.get("upload_percent_of_trial", 0) < BUDGET_PERCENT
                 for row in measured["stores"].values()) if full_default else None
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_average": [load, os.getloadavg()[0]],   # a busy host's figures drift
              "preset": PRESET, "full_default": full_default, "budget_percent": BUDGET_PERCENT,
              "within_budget": within, **measured}
    print(table(result))
    if full_default:
        print(f"every store adds {'under' if within else 'MORE than'} {BUDGET_PERCENT:g}% to a `{PRESET}` trial")
    else:
        print(f"a {args.epochs}-epoch trial, not the full `{PRESET}` ({full.epochs} epochs): its percentages "
              "overstate a `default` trial's")
    atomic_write_json(out, result)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
