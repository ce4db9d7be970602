"""Every tuning trial's results in Optuna's artifact store, so that any machine sharing the study can open any
trial: its confusion matrix, curves, gradients and model.

    store = open_store("s3://lstm-studies/mnist")        # or a folder the machines share: "/shared/artifacts"
    upload_trial(trial, run, store, "s3://lstm-studies/mnist")   # at a trial's end, in tune's objective
    run = trial_run(study, 12)           # trial 12's folder here, else downloaded once into SAVES/cache/

A store is a folder (optuna.artifacts.FileSystemArtifactStore) or s3://BUCKET[/PREFIX] (Boto3ArtifactStore),
whose endpoint and credentials come from boto3's own configuration and environment (AWS_ENDPOINT_URL,
AWS_PROFILE, ...): AWS S3, MinIO, Ceph RGW and R2 alike. The study records its store (STORE_ATTR) and each
trial which files went where and how big they are (FILES_ATTR), so a reader needs no flag; a flag overrides the
recorded store for a machine that reaches the same bucket another way. Uploads go through Optuna's
upload_artifact, retried by its Backoff; one that still fails never fails the trial: the trial records why
(MISSING_ATTR) and keeps its value.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.artifacts import Backoff, FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from .config import ConfigError
from .runs import Run, RunError, atomic_write_json, held_lock, read_json_object, saves_root, safe_name

if TYPE_CHECKING:
    from typing import BinaryIO

STORE_ATTR = "artifact_store"        # a study's and a trial's user attribute: the store its results went to
FILES_ATTR = "artifacts"             # a trial's: {path in the run folder: [artifact id, bytes]}
MISSING_ATTR = "artifacts_missing"   # a trial's: why its results are not in the store
SECONDS_ATTR = "artifacts_seconds"   # a trial's: how long its upload took
# What a reader of a trial needs, from its run folder (TensorBoard's event files are added by pattern): not
# last.pt (resuming is for the machine that ran it) nor the final weights (best.pt is the model).
RESULTS = ("config.json", "status.json", "metrics.jsonl", "eval.json", "best.pt", "environment.json", "curves.svg")
EVENTS = "events.out.tfevents.*"
# What optuna-dashboard serves each file as (Python's guess for .pt is a game console's format)
MIMETYPES = {".json": "application/json", ".jsonl": "application/jsonl", ".svg": "image/svg+xml"}
S3 = "s3://"
SOURCE_FILE = "source.json"         # in a cached trial: which artifacts it was downloaded from
# A store that fails keeps failing for a while; a trial waits this long at most before saying so and going on.
RETRIES = {"max_retries": 4, "min_delay": 0.5, "max_delay": 4.0}


class StoreError(ConfigError):
    """An artifact store that cannot be opened, written or read; the message says which and why."""


class Prefixed:
    """An artifact store under a key prefix (s3://BUCKET/PREFIX): studies can share a bucket."""

    def __init__(self, backend, prefix: str):
        self.backend, self.prefix = backend, prefix.strip("/") + "/"

    def open_reader(self, artifact_id: str) -> "BinaryIO":
        return self.backend.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: "BinaryIO") -> None:
        self.backend.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.backend.remove(self.prefix + artifact_id)


def store_spec(spec: str) -> str:
    """`spec` as studies record it: s3://BUCKET[/PREFIX] as given, a folder as its absolute path."""
    spec = spec.strip()
    if not spec:
        raise StoreError("an artifact store is a folder or s3://BUCKET[/PREFIX], got an empty name")
    if spec.startswith(S3):
        bucket = spec[len(S3):].split("/", 1)[0]
        if not bucket:
            raise StoreError(f"artifact store {spec!r}: name a bucket, s3://BUCKET[/PREFIX]")
        return spec.rstrip("/")
    if "://" in spec:
        raise StoreError(f"artifact store {spec!r}: a store is a folder or s3://BUCKET[/PREFIX]")
    return str(Path(spec).expanduser().resolve())


def open_store(spec: str, create: bool = False):
    """The artifact store `spec` names (store_spec), without retries (upload_trial and trial_run add them).
    `create`: a folder store's folder is made when missing (a writer's); a reader's must exist."""
    spec = store_spec(spec)
    if spec.startswith(S3):
        bucket, _, prefix = spec[len(S3):].partition("/")
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError(f"artifact store {spec}: s3:// stores need boto3: pip install -e '.[s3]'") from None
        from optuna.artifacts import Boto3ArtifactStore

        # Backoff retries a failed call: botocore's own few quick tries are enough below it
        # (a server that takes the connection and never answers costs each try read_timeout: kept short)
        client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=20,
                                                  retries={"mode": "standard", "max_attempts": 2}))
        store = Boto3ArtifactStore(bucket, client=client)
        return Prefixed(store, prefix) if prefix else store
    folder = Path(spec)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot make the artifact store folder {folder}: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise StoreError(f"artifact store {folder}: no such folder" if not folder.exists() else
                         f"artifact store {folder} is a file, not a folder")
    return FileSystemArtifactStore(folder)


def failure_text(exc: BaseException) -> str:
    """A store's failure in one line: botocore's and the filesystem's own words, without a traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_store(spec: str):
    """The store a study's workers write (open_store), refused with one StoreError before any trial runs when
    it cannot be written: a probe object is written and removed, so a missing bucket, wrong credentials or an
    unreachable endpoint show at the start, not after the first trial's training."""
    store = open_store(spec, create=True)
    probe = f".write-probe-{os.getpid()}-{time.time_ns()}"
    try:
        store.write(probe, io.BytesIO(b"lstm-studio"))
        store.remove(probe)
    except Exception as exc:  # noqa: BLE001 - each backend words a refused write its own way
        where = endpoint(store)
        raise StoreError(f"cannot write to the artifact store {store_spec(spec)}{where}: {failure_text(exc)}") from None
    return store


def endpoint(store) -> str:
    """ " at https://host" for an S3 store (where boto3's configuration sent it), "" for a folder."""
    client = getattr(getattr(store, "backend", store), "client", None)
    return f" at {client.meta.endpoint_url}" if client is not None else ""


@contextlib.contextmanager
def quiet_retries():
    """Backoff logs every failed try with its traceback; a trial says its upload's failure once, in one line."""
    logger = logging.getLogger(Backoff.__module__)
    mute = lambda record: False  # noqa: E731 - each caller its own filter: readers in threads unmute only theirs
    logger.addFilter(mute)
    try:
        yield
    finally:
        logger.removeFilter(mute)


def result_files(run: Run) -> list[Path]:
    """The files of a run folder that a reader needs (RESULTS and the TensorBoard events), that exist."""
    return [run.path / name for name in RESULTS if (run.path / name).is_file()] + sorted(run.path.glob(EVENTS))


def upload_trial(trial: optuna.Trial, run: Run, store, spec: str) -> str | None:
    """Upload a finished trial's results (result_files) to `store` (named `spec`), recording in the trial's
    user attributes where each file went (FILES_ATTR) and how long it took. Never raises: a failure, after
    Backoff's retries, is recorded in MISSING_ATTR and returned as one line; the trial keeps its value."""
    started = time.perf_counter()
    trial.set_user_attr(STORE_ATTR, spec)
    files: dict[str, list] = {}
    paths = result_files(run)
    retried = Backoff(store, **RETRIES)
    try:
        with quiet_retries():
            for path in paths:
                artifact_id = upload_artifact(artifact_store=retried, file_path=str(path), study_or_trial=trial,
                                              mimetype=MIMETYPES.get(path.suffix, "application/octet-stream"))
                files[path.name] = [artifact_id, path.stat().st_size]
    except Exception as exc:  # noqa: BLE001 - a store's failure of any kind must not lose the trial
        reason = (f"{len(files)} of {len(paths)} files reached the artifact store {spec}"
                  f"{endpoint(store)}: {failure_text(exc)}; they stay in {run.path} on {os.uname().nodename}")
        trial.set_user_attr(MISSING_ATTR, reason)
        return reason
    trial.set_user_attr(FILES_ATTR, files)
    trial.set_user_attr(SECONDS_ATTR, round(time.perf_counter() - started, 3))
    return None


# -- opening a trial from any machine ---------------------------------------------------------------
def cache_dir(study: str, number: int, root: str | Path | None = None) -> Path:
    """Where a trial downloaded from the store lives on this machine: SAVES/cache/<study>/trial_<n>/."""
    return saves_root(root) / "cache" / safe_name(study, "study name") / f"trial_{int(number)}"


def find_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    for trial in study.get_trials(deepcopy=False):
        if trial.number == number:
            return trial
    count = len(study.get_trials(deepcopy=False))
    raise RunError(f"study {study.study_name} has no trial {number}"
                   + (f" (its trials are 0 to {count - 1})" if count else " (it has no trials yet)"))


def local_run(trial: optuna.trial.FrozenTrial) -> Run | None:
    """The trial's own run folder when this machine has it (it ran here, or the folder is on a shared disk)."""
    path = trial.user_attrs.get("run_dir")
    if path and (Path(path) / "config.json").is_file():
        return Run(Path(path))
    return None


def has_results(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial's results can be opened from some machine: its folder is here, or its evaluation is in
    the store."""
    local = local_run(trial)
    return (local.eval_path.is_file() if local else "eval.json" in (trial.user_attrs.get(FILES_ATTR) or {}))


def trial_run(study: optuna.Study, number: int, store: str | None = None, root: str | Path | None = None) -> Run:
    """Trial `number`'s results as a run folder: its own where this machine has it, else the copy in
    SAVES/cache/ downloaded from the artifact store once (`store`, else the one the trial or study recorded)
    and checked file by file against the sizes the trial recorded. RunError says why one cannot be opened."""
    trial = find_trial(study, number)
    local = local_run(trial)
    if local is not None:
        return local
    what = f"trial {number} of study {study.study_name}"
    files = trial.user_attrs.get(FILES_ATTR)
    if not files:
        where = trial.user_attrs.get("run_dir") or "its worker's saves folder"
        if trial.user_attrs.get(MISSING_ATTR):
            raise RunError(f"{what} is not in the artifact store: {trial.user_attrs[MISSING_ATTR]}")
        if trial.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            state = "failed" if trial.state == optuna.trial.TrialState.FAIL else trial.state.name.lower()
            raise RunError(f"{what} is {state}: it has no results to open")
        raise RunError(f"{what}: its results are in {where} on the machine that ran it, and the study has no "
                       "artifact store (run it with `tune --artifacts STORE` for any machine to open its trials)")
    spec = store or trial.user_attrs.get(STORE_ATTR) or study.user_attrs.get(STORE_ATTR)
    folder = cache_dir(study.study_name, number, root)
    if cached(folder, files):
        return Run(folder)
    try:
        spec = store_spec(spec)             # an override as the study would record it, in messages and source.json
        opened = open_store(spec)
    except StoreError as exc:
        raise RunError(f"cannot open {what}: {exc}") from None
    return download(opened, spec, files, folder, what)


def cached(folder: Path, files: dict) -> bool:
    """Whether `folder` holds exactly these artifacts, each at its recorded size."""
    source = read_json_object(folder / SOURCE_FILE)
    return source.get("files") == files and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, (_, size) in files.items())


def download(store, spec: str, files: dict, folder: Path, what: str) -> Run:
    """Download `files` into a fresh folder beside `folder`, check each size, then move it into place: a
    reader never sees a half-downloaded trial, and two readers downloading at once both end with a whole one."""
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.{threading.get_ident()}.{time.time_ns()}.partial")
    try:
        try:
            partial.mkdir(parents=True)
        except OSError as exc:
            raise RunError(f"cannot download {what}: cannot write the cache folder {folder.parent}: "
                           f"{exc.strerror or exc}") from None
        with quiet_retries():
            for name, (artifact_id, size) in files.items():
                target = partial / safe_name(Path(name).name, "artifact file name")
                download_artifact(artifact_store=Backoff(store, **RETRIES), file_path=str(target),
                                  artifact_id=artifact_id)
                if target.stat().st_size != size:
                    raise RunError(f"cannot open {what}: {name} came from the artifact store {spec} as "
                                   f"{target.stat().st_size} bytes, but the trial recorded {size}")
        atomic_write_json(partial / SOURCE_FILE, {"store": spec, "files": files, "downloaded_at": time.time()})
        # A whole copy is never replaced, since a reader that opened it may be reading it: only a stale or cut
        # one is, by one reader at a time; another reader's whole copy, moved in meanwhile, is kept.
        with held_lock(folder.with_name(f".{folder.name}.lock")):
            if not cached(folder, files):
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(partial, folder)
    except RunError:
        raise
    except ArtifactNotFound:    # (S3 says so for a missing bucket too)
        raise RunError(f"cannot download {what} from the artifact store {spec}{endpoint(store)}: it does not hold "
                       "the trial's files: name the store the study wrote them to (--artifacts, or the page's "
                       "field)") from None
    except Exception as exc:  # noqa: BLE001 - a store's failure of any kind: one line
        raise RunError(f"cannot download {what} from the artifact store {spec}{endpoint(store)}: "
                       f"{failure_text(exc)}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return Run(folder)


def results_at(trial: optuna.trial.FrozenTrial) -> str:
    """Where a trial's results are, for tables: "here", "in the store", "missing" (its upload failed: the
    trial's MISSING_ATTR says why) or "on its machine" (its study has no store)."""
    if local_run(trial) is not None:
        return "here"
    if trial.user_attrs.get(FILES_ATTR):
        return "in the store"
    return "missing" if trial.user_attrs.get(MISSING_ATTR) else "on its machine"
