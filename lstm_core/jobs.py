"""Background training processes: launch, one run per device at a time, stop, delete.

    run = launch_training(config)      # a queued run directory and a detached `python -m lstm_core train`
    request_stop(run)                  # cooperative: the run ends as cancelled, checkpoints saved

A run holds an exclusive lock on its device (a file lock in SAVES/locks, released by the kernel when the
process ends, however it ends). A second run for the same device waits, `queued`, until the first ends.
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

from .config import TrainConfig
from .devices import resolve_device
from .runs import (LIVE_STATES, Run, RunError, create_run, process_alive, process_start_time, resume_checkpoint,
                   saves_root)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs on one device are then not serialized
    fcntl = None

STOP_FILE = "STOP"
REPO = Path(__file__).resolve().parent.parent


def device_key(name: str) -> str:
    """The device a config's `device` lands on, as a lock name: cpu, cuda:0, mps."""
    return str(resolve_device(name))


def lock_path(device: str, root: str | Path | None = None) -> Path:
    return saves_root(root) / "locks" / f"{device.replace(':', '_')}.lock"


def device_holder(device: str, root: str | Path | None = None) -> str | None:
    """The id of the live run that holds `device`, if any (its id is written in the lock file)."""
    try:
        owner = lock_path(device, root).read_text().strip()
    except OSError:
        return None
    if not owner:
        return None
    try:
        state = Run(saves_root(root) / "runs" / owner).status().get("state")
    except OSError:
        return None
    return owner if state in LIVE_STATES else None


@contextlib.contextmanager
def device_lock(device: str, owner: str, root: str | Path | None = None, stop: Callable[[], bool] = lambda: False,
                on_wait: Callable[[str | None], None] = lambda holder: None, poll: float = 0.5) -> Iterator[bool]:
    """Hold `device` for the block on behalf of run `owner`; while another process holds it, wait
    (calling on_wait once with the holder's run id). Yields False when `stop` came before the device."""
    if fcntl is None:
        yield True
        return
    path = lock_path(device, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    on_wait(device_holder(device, root))
                    waited = True
                if stop():
                    yield False
                    return
                time.sleep(poll)
        handle.seek(0)
        handle.truncate()
        handle.write(owner)
        handle.flush()
        try:
            yield True
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


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
