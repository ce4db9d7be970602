"""A real app to measure or test against: `streamlit run streamlit_app.py` on a free port over a saves root,
Debian's Chromium with the flags this machine needs, and waiting for things to happen. Shared by the load
benchmark (benchmarks/load_draw.py) and the browser tests (tests/conftest.py)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lstm_core import REPO

# Playwright's own browser download needs the internet: Debian's package instead
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# the drawable canvas's drawing layer (in the component's shadow DOM, which Playwright's locators reach)
CANVAS = "canvas.upper-canvas"


def drag_on_canvas(page, points: list[tuple[float, float]], steps: int = 12) -> None:
    """One mouse stroke on the Draw page's canvas through `points`, given as fractions of its width and height,
    with `steps` mouse moves between each two (a Playwright sync Page)."""
    box = page.locator(CANVAS).bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=steps)
    page.mouse.up()


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    """predicate()'s first true value, asked every `poll` seconds; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


def stop_live_runs(root: Path, timeout: float = 60) -> None:
    """Stop the training processes of `root` and wait for them: they outlive their launcher by design, and
    one left behind would slow everything after it."""
    from lstm_core.jobs import request_stop
    from lstm_core.runs import LIVE_STATES, list_runs, open_run

    # runs this very process created (create_run in a test) have no training process to stop
    live = [r["id"] for r in list_runs(root) if r["state"] in LIVE_STATES
            and open_run(r["id"], root).status().get("pid") != os.getpid()]
    for run_id in live:
        request_stop(open_run(run_id, root))
    if live:
        wait_until(lambda: not [i for i in live if open_run(i, root).status().get("state") in LIVE_STATES],
                   timeout, f"the training processes of {', '.join(live)} stopping")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0, poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        time.sleep(poll)
    raise RuntimeError(f"streamlit did not answer {url}/_stcore/health within {timeout:.0f} s")


def start_server(saves: Path, port: int, log_path: Path, poll: float = 0.3) -> subprocess.Popen:
    """`streamlit run streamlit_app.py` on `port`, reading `saves`, logging to `log_path`; returned once it
    answers its health check (killed, with its log in the error, when it does not)."""
    cmd = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "LSTM_SAVES": str(saves)}, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, poll=poll)
    except RuntimeError as exc:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{exc}\n{log_path.read_text(errors='replace')}") from None
    return proc


@contextlib.contextmanager
def streamlit_server(saves: Path, log_dir: Path):
    """A real app server on a free port, reading `saves`, for the block; yields its URL."""
    port = free_port()
    proc = start_server(saves, port, log_dir / f"streamlit-{port}.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
