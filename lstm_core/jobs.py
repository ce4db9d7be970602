"""Background training processes: launch, one run per device at a time, stop, delete.

    run = launch_training(config)      # a queued run directory and a detached `python -m lstm_core train`
    request_stop(run)                  # cooperative: the run ends as cancelled, checkpoints saved

A run holds an exclusive lock on its device (a file lock in SAVES/locks, released by the kernel when the
process ends, however it ends). A second run for the same device waits, `queued`, until the first ends;
a run for `auto` on a host with several GPUs takes the first free one. Tuning trials take the same locks
(device_lock says how).
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
from typing import Callable, Iterator

from .config import ConfigError, TrainConfig
from .devices import candidate_devices, policy_for
from .runs import (LIVE_STATES, Run, RunError, atomic_write_json, create_run, process_alive, process_start_time,
                   read_json_object, resume_checkpoint, saves_root)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs on one device are then not serialized
    fcntl = None

STOP_FILE = "STOP"
REPO = Path(__file__).resolve().parent.parent


def pick_device(devices: list[str], root: str | Path | None = None) -> str:
    """Where a run for `devices` (training_devices) would start now: the first that no live run or trial
    holds, else the first."""
    return next((d for d in devices if device_holder(d, root) is None), devices[0])


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


@contextlib.contextmanager
def device_lock(devices: str | list[str], owner: str, root: str | Path | None = None,
                stop: Callable[[], bool] = lambda: False, on_wait: Callable[[str | None], None] = lambda holder: None,
                poll: float = 0.5, shared: bool = False) -> Iterator[str | None]:
    """Hold one of `devices` (the first free one, in order) for the block on behalf of `owner` (a run id,
    or "<study>/trial_<n>"), and yield it; while every one is held elsewhere, wait (calling on_wait once with
    a holder) and take whichever frees first. Yields None when `stop` came first.

    The rule: a run holds its device alone. Tuning trials hold a GPU alone too, but share the CPU with
    each other (`shared`: the study's workers split its cores), and a run waiting for the CPU goes before
    trials that have not started yet."""
    devices = [devices] if isinstance(devices, str) else list(devices)
    if fcntl is None:
        yield devices[0]
        return
    handles = []
    try:
        for device in devices:
            path = lock_path(device, root)
            path.parent.mkdir(parents=True, exist_ok=True)
            handles.append(open(path, "a+"))
        waited, held = False, None
        while held is None:
            for device, handle in zip(devices, handles):
                if shared and waiting_run(device, root):
                    continue
                try:
                    fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                except BlockingIOError:
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
        handle.seek(0)
        handle.truncate()
        handle.write(owner)
        handle.flush()
        try:
            yield device
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
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
    """True once a signal set `event`, or someone wrote the run's STOP file (works across restarts)."""

    def __init__(self, run: Run, event):
        self.path = run.path / STOP_FILE
        self.event = event

    def __call__(self) -> bool:
        return self.event.is_set() or self.path.exists()


def launch_training(config: TrainConfig, root: str | Path | None = None) -> Run:
    """Create a queued run and start its training in a detached process (its own session, so a closed
    tab, a page switch or a Streamlit restart leaves it running). Output goes to the run's train.log."""
    run = create_run(config, root)
    start_process(run, "--run-dir", root)
    return run


def launch_resume(run: Run, root: str | Path | None = None) -> None:
    """Continue a stopped run from its last finished epoch, in a detached process."""
    state = run.status().get("state")
    if state not in ("cancelled", "interrupted", "failed"):
        raise RunError(f"run {run.id} is {state}: only a cancelled, interrupted or failed run can be resumed")
    resume_checkpoint(run)                        # refuse now, in the page, what the process would refuse
    run.write_status(state="queued", resuming=True, ended_at=None, error=None)
    start_process(run, "--resume", root)


def start_process(run: Run, how: str, root: str | Path | None) -> None:
    process = spawn_detached(["train", how, str(run.path), "--saves", str(saves_root(root))], run.path / "train.log")
    run.write_status(pid=process.pid, pid_start=process_start_time(process.pid))
    _CHILDREN.append(process)
    reap()


def spawn_detached(args: list[str], log_path: Path) -> subprocess.Popen:
    """`python -m lstm_core ARGS` in a session of its own (a closed tab, a page switch or a Streamlit
    restart leaves it running), its output appended to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "lstm_core", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


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
