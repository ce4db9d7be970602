"""Background processes, runs and tuning studies alike: launch, one run per device at a time, stop,
liveness, delete.

    run = launch_training(config)      # a queued run directory and a detached `python -m lstm_core train`
    request_stop(run)                  # cooperative: the run ends as cancelled, checkpoints saved
    launch_study(args, "s1", storage)  # a detached `python -m lstm_core tune ARGS`; running at once
    study_running("s1")                # from the pids in the study's workers.json
    request_study_stop("s1")           # every worker stops after its current batch

A run holds an exclusive lock on its device (a file lock in SAVES/locks, released by the kernel when the
process ends, however it ends). A second run for the same device waits, `queued`, until the first ends;
a run for `auto` on a host with several GPUs takes the first free one. A run launched from here takes its
lock at the launch and hands it to its process, so two runs started at the same moment start in the order
they were launched, and the second knows from the start which one it waits for. Tuning trials take the
same locks (device_lock says how). A STOP file in a run's or a study's folder asks it to stop between
batches, and still does after a restart of whatever wrote it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from . import REPO
from .checkpoints import resume_checkpoint
from .config import ConfigError, TrainConfig
from .devices import candidate_devices, policy_for
from .runs import (LIVE_STATES, Run, RunError, atomic_write_json, check_saves, create_run, process_alive,
                   process_start_time, read_json_object, saves_root, study_dir, try_lock, unlock)

STOP_FILE = "STOP"             # in a run's or a study's folder: stop between batches
WORKERS_FILE = "workers.json"  # in a study's folder: the pids of its worker processes, and its storage


def training_devices(config: TrainConfig) -> list[str]:
    """The devices `config` may train on here (devices.candidate_devices), refused up front with a
    ConfigError, before any run folder or trial exists, when the device is absent or cannot run the
    config's amp mode well."""
    import torch

    try:
        devices = candidate_devices(config.device)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    usable, refusals = [], []
    for device in devices:          # on a host of mixed GPUs, `auto` keeps those that run the amp mode
        try:
            policy_for(config.amp, torch.device(device), config.arch)
            usable.append(device)
        except ConfigError as exc:   # AmpUnsupported
            refusals.append(exc)
    if not usable:
        raise refusals[0]
    return usable


def lock_path(device: str, root: str | Path | None = None) -> Path:
    return saves_root(root) / "locks" / f"{device.replace(':', '_')}.lock"


def describe_holder(owner: str) -> str:
    """A lock owner for a person: "run <id>" or "trial <study>/trial_<n>"."""
    return f"trial {owner}" if "/" in owner else f"run {owner}"


def device_holder(device: str, root: str | Path | None = None) -> str | None:
    """The owner written in `device`'s lock when it is a live run (its id) or tuning trial
    ("<study>/trial_<n>"), else None."""
    try:
        owner = lock_path(device, root).read_text().strip()
    except OSError:
        return None
    if not owner:
        return None
    base = saves_root(root) / ("studies" if "/" in owner else "runs")
    try:
        state = Run(base / owner).status().get("state")
    except OSError:
        return None
    return owner if state in LIVE_STATES else None


def claim(handle: IO, owner: str) -> None:
    """Write the owner into a lock file this process has just locked, for device_holder to read."""
    handle.seek(0)
    handle.truncate()
    handle.write(owner)
    handle.flush()


def take_device(devices: list[str], owner: str, root: str | Path | None = None) -> tuple[str, IO] | None:
    """The first of `devices` that is free now, locked for `owner` without waiting: the device and its open
    lock file (the lock lasts while it, or a process that inherited it, is open); None when all are held."""
    for device in devices:
        path = lock_path(device, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
        if try_lock(handle):
            claim(handle, owner)
            return device, handle
        handle.close()
    return None


def inherited_lock(spec: str) -> tuple[str, IO]:
    """The lock a launcher took for this process (take_device), from the `DEVICE:FD` it passed."""
    device, fd = spec.rsplit(":", 1)
    return device, os.fdopen(int(fd), "a+")


@contextlib.contextmanager
def device_lock(devices: str | list[str], owner: str, root: str | Path | None = None,
                stop: Callable[[], bool] = lambda: False, on_wait: Callable[[str | None], None] = lambda holder: None,
                poll: float = 0.5, shared: bool = False, held: tuple[str, IO] | None = None) -> Iterator[str | None]:
    """Hold one of `devices` (the first free one, in order) for the block on behalf of `owner` (a run id,
    or "<study>/trial_<n>"), and yield it; while every one is held elsewhere, wait (calling on_wait once with
    a holder) and take whichever frees first. Yields None when `stop` came first. `held`: a device and lock
    file this process holds already (inherited_lock), used instead.

    The rule: a run holds its device alone. Tuning trials hold a GPU alone too, but share the CPU with
    each other (`shared`: the study's workers split its cores), and a run waiting for the CPU goes before
    trials that have not started yet."""
    devices = [devices] if isinstance(devices, str) else list(devices)
    handles = [held[1]] if held else []
    try:
        for device in devices if held is None else ():
            path = lock_path(device, root)
            path.parent.mkdir(parents=True, exist_ok=True)
            handles.append(open(path, "a+"))
        waited = False
        while held is None:
            for device, handle in zip(devices, handles):
                if shared and waiting_run(device, root):
                    continue
                if not try_lock(handle, shared):
                    continue
                held = (device, handle)
                break
            else:
                if not shared:
                    mark_waiting(devices, owner, root)
                if not waited:
                    on_wait(device_holder(devices[0], root))
                    waited = True
                if stop():
                    yield None
                    return
                time.sleep(poll)
        if waited and not shared:
            mark_waiting(devices, None, root)
        device, handle = held
        claim(handle, owner)
        try:
            yield device
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            unlock(handle)
    finally:
        if not shared:
            mark_waiting(devices, None, root)
        for handle in handles:
            handle.close()


def mark_waiting(devices: list[str], owner: str | None, root: str | Path | None) -> None:
    """Say (owner) or unsay (None) that a run waits for these devices: trials about to start leave them to it."""
    for device in devices:
        path = lock_path(device, root).with_suffix(".waiting")
        if owner is None:
            if read_json_object(path).get("pid") == os.getpid():
                path.unlink(missing_ok=True)
        elif not path.exists():
            atomic_write_json(path, {"owner": owner, "pid": os.getpid(), "pid_start": process_start_time(os.getpid())})


def waiting_run(device: str, root: str | Path | None = None) -> bool:
    """Whether a live run waits for `device` (see mark_waiting)."""
    info = read_json_object(lock_path(device, root).with_suffix(".waiting"))
    return process_alive(info.get("pid"), info.get("pid_start"))


class StopRequest:
    """True once a signal set `event`, or someone wrote the STOP file in `folder`, a run's or a study's
    (works across restarts)."""

    def __init__(self, folder: Path, event):
        self.path = Path(folder) / STOP_FILE
        self.event = event

    def __call__(self) -> bool:
        return self.event.is_set() or self.path.exists()


def launch_training(config: TrainConfig, root: str | Path | None = None) -> Run:
    """Create a queued run and start its training in a detached process (its own session, so a closed
    tab, a page switch or a Streamlit restart leaves it running). Output goes to the run's train.log.
    The run takes the first of its devices that is free now, and its process inherits that lock: its
    status's `device` says which from the start, and stays None while every one is busy (the process then
    waits for one). ConfigError: no device here can train `config`; RunError: the saves folder, its runs/
    or locks/ cannot be written."""
    devices = training_devices(config)
    check_saves(root, below=("runs", "locks"))
    run = create_run(config, root)
    held = None
    try:
        held = take_device(devices, run.id, root)
        if held is not None:
            run.write_status(device=held[0])
        start_process(run, "--run-dir", root, held)
    except BaseException:
        if run.status().get("pid") == os.getpid():     # no process took the run: leave no run behind
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    finally:
        if held is not None:
            held[1].close()             # the process holds it now (or, if it did not start, nobody does)
    return run


def launch_resume(run: Run, root: str | Path | None = None) -> None:
    """Continue a stopped run from its last finished epoch, in a detached process."""
    state = run.status().get("state")
    if state not in ("cancelled", "interrupted", "failed"):
        raise RunError(f"run {run.id} is {state}: only a cancelled, interrupted or failed run can be resumed")
    resume_checkpoint(run)                        # refuse now, in the page, what the process would refuse
    run.write_status(state="queued", resuming=True, ended_at=None, error=None)
    start_process(run, "--resume", root)


def start_process(run: Run, how: str, root: str | Path | None, held: tuple[str, IO] | None = None) -> None:
    """`train HOW RUN` detached; `held`: a device lock (take_device) the process inherits and keeps."""
    args = ["train", how, str(run.path), "--saves", str(saves_root(root))]
    fds = ()
    if held is not None:
        fds = (held[1].fileno(),)
        args += ["--device-lock", f"{held[0]}:{fds[0]}"]
    process = spawn_detached(args, run.path / "train.log", fds)
    run.write_status(pid=process.pid, pid_start=process_start_time(process.pid))


def spawn_detached(args: list[str], log_path: Path, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """`python -m lstm_core ARGS` in a session of its own (a closed tab, a page switch or a Streamlit
    restart leaves it running), its output appended to log_path; `pass_fds` stay open in it."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "lstm_core", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   pass_fds=pass_fds)
    _CHILDREN.append(process)
    reap()
    return process


_CHILDREN: list[subprocess.Popen] = []


def reap() -> None:
    """Collect exited children, so they don't linger as zombies in a long-lived server."""
    _CHILDREN[:] = [p for p in _CHILDREN if p.poll() is None]


def request_stop(run: Run) -> None:
    """Ask a queued or running run to stop: the STOP file (read between batches) and SIGTERM."""
    (run.path / STOP_FILE).touch()
    status = run.status()
    pid = status.get("pid")
    if status.get("state") in LIVE_STATES and pid != os.getpid() and process_alive(pid, status.get("pid_start")):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)


def delete_run(run: Run) -> None:
    """Remove a run directory; a queued or running run must be stopped first."""
    state = run.status().get("state")
    if state in LIVE_STATES:
        raise RunError(f"run {run.id} is still {state}: stop it before deleting it")
    shutil.rmtree(run.path)


# -- tuning studies ----------------------------------------------------------------------------
def launch_study(args: list[str], name: str, storage: str, root: str | Path | None = None) -> subprocess.Popen:
    """Start `python -m lstm_core tune ARGS` (ARGS name the study `name` in `storage`) detached: a refresh
    or another user does not stop it. It counts as running from here on, before it has loaded anything."""
    folder = study_dir(name, root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STOP_FILE).unlink(missing_ok=True)
    process = spawn_detached(["tune", *args, "--saves", str(saves_root(root))], folder / "tune.log")
    record_workers(folder, [process.pid], storage)     # the command rewrites it once it starts its workers
    return process


def start_workers(argv: list[str], workers: int, name: str, storage: str,
                  root: str | Path | None = None) -> list[subprocess.Popen]:
    """The `workers - 1` children of a tune command (`python -m lstm_core ARGV --worker`; the command is
    the last worker), recorded with it in the study's workers.json. An old STOP file is cleared first."""
    folder = study_dir(name, root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STOP_FILE).unlink(missing_ok=True)
    children = [subprocess.Popen([sys.executable, "-m", "lstm_core", *argv, "--worker"]) for _ in range(workers - 1)]
    record_workers(folder, [*(p.pid for p in children), os.getpid()], storage)
    return children


def wait_workers(children: Iterable[subprocess.Popen]) -> Iterator[subprocess.Popen]:
    """Wait for each child of start_workers in turn, yielding each that failed (a nonzero exit status) as
    soon as it is known."""
    for child in children:
        if child.wait() != 0:
            yield child


def record_workers(folder: Path, pids: list[int], storage: str) -> None:
    atomic_write_json(folder / WORKERS_FILE, {"workers": [{"pid": pid, "pid_start": process_start_time(pid)}
                                                          for pid in pids], "storage": storage})


def study_workers(name: str, root: str | Path | None = None) -> list[int]:
    """The pids of the study's worker processes that are alive."""
    return live_pids(read_json_object(study_dir(name, root) / WORKERS_FILE))


def study_running(name: str, root: str | Path | None = None) -> bool:
    return bool(study_workers(name, root))


def running_studies(storage: str | None = None, root: str | Path | None = None) -> list[str]:
    """The names of the studies with a live worker (only those in `storage`, when given), including one
    launched that has not created its study in the storage yet."""
    base = saves_root(root) / "studies"
    names = []
    for path in sorted(base.glob(f"*/{WORKERS_FILE}")) if base.is_dir() else []:
        info = read_json_object(path)
        if (storage is None or info.get("storage") == storage) and live_pids(info):
            names.append(path.parent.name)
    return names


def live_pids(workers: dict) -> list[int]:
    """The pids in a workers.json whose processes are alive (a pid reused since is not)."""
    return [w["pid"] for w in workers.get("workers", []) if process_alive(w.get("pid"), w.get("pid_start"))]


def request_study_stop(name: str, root: str | Path | None = None) -> None:
    """Ask every worker of the study to stop after its current batch (the STOP file is read between
    batches and between trials)."""
    folder = study_dir(name, root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STOP_FILE).touch()
    for pid in study_workers(name, root):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
