"""A Streamlit server killed (SIGKILL) while a training run or a tuning study is active loses nothing: the
detached process keeps working with no server at all, and a new server on the same saves root (and port)
shows it live and then finished, with every result.

Real processes throughout: `streamlit run` servers this test kills and restarts itself, the training and
tuning processes the app launches, and Chromium clicking the pages."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect

from benchmarks.harness import start_server
from conftest import (REPO, curve_points, free_port, set_number, settle, stop_live_runs, wait_for_points,
                      wait_until)
from lstm_core.checkpoints import load_checkpoint, load_model
from lstm_core.jobs import request_study_stop, study_workers
from lstm_core.runs import LIVE_STATES, list_runs, process_alive, run_at
from lstm_core.tune import FINISHED


# -- servers this test kills and restarts ------------------------------------------------------------
class Servers:
    """`streamlit run streamlit_app.py` processes on one saves root, started and killed at will; close()
    ends whichever are left (a failed test included)."""

    def __init__(self, saves: Path, log_dir: Path):
        self.saves, self.log_dir = saves, log_dir
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """A new server on this pool's port (the one the browser tab knows); its URL once it answers."""
        log_path = self.log_dir / f"streamlit-{len(self.procs)}.log"
        self.logs.append(log_path)
        self.procs.append(start_server(self.saves, self.port, log_path))
        return self.url

    def kill(self) -> None:
        """SIGKILL the live server: no shutdown code of Streamlit or of the app runs."""
        (proc,) = [p for p in self.procs if p.poll() is None]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        with pytest.raises(OSError):             # nothing answers on the port any more
            urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2)

    def tracebacks(self) -> list[str]:
        """What the servers logged of errors raised in the app's scripts."""
        return [f"{log.name}: {log.read_text(errors='replace')}" for log in self.logs
                if "Traceback" in log.read_text(errors="replace")]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def processes_using(saves: Path) -> list[int]:
    """Pids whose command line names this test's saves root: the training and tuning processes the
    servers launched (they name it in --saves, --storage or --space). A killed server orphans them."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(saves) in cmdline and process_alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def end_processes(saves: Path, timeout: float = 60) -> None:
    """Stop every study and run of `saves` the polite way, then kill by pid whatever still runs."""
    for folder in (saves / "studies").glob("*") if (saves / "studies").is_dir() else []:
        request_study_stop(folder.name, saves)
    stop_live_runs(saves, timeout=timeout / 2)
    deadline = time.time() + timeout / 2
    while processes_using(saves) and time.time() < deadline:
        time.sleep(0.3)
    for pid in processes_using(saves):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def servers(saves, tmp_path):
    pool = Servers(saves, tmp_path)
    try:
        yield pool
    finally:
        pool.close()
        end_processes(saves)


def open_page(page: Page, url: str, path: str, heading: str) -> None:
    page.goto(f"{url}/{path}")
    expect(page.get_by_role("heading", name=heading)).to_be_visible(timeout=60_000)


def metric(page: Page, label: str):
    """The value element of the st.metric labelled `label`."""
    label = page.get_by_test_id("stMetricLabel").get_by_text(label, exact=True)
    return page.get_by_test_id("stMetric").filter(has=label).get_by_test_id("stMetricValue")


def set_slider(page: Page, label: str, value: int) -> None:
    """Move an integer st.slider with the keyboard, one step at a time from where it is."""
    thumb = page.locator(f'input[type="range"][aria-label="{label}"]')
    thumb.focus()
    now, low = int(thumb.get_attribute("aria-valuetext")), int(thumb.get_attribute("min"))
    if value - low < abs(value - now):           # nearer the minimum than where it is: start from there
        thumb.press("Home")
        now = low
    for _ in range(abs(value - now)):
        thumb.press("ArrowRight" if value > now else "ArrowLeft")
    expect(thumb).to_have_attribute("aria-valuetext", str(value))
    settle(page)


def alerts(page: Page) -> list[str]:
    boxes = page.get_by_test_id("stAlert")
    return [boxes.nth(i).inner_text() for i in range(boxes.count())]


def expect_app_navigation(page: Page) -> None:
    """The app's own navigation (streamlit_app.py ran), not Streamlit's legacy one built from the file
    names in pages/ (what a fresh server served when its first request named a page)."""
    links = page.get_by_test_id("stSidebarNav").get_by_role("link")
    expect(links).to_have_count(6, timeout=30_000)
    expect(links).to_contain_text(["Home", "Train", "Draw", "Runs", "Tuning", "Evaluate"])


# -- a fresh server's first requests -----------------------------------------------------------------
@pytest.mark.browser
def test_tabs_reconnecting_at_once_to_a_fresh_server_all_get_the_apps_navigation(browser, saves, servers):
    """Tabs left open on several pages reconnect together to a restarted server: each first run happens
    in Streamlit's legacy pages/ mode, and every tab (not only the first to run its page) must leave it."""
    url = servers.start()
    pages = {"tuning": "Tuning", "train": "Train", "draw": "Draw", "evaluate": "Evaluate", "runs": "Runs"}
    tabs = [browser.new_page() for _ in pages]
    try:
        for tab, path in zip(tabs, pages):
            tab.goto(f"{url}/{path}", wait_until="commit")
        for tab, heading in zip(tabs, pages.values()):
            expect(tab.get_by_role("heading", name=heading)).to_be_visible(timeout=60_000)
            expect_app_navigation(tab)
    finally:
        for tab in tabs:
            tab.close()
    assert not servers.tracebacks()


# -- a training run ---------------------------------------------------------------------------------
EPOCHS = 10


@pytest.mark.browser
def test_a_training_run_outlives_a_killed_server_and_the_next_server_shows_it_to_the_end(page: Page, saves, servers):
    url = servers.start()
    open_page(page, url, "train", "Train")       # a fresh server's first request, for a page's URL
    expect_app_navigation(page)
    # a run of ~30 s on an idle 2-core CPU: 6,000 samples an epoch, progress every 10 batches
    set_slider(page, "epochs", EPOCHS)
    page.get_by_text("Advanced", exact=True).click()
    set_number(page, "limit training samples (0 = all)", 6000)
    set_number(page, "validation samples", 1000)
    set_slider(page, "progress every N batches", 10)
    page.get_by_role("button", name="Start training").click()
    expect(page.get_by_text("Started run")).to_be_visible(timeout=30_000)
    (run_dir,) = list((saves / "runs").iterdir())
    run = run_at(run_dir)
    assert run.config().epochs == EPOCHS and run.config().limit_train == 6000 and run.config().log_every == 10

    # training has begun (the process has its data and writes batches) when the server dies
    wait_until(lambda: run.status().get("state") == "running" and run.metrics(), 90, "the run starting")
    pid = run.status()["pid"]
    servers.kill()
    assert process_alive(pid, run.status().get("pid_start"))
    # no server at all: the run goes on, finishing an epoch and writing its batches
    lines = len(run.metrics())
    epochs = len(run.epochs())
    wait_until(lambda: len(run.epochs()) > epochs, 60, "an epoch ending while no server runs")
    assert len(run.metrics()) > lines
    assert process_alive(pid, run.status().get("pid_start")) and run.status()["state"] == "running"
    assert len(run.epochs()) < EPOCHS, "the run ended before a new server could show it live: make it longer"

    servers.start()                              # a new server, same port, same saves root
    # the tab left open on the dead server reconnects by itself and finds the run, live
    expect(page.get_by_text(re.compile(rf"Run {run.id} · state running"))).to_be_visible(timeout=60_000)
    expect_app_navigation(page)
    expect(page.locator(f".st-key-stop_{run.id} button").first).to_be_visible()
    wait_for_points(page, 0, timeout=60_000)
    first = curve_points(page)
    # the Runs page, in a second tab, lists it as running
    runs_tab = page.context.new_page()
    open_page(runs_tab, url, "runs", "Runs")
    row = runs_tab.get_by_test_id("stDataFrame").locator("tr", has=runs_tab.get_by_text(run.id, exact=True))
    expect(row).to_have_count(1, timeout=30_000)
    if run.status()["state"] == "running":
        expect(row).to_contain_text("running")
    # the live view keeps refreshing from the new server: a point per epoch, until the results come
    wait_for_points(page, first, timeout=90_000)
    expect(page.get_by_text("Test results")).to_be_visible(timeout=120_000)
    expect(page.get_by_text(re.compile(rf"Run {run.id} · state completed"))).to_be_visible()

    # nothing lost: one process did every epoch once, the results and checkpoints are whole
    status = run.status()
    assert status["state"] == "completed" and status["pid"] == pid
    wait_until(lambda: not process_alive(pid, status.get("pid_start")), 30, "the training process exiting")
    metrics = run.metrics()
    assert [r["event"] for r in metrics].count("start") == 1 and [r["event"] for r in metrics].count("end") == 1
    assert [r["epoch"] for r in run.epochs()] == list(range(1, EPOCHS + 1))
    evaluation = run.eval()
    assert evaluation["stopped"] == "completed" and evaluation["test_accuracy"] > 0.8
    expect(metric(page, "test accuracy")).to_have_text(f"{evaluation['test_accuracy']:.2%}")
    expect(metric(page, "epoch")).to_have_text(f"{EPOCHS}/{EPOCHS}")
    last = load_checkpoint(run.last_path)
    assert last["epoch"] == EPOCHS and not last["partial"] and len(last["history"]) == EPOCHS
    assert load_checkpoint(run.best_path)["epoch"] == evaluation["best_epoch"]
    model, config = load_model(run.path)
    assert config.epochs == EPOCHS and not model.training

    open_page(runs_tab, url, "runs", "Runs")
    row = runs_tab.get_by_test_id("stDataFrame").locator("tr", has=runs_tab.get_by_text(run.id, exact=True))
    expect(row).to_contain_text("completed", timeout=30_000)
    for tab in (page, runs_tab):
        expect(tab.get_by_test_id("stException")).to_have_count(0)
    assert not servers.tracebacks()
    assert [r["state"] for r in list_runs(saves)] == ["completed"]


# -- a tuning study ---------------------------------------------------------------------------------
STUDY = "restart-study"
TRIALS = 6


@pytest.mark.browser
def test_a_tuning_study_outlives_a_killed_server_and_the_next_server_shows_it_finish(page: Page, saves, servers):
    storage = f"sqlite:///{saves / 'optuna.db'}"
    url = servers.start()
    open_page(page, url, "tuning", "Tuning")
    name = page.get_by_label("Study name", exact=True)
    name.fill(STUDY)
    name.press("Enter")
    set_number(page, "Trials", TRIALS)
    set_number(page, "epochs", 2)
    set_number(page, "limit training samples (0 = all)", 2000)
    set_number(page, "validation samples", 500)
    for param in ("num_layers", "bidirectional"):           # one-layer, one-way LSTMs: a few seconds a trial
        settle(page)
        page.get_by_role("button", name=param, exact=True).first.click()
    settle(page)
    launch = page.get_by_role("button", name=re.compile("Launch study"))
    try:
        expect(launch).to_be_enabled(timeout=30_000)
        launch.click(timeout=30_000)
    except (AssertionError, PlaywrightError):
        raise AssertionError(f"Launch study cannot be clicked: {alerts(page)}") from None
    expect(page.get_by_text(f"Started study {STUDY}")).to_be_visible(timeout=30_000)

    def study():
        try:
            return optuna.load_study(study_name=STUDY, storage=storage)
        except KeyError:
            return None

    def finished() -> int:
        s = study()
        return len(s.get_trials(deepcopy=False, states=FINISHED)) if s else 0

    # the worker has its data and trains trial 0 when the server dies
    wait_until(lambda: (saves / "studies" / STUDY / "trial_0" / "metrics.jsonl").exists(), 90, "trial 0 starting")
    (worker,) = wait_until(lambda: study_workers(STUDY, saves), 30, "the study's workers.json")
    assert set(study().user_attrs["space"]) == {"optimizer", "lr", "weight_decay", "hidden_size", "dropout",
                                                "batch_size"}
    servers.kill()
    assert process_alive(worker)
    done = finished()
    wait_until(lambda: finished() > done, 90, "a trial finishing while no server runs")
    assert study_workers(STUDY, saves) == [worker]
    assert finished() < TRIALS, "the study ended before a new server could show it live: make it longer"

    servers.start()
    page.goto(f"{url}/tuning")                 # a fresh page on the new server: it opens the newest study
    expect(page.get_by_role("heading", name="Tuning")).to_be_visible(timeout=60_000)
    expect_app_navigation(page)
    expect(page.get_by_role("combobox", name="Study")).to_have_value(re.compile(rf"^{STUDY} · "), timeout=60_000)
    expect(page.get_by_text(f"Study {STUDY} · running · 1 worker(s)")).to_be_visible(timeout=60_000)
    expect(page.locator(".st-key-tune_stop button").first).to_be_visible(timeout=60_000)

    def shown() -> int | None:
        """Finished trials as the page counts them (complete + pruned), None while it draws."""
        values = [metric(page, label).first for label in ("complete", "pruned")]
        try:
            return sum(int(value.inner_text(timeout=2_000)) for value in values)
        except (ValueError, PlaywrightError):
            return None

    # the live view follows the study, trial by trial, to the requested count; then it is finished
    seen = []
    ended = page.get_by_text(f"Study {STUDY} · finished")
    deadline = time.time() + 150
    while not ended.count() and time.time() < deadline:
        if (count := shown()) is not None and count not in seen:
            seen.append(count)
        time.sleep(0.5)
    expect(ended).to_be_visible()
    wait_until(lambda: shown() == TRIALS, 30, f"the page counting {TRIALS} finished trials")
    seen.append(TRIALS)
    assert seen == sorted(seen) and seen[0] < TRIALS and len(set(seen)) >= 2, seen
    expect(metric(page, "failed")).to_have_text("0")
    expect(page.locator(".st-key-tune_stop")).to_have_count(0)
    expect(page.get_by_test_id("stException")).to_have_count(0)
    # (the picker's label keeps its first trial count: Streamlit's selectbox redraws a changed label of an
    # unchanged option only every other rerun) a new session reads the finished study whole
    page.reload()
    expect(page.get_by_role("combobox", name="Study")).to_have_value(re.compile(rf"^{STUDY} · {TRIALS} trials"),
                                                                     timeout=60_000)
    expect(page.get_by_text(f"Study {STUDY} · finished")).to_be_visible(timeout=30_000)
    wait_until(lambda: shown() == TRIALS, 30, f"the reloaded page counting {TRIALS} finished trials")
    assert not servers.tracebacks()

    # nothing lost: one worker ran every trial, each in its own complete run directory
    final = study()
    trials = final.get_trials(deepcopy=False)
    assert len(trials) == TRIALS and all(t.state in FINISHED for t in trials)
    assert {t.user_attrs["worker_pid"] for t in trials} == {worker}
    wait_until(lambda: not process_alive(worker), 30, "the worker exiting")
    for t in trials:
        trial_run = run_at(t.user_attrs["run_dir"])
        assert trial_run.status()["state"] in ("completed", "cancelled") and trial_run.eval()["test_accuracy"] > 0
        assert [r["epoch"] for r in trial_run.epochs()] == list(range(1, len(trial_run.epochs()) + 1))
        load_model(trial_run.path)
    assert not [r for r in list_runs(saves) if r["state"] in LIVE_STATES]


# -- a fresh server's concurrent first sessions -----------------------------------------------------
RACE = """
import sys, threading, time
import plotly.graph_objects  # noqa: F401         (loaded by the first session; pandas is not yet)

EPOCHS = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "train_accuracy": 0.5, "val_accuracy": 0.5}
          for e in range(1, 4)]
errors = []

def first_page():                                 # one session's page: its imports bring pandas in
    import app  # noqa: F401

def second_page():                                # another's at the same moment, with a page's imports in order
    try:
        while "pandas" not in sys.modules:         # ...the moment pandas is half-imported
            time.sleep(0.0005)
        from lstm_core.plots import curves_figure
        import app  # noqa: F401
        curves_figure(EPOCHS)
    except Exception as exc:
        errors.append(repr(exc))

pages = [threading.Thread(target=second_page), threading.Thread(target=first_page)]
for page in pages: page.start()
for page in pages: page.join(timeout=60)
print(errors)
"""


def test_a_figure_drawn_while_another_session_imports_pandas_does_not_fail():
    """After a restart, every open tab reconnects at once: one session's page imports pandas while another
    draws its curves. Plotly took the half-imported pandas from sys.modules and the Train page failed
    ("partially initialized module 'pandas' has no attribute 'Series'"). The view package imports pandas
    whole before any page draws, and lstm_core.plots draws nothing on import (a page imports it first)."""
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", RACE], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"
