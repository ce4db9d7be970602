"""Shared fixtures. Tests train on small slices of the real MNIST; every test gets its own saves root."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

try:
    from playwright.sync_api import Page, expect
except ImportError:    # the GPU check's bare machine has torch, numpy and pytest only (tests/test_cuda.py)
    Page = expect = None

from benchmarks.harness import (CHROMIUM, CHROMIUM_ARGS, REPO, free_port, stop_live_runs,  # noqa: F401
                                streamlit_server, wait_until)
from lstm_core import TrainConfig
from lstm_core.config import NO_AUGMENTATION
from lstm_core.data import default_data_dir, load_mnist
from lstm_core.train import Callback

# The real data, from where every loader looks (the GPU check too): $LSTM_DATA, else the saves root's data/
# (IDX files after the first load). Pinned for the tests' processes, since each test moves LSTM_SAVES.
DATA_DIR = default_data_dir()
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


@pytest.fixture
def cli(saves, tmp_path, capsys, monkeypatch):
    """`python -m lstm_core ARGS` in this process (torch is imported already), from tmp_path (where relative
    paths land), reading $LSTM_SAVES = `saves`: returns (exit status, stderr, stdout).
    cli.dashboard(ARGS) is `python -m lstm_core.dashboard ARGS`'s."""
    from lstm_core import dashboard
    from lstm_core.__main__ import main

    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def run(*args, entry=main):
        code = entry([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, err, out

    run.dashboard = lambda *args: run(*args, entry=dashboard.main)
    yield run
    for sig, handler in handlers.items():   # train and tune take over SIGTERM and SIGINT: give them back
        signal.signal(sig, handler)


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
    from lstm_core.recorder import RunRecorder
    from lstm_core.runs import create_run
    from lstm_core.train import fit

    root = tmp_path_factory.mktemp("trained") / "saves"
    run = create_run(tiny_config(), root)
    fit(run.config(), [RunRecorder(run)], data=mnist)
    return root


# -- driving the app in Chromium (test_e2e_*, marked browser): a real `streamlit run` server and Debian's
# Chromium, from benchmarks/harness.py (shared with the load benchmark) --------------------------------
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


# -- object storage (artifact stores shared by machines): moto's S3 server, started by the tests themselves --
S3_BUCKET = "lstm-studio"


class S3Server:
    """A local S3 server (moto's ThreadedMotoServer) on a free loopback port, with one bucket. `env`: what a
    process needs to reach it through boto3's own configuration (AWS_ENDPOINT_URL and dummy credentials)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self.running = False

    def start(self) -> "S3Server":
        self.server.start()
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, bucket: str = S3_BUCKET) -> list[str]:
        return [o["Key"] for o in self.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


@contextlib.contextmanager
def serving_s3(monkeypatch):
    """A fresh S3 server with the bucket S3_BUCKET, its endpoint and credentials set in this process's
    environment through `monkeypatch` (subprocesses started with os.environ inherit them). Skipped where moto
    is not installed (the floor venv)."""
    pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the local S3 server")
    server = S3Server().start()
    try:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        server.client().create_bucket(Bucket=S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(monkeypatch):
    """serving_s3 for one test."""
    with serving_s3(monkeypatch) as server:
        yield server

