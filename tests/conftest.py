"""Shared fixtures. Tests train on small slices of the real MNIST; every test gets its own saves root."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

try:
    from playwright.sync_api import Page, expect
except ImportError:    # the GPU check's bare machine has torch, numpy and pytest only (tests/test_cuda.py)
    Page = expect = None

from lstm_core import TrainConfig
from lstm_core.config import NO_AUGMENTATION
from lstm_core.data import load_mnist
from lstm_core.train import Callback

REPO = Path(__file__).resolve().parent.parent
# The real data, loaded once into the repository's saves/data (IDX files after the first load).
DATA_DIR = Path(os.environ.get("LSTM_DATA", REPO / "saves" / "data"))
os.environ["LSTM_DATA"] = str(DATA_DIR)


@pytest.fixture(scope="session")
def mnist():
    return load_mnist(DATA_DIR)


@pytest.fixture
def saves(tmp_path, monkeypatch) -> Path:
    """An empty saves root for this test, also exported as LSTM_SAVES for code that reads it. Training
    processes a test started there are stopped afterwards, passed or failed: they outlive their
    launcher by design, and one left behind would slow every later test."""
    root = tmp_path / "saves"
    root.mkdir()
    monkeypatch.setenv("LSTM_SAVES", str(root))
    yield root
    stop_live_runs(root)


def stop_live_runs(root: Path, timeout: float = 60) -> None:
    from lstm_core.jobs import request_stop
    from lstm_core.runs import LIVE_STATES, list_runs, open_run

    # runs this very process created (create_run in a test) have no training process to stop
    live = [r["id"] for r in list_runs(root) if r["state"] in LIVE_STATES
            and open_run(r["id"], root).status().get("pid") != os.getpid()]
    for run_id in live:
        request_stop(open_run(run_id, root))
    deadline = time.time() + timeout
    while live and time.time() < deadline:
        time.sleep(0.2)
        live = [i for i in live if open_run(i, root).status().get("state") in LIVE_STATES]


def tiny_config(**changes) -> TrainConfig:
    """A run that takes a second or two on a CPU and learns (~60% validation accuracy after 2 epochs):
    2,000 training samples, 1,000 for validation."""
    base = dict(hidden_size=48, epochs=2, batch_size=50, limit_train=2000, val_size=1000, lr=1e-2,
                optimizer="adam", scheduler="none", log_every=10, **NO_AUGMENTATION)
    return TrainConfig(**{**base, **changes})


class StopAt(Callback):
    """A fit callback that sets `stop` when training reaches batch `batch` of epoch `epoch` + 1."""

    def __init__(self, stop, epoch, batch):
        self.stop, self.epoch, self.batch = stop, epoch, batch

    def on_batch(self, state, record):
        if state.epoch == self.epoch and state.batch == self.batch:
            self.stop.set()


@pytest.fixture(scope="session")
def trained_saves(tmp_path_factory, mnist) -> Path:
    """A saves root holding one real, completed tiny run (shared by tests that only read it)."""
    from lstm_core.runs import RunRecorder, create_run
    from lstm_core.train import fit

    root = tmp_path_factory.mktemp("trained") / "saves"
    run = create_run(tiny_config(), root)
    fit(run.config(), [RunRecorder(run)], data=mnist)
    return root


# -- browser tests --
# A real `streamlit run` server and Debian's Chromium (Playwright's own browser download needs the
# internet). Tests that use them carry @pytest.mark.browser.

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
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
        time.sleep(0.3)
    raise RuntimeError(f"streamlit did not answer {url}/_stcore/health within {timeout:.0f} s")


@contextlib.contextmanager
def streamlit_server(saves: Path, log_dir: Path):
    """A real `streamlit run streamlit_app.py` on a free port, reading `saves`; yields its URL."""
    port = free_port()
    log_path = log_dir / f"streamlit-{port}.log"
    env = {**os.environ, "LSTM_SAVES": str(saves)}
    cmd = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except RuntimeError as exc:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{exc}\n{log_path.read_text(errors='replace')}") from None
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- driving the app in Chromium (test_e2e_*) ------------------------------------------------------
# validation-loss points of the first plotly chart (the epoch curves); 0 while the chart is (re)drawn
CURVE_POINTS_JS = """() => { const p = document.querySelector('.js-plotly-plot');
                             return p && p.data && p.data[1] ? p.data[1].x.length : 0; }"""


def curve_points(page: Page) -> int:
    return page.evaluate(CURVE_POINTS_JS)


def wait_for_points(page: Page, more_than: int, timeout: float) -> None:
    page.wait_for_function(f"() => ({CURVE_POINTS_JS})() > {more_than}", timeout=timeout)


def settle(page: Page) -> None:
    """Wait for the script run a widget change started to end (Streamlit's status widget shows while one
    runs): a click on an element of the page being redrawn can miss it."""
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)


def set_number(page: Page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    expect(box).to_have_value(str(value))
    settle(page)


@pytest.fixture(scope="session")
def app_url(trained_saves, tmp_path_factory):
    """The URL of a streamlit server reading the trained saves root."""
    with streamlit_server(trained_saves, tmp_path_factory.mktemp("streamlit")) as url:
        yield url


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright's launch options (--headed, --slowmo) plus the local Chromium."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


# -- PostgreSQL (the multi-worker, multi-machine study storage) --
def find_pg_bin(name: str) -> str | None:
    import glob
    import shutil
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on a free loopback port ($LSTM_TEST_PG_URL when set instead).
    Skipped, with the reason, only where PostgreSQL's server binaries are not installed."""
    if os.environ.get("LSTM_TEST_PG_URL"):
        yield os.environ["LSTM_TEST_PG_URL"]
        return
    initdb, pg_ctl = find_pg_bin("initdb"), find_pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: `make test` installs them "
                    "from Debian's packages when run as root")
    import pwd
    import shutil
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="lstm-test-pg-"))  # not under pytest's root-only tmp tree
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use the postgres account
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
