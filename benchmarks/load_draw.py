"""Load benchmark of the Draw page: N sessions drawing and predicting at once while a real training
run goes on, reporting the latency of each prediction.

    .venv/bin/python -m benchmarks.load_draw --sessions 20 --seconds 60     # or: make load
    .venv/bin/python -m benchmarks.load_draw --client browser --sessions 4   # real Chromium tabs

In a throwaway saves root it trains a small real model (seconds) for the Draw page to use, starts
`streamlit run` on a free port and a background training run (the `default` model on the full data,
far more epochs than the load lasts; stopped at the end), then opens N sessions. Each loads the app's
root, then the Draw page, and until the time is up draws a stroke, waits for the prediction, pauses
(a person drawing the next stroke), draws again; every few strokes it presses Clear. Each stroke of a
drawing adds ink where there was none, so a prediction counts when the ten probabilities change.

Two kinds of session:
  ws (default)  a websocket client speaking Streamlit's protocol, as the browser does: it sends the
                canvas's value (its PNG, drawn here with PIL) as the canvas component would, and times
                the round trip to the probability chart's message. 20 real tabs would measure
                Chromium, not the app: headless Chromium spends ~0.8 s of CPU per stroke redrawing the
                page's four plotly charts (the server ~45 ms), and this machine has 2 cores. The
                browser's own part is not in this figure: the canvas component sends a stroke 200 ms
                after the mouse-up (its debounce), and the page then draws the charts.
  browser       N contexts in one Chromium, strokes drawn with the mouse; the latency runs from the
                mouseup event to the first animation frame showing the new chart, in the page.

Errors: a prediction missing after --timeout, an exception in a session, an st.exception on the page,
an uncaught JavaScript error (browser). The exit code is 0 only without errors; p95 is compared to the
300 ms goal in the output but does not set the exit code. The report goes to
SAVES/bench/load-<time>.json (SAVES: $LSTM_SAVES or the repository's saves/).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from .harness import CHROMIUM, CHROMIUM_ARGS, stop_live_runs, streamlit_server

GOAL_P95_MS = 300.0
CANVAS_DEBOUNCE_MS = 200      # streamlit-drawable-canvas sends a drawing this long after the last mouse-up
CANVAS = 280                  # px, pages/draw.py's CANVAS_SIZE
PROMPT = "Draw a digit in the black box"
# beyond conftest's flags: no throttling of pages Chromium may consider in the background
BROWSER_ARGS = CHROMIUM_ARGS + ["--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                                "--disable-backgrounding-occluded-windows"]


# -- setup: a model to draw with, a training run to compete with -----------------------------------
def train_model(root: Path, mnist=None) -> str:
    """A small real model in `root` (a few seconds on 2,000 samples), like the tests' trained_saves."""
    from lstm_core.config import NO_AUGMENTATION, preset
    from lstm_core.data import load_mnist
    from lstm_core.recorder import RunRecorder
    from lstm_core.runs import create_run
    from lstm_core.train import fit

    config = preset("default").replace(hidden_size=48, epochs=2, limit_train=2000, val_size=1000, lr=1e-2,
                                       scheduler="none", **NO_AUGMENTATION)
    run = create_run(config, root)
    fit(run.config(), [RunRecorder(run)], data=mnist if mnist is not None else load_mnist())
    return run.id


def background_config(limit: int = 0):
    """The `default` model on `limit` training samples (0: all), for far longer than any load test."""
    from lstm_core.config import preset
    return preset("default").replace(epochs=200, patience=0, limit_train=limit, log_every=10)


def training_progress(run) -> dict:
    """The run's last batch record (its global step and its own samples/s), {} before the first."""
    batches = [r for r in run.metrics() if r.get("event") == "batch"]
    return batches[-1] if batches else {}


def wait_training(run, timeout: float = 180.0) -> None:
    """Until the background run has logged two progress records (it is past loading the data)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([r for r in run.metrics() if r.get("event") == "batch"]) >= 2:
            return
        status = run.status()
        if status.get("state") not in ("queued", "running"):
            raise RuntimeError(f"the background training run ended {status.get('state')}: {status.get('error')}; "
                               f"see {run.path / 'train.log'}")
        time.sleep(0.2)
    raise RuntimeError(f"the background training run logged no progress within {timeout:.0f} s")


@contextlib.contextmanager
def server_environment(changes: dict[str, str]):
    """os.environ with `changes` for the block (the server's process takes its environment from it)."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def load_environment(root: Path, mnist=None, train_limit: int = 0, server_env: dict | None = None, log=print):
    """A trained model in the empty saves root `root`, a server reading it (with `server_env` added to
    its environment) and a background training run in it; yields (url, run). The run is stopped on the
    way out, and waited for."""
    from lstm_core.jobs import launch_training

    started = time.monotonic()
    model_id = train_model(root, mnist)
    log(f"trained the model to draw with ({model_id}) in {time.monotonic() - started:.0f} s")
    with contextlib.ExitStack() as stack:
        with server_environment(server_env or {}):
            url = stack.enter_context(streamlit_server(root, root.parent))
        run = launch_training(background_config(train_limit), root)
        try:
            wait_training(run)
            log(f"server at {url}; background training run {run.id} is training")
            yield url, run
        finally:
            stop_live_runs(root)             # before the saves root goes away under it


# -- CPU time per process kind, from /proc ---------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def our_processes() -> list[tuple[str, float, float]]:
    """(kind, CPU seconds so far, resident MB) of this process and each of its descendants; kinds: the
    streamlit server, the training process, Chromium, Playwright's driver, this script."""
    procs = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK,
                                  int(fields[21]) * PAGE / 2**20, cmdline)
    me, out = os.getpid(), []
    for pid, (ppid, cpu, rss, cmdline) in procs.items():
        p, depth = pid, 0
        while p in procs and p != me and depth < 64:
            p, depth = procs[p][0], depth + 1
        if p != me:
            continue                     # not ours
        kind = ("script" if pid == me else "streamlit server" if "streamlit" in cmdline
                else "training" if "lstm_core train" in cmdline
                else "chromium" if "chrom" in cmdline else "playwright driver" if "node" in cmdline else "other")
        out.append((kind, cpu, rss))
    return out


def cpu_by_kind() -> dict[str, float]:
    """CPU seconds used so far by our processes, by kind, and by every other process on the machine."""
    out: dict[str, float] = {}
    for kind, cpu, _ in our_processes():
        out[kind] = out.get(kind, 0.0) + cpu
    ours = sum(out.values())
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        out["other processes"] = (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICK - ours
    except (OSError, ValueError, IndexError):
        pass
    return out


def server_rss_mb() -> float:
    return sum(rss for kind, _, rss in our_processes() if kind == "streamlit server")


# -- sessions ------------------------------------------------------------------------------------
class Session:
    def __init__(self, index: int):
        self.index = index
        self.latencies: list[float] = []     # ms: see the module docstring
        self.client: list[float] = []        # ms, as this script saw it (browser: from its mouse.up() call)
        self.clears: list[float] = []        # ms, Clear pressed to the empty canvas
        self.redrawn = 0                     # browser: first strokes drawn again (the canvas was not ready)
        self.errors: list[dict] = []
        self.console_errors: list[str] = []
        self.ready = False
        self.trace: list[str] = []           # with --trace: recent actions and messages
        self.t0 = time.perf_counter()

    def log(self, *what) -> None:
        self.trace.append(f"{(time.perf_counter() - self.t0) * 1000:8.0f} " + " ".join(map(str, what)))
        del self.trace[:-60]

    def error(self, kind: str, message: str) -> None:
        self.errors.append({"session": self.index, "kind": kind, "message": message[:500], "time": time.time()})


def stroke_points(rng: random.Random, band: int, bands: int) -> list[tuple[float, float]]:
    """A zigzag across the canvas inside horizontal band `band` of `bands`: each stroke of a drawing
    adds ink where the others have none, so every stroke changes the model input."""
    top, height = 0.12 + 0.76 * band / bands, 0.76 / bands
    xs = sorted(rng.uniform(0.12, 0.88) for _ in range(rng.randint(2, 4)))
    return [(x, top + rng.uniform(0.15, 0.85) * height) for x in xs]


class NoPrediction(Exception):
    """A stroke that got no new prediction in time, or got an error instead."""


async def run_session(actor, session: Session, start: asyncio.Event, stop_at: list[float], opts) -> None:
    """Open the Draw page, wait for the start, then draw, predict and pause until the time is up."""
    rng = random.Random(opts.seed * 1000 + session.index)
    try:
        await actor.open()
    except Exception as exc:  # noqa: BLE001 - a session that cannot open is an error, the others go on
        session.error("open", f"{type(exc).__name__}: {exc}")
        return
    session.ready = True
    try:
        await start.wait()
        await asyncio.sleep(rng.uniform(0, opts.pause or 0.5))     # not all in the same instant
        strokes, failures, fresh = 0, 0, True        # fresh: a new canvas, the drawing starts on it
        while time.monotonic() < stop_at[0] and failures < 3:
            band = strokes % opts.strokes_per_drawing
            try:
                if band == 0 and not fresh:
                    started = time.perf_counter()
                    session.log("Clear")
                    await actor.clear()
                    session.clears.append((time.perf_counter() - started) * 1000)
                fresh = False
                session.log("stroke", strokes, "band", band)
                latency, client = await actor.stroke(stroke_points(rng, band, opts.strokes_per_drawing), band)
            except Exception as exc:  # noqa: BLE001 - timeouts above all
                kind = "exception" if "st.exception" in str(exc) else "prediction"
                session.error(kind, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                                    f"(stroke {band + 1} of a drawing)")
                if opts.trace:
                    print(f"session {session.index} failed:\n  " + "\n  ".join(session.trace), flush=True)
                await actor.failed(len(session.errors))
                failures += 1
                strokes = 0                  # a fresh drawing after a failure, on a cleared canvas
                continue
            failures = 0
            session.log("prediction", round(latency))
            session.latencies.append(latency)
            session.client.append(client)
            strokes += 1
            if opts.pause:
                await asyncio.sleep(opts.pause * rng.uniform(0.5, 1.5))
        if failures >= 3:
            session.error("gave up", "three failures in a row")
        await actor.finish()
    except Exception as exc:  # noqa: BLE001
        session.error("session", f"{type(exc).__name__}: {exc}")


# -- the browser client ------------------------------------------------------------------------
# the mouseup time in the page's clock, before the canvas's own handlers run (capture phase)
MARK_MOUSEUP = "window.addEventListener('mouseup', () => { window.__loadUp = performance.now(); }, true);"
BARS_JS = """() => { const e = [...document.querySelectorAll('.js-plotly-plot')]
    .find(e => e.data && e.data[0] && e.data[0].type === 'bar');
    return e ? JSON.stringify(Array.from(e.data[0].y)) : null; }"""
# polled every animation frame: the ms since mouseup once the probability chart holds values other
# than `prev`, or the error on the page
NEW_PREDICTION_JS = """(prev) => {
    if (document.querySelector('[data-testid="stException"]')) return {error: 'st.exception on the page'};
    const e = [...document.querySelectorAll('.js-plotly-plot')]
        .find(e => e.data && e.data[0] && e.data[0].type === 'bar');
    if (!e || e.data[0].y.length !== 10) return false;
    const y = JSON.stringify(Array.from(e.data[0].y));
    if (y === prev) return false;
    return {ms: performance.now() - window.__loadUp};
}"""
# any white ink on the drawing (fabric's lower canvas, beside the upper one that takes the mouse)
HAS_INK_JS = """e => { const c = e.parentElement.querySelector('canvas.lower-canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 16) if (d[i] > 128) return true;
    return false; }"""
CLEARED_JS = """() => !document.querySelector('[data-testid="stException"]') &&
    ![...document.querySelectorAll('.js-plotly-plot')].some(e => e.data && e.data[0] && e.data[0].type === 'bar')"""


class BrowserActor:
    """One Playwright context in the shared Chromium, drawing with the mouse."""

    def __init__(self, browser, url: str, session: Session, opts):
        self.browser, self.url, self.session, self.opts = browser, url, session, opts
        self.timeout_ms = opts.timeout * 1000

    async def open(self) -> None:
        session, timeout_ms = self.session, self.opts.load_timeout * 1000
        self.context = await self.browser.new_context(viewport={"width": 1400, "height": 1000})
        await self.context.add_init_script(MARK_MOUSEUP)
        page = self.page = await self.context.new_page()
        page.on("pageerror", lambda exc: session.error("javascript", str(exc)))
        page.on("console", lambda msg: msg.type == "error" and session.console_errors.append(msg.text[:300]))
        if self.opts.trace:
            def on_websocket(ws):
                ws.on("framesent", lambda f: session.log("sent", len(f)))
                ws.on("framereceived", lambda f: session.log("received", len(f)))
            page.on("websocket", on_websocket)
        # the root first: on a fresh server a sub-URL's first request runs Streamlit's legacy pages mode
        await page.goto(self.url, timeout=timeout_ms)
        await page.get_by_role("heading", name="LSTM Studio").wait_for(timeout=timeout_ms)
        await page.get_by_role("link", name="Draw", exact=True).click(timeout=timeout_ms)
        await page.get_by_role("heading", name="Draw", exact=True).wait_for(timeout=timeout_ms)
        await page.locator("canvas.upper-canvas").wait_for(timeout=timeout_ms)
        await page.get_by_text(PROMPT).wait_for(timeout=timeout_ms)

    async def draw(self, points: list[tuple[float, float]]) -> float:
        """One mouse stroke through `points` (fractions of the canvas); the time of the mouse-up call."""
        page = self.page
        box = await page.locator("canvas.upper-canvas").bounding_box()
        at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
        await page.mouse.move(*at[0])
        await page.mouse.down()
        for x, y in at[1:]:
            await page.mouse.move(x, y, steps=8)
        started = time.perf_counter()
        await page.mouse.up()
        return started

    async def stroke(self, points, band: int) -> tuple[float, float]:
        page = self.page
        before = await page.evaluate(BARS_JS)
        clicked = await self.draw(points)
        if band == 0:
            # a new canvas takes its drawing tool a moment after it appears (the component loads its
            # initial drawing first); a stroke before that leaves no ink: draw it again
            waited = time.perf_counter()
            while not await page.locator("canvas.upper-canvas").evaluate(HAS_INK_JS):
                if time.perf_counter() - waited > self.opts.timeout:
                    raise NoPrediction(f"the canvas took no stroke within {self.opts.timeout:.0f} s")
                self.session.redrawn += 1
                await asyncio.sleep(0.1)
                clicked = await self.draw(points)
        answer = await (await page.wait_for_function(NEW_PREDICTION_JS, arg=before, polling="raf",
                                                     timeout=self.timeout_ms)).json_value()
        if "error" in answer:
            raise NoPrediction(answer["error"])
        return answer["ms"], (time.perf_counter() - clicked) * 1000

    async def clear(self) -> None:
        """Press Clear and wait for a new canvas (its key changed) and the prompt instead of the prediction."""
        page, timeout_ms = self.page, self.timeout_ms
        await page.locator("canvas.upper-canvas").evaluate("e => { e.dataset.loadOld = '1'; }")
        await page.get_by_role("button", name="Clear").click(timeout=timeout_ms)
        await page.locator("canvas.upper-canvas:not([data-load-old])").wait_for(timeout=timeout_ms)
        await page.wait_for_function(CLEARED_JS, timeout=timeout_ms)
        await page.get_by_text(PROMPT).wait_for(timeout=timeout_ms)

    async def failed(self, n: int) -> None:
        if self.opts.screenshots:
            self.opts.screenshots.mkdir(parents=True, exist_ok=True)
            await self.page.screenshot(path=self.opts.screenshots / f"s{self.session.index}-{n}.png", full_page=True)

    async def finish(self) -> None:
        if await self.page.get_by_test_id("stException").count():
            self.session.error("exception", "st.exception on the page at the end")
        # the context stays open until every session is done: its CPU time is counted then


# -- the websocket client ----------------------------------------------------------------------
class WsActor:
    """A websocket client speaking Streamlit's protocol like the browser: rerun requests carrying
    widget states (the canvas's value is {"drawing": {"raw": fabric JSON, "data": PNG data URL}}),
    answered by delta messages until script_finished."""

    def __init__(self, url: str, session: Session, opts):
        self.url, self.session, self.opts = url, session, opts
        self.ws_url = url.replace("http://", "ws://", 1) + "/_stcore/stream"
        self.draw_hash = self.canvas_id = self.clear_id = self.fragment_id = None
        self.image = self.objects = self.probabilities = None

    async def open(self) -> None:
        from websockets.asyncio.client import connect
        self.ws = await connect(self.ws_url, origin=self.url, subprotocols=["streamlit"], max_size=None,
                                proxy=None, open_timeout=self.opts.load_timeout)
        timeout = self.opts.load_timeout
        await self.rerun(timeout=timeout)                                     # the app's root, as a browser
        if self.draw_hash is None:
            raise RuntimeError("the app lists no Draw page")
        await self.rerun(page=True, timeout=timeout)                          # then the Draw page
        if not (self.canvas_id and self.clear_id and self.fragment_id):
            raise RuntimeError("the Draw page showed no canvas (or no Clear button, or no fragment)")
        self.new_drawing()

    def new_drawing(self) -> None:
        from PIL import Image
        self.image = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 255))
        self.objects = []
        self.probabilities = None

    def canvas_state(self):
        from streamlit.proto.WidgetStates_pb2 import WidgetState
        buffer = io.BytesIO()
        self.image.save(buffer, "PNG")
        data = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        raw = {"version": "7.4.0", "objects": self.objects, "background": "#000000"}
        return WidgetState(id=self.canvas_id, json_value=json.dumps({"drawing": {"raw": raw, "data": data}}))

    async def rerun(self, widgets=(), page: bool = False, fragment: bool = False,
                    timeout: float | None = None) -> dict:
        """Send a rerun request; read until its script_finished. Returns when the probability chart came
        (perf_counter) and its values, if it did."""
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ClientState_pb2 import ClientState, ContextInfo
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
        from streamlit.proto.WidgetStates_pb2 import WidgetStates

        state = ClientState(widget_states=WidgetStates(widgets=list(widgets)),
                            context_info=ContextInfo(timezone="UTC", timezone_offset=0, locale="en-US",
                                                     url=self.url + "/", is_embedded=False, color_scheme="light"))
        if page or fragment:
            state.page_script_hash = self.draw_hash
        if fragment:
            state.fragment_id = self.fragment_id
        sent = time.perf_counter()
        await self.ws.send(BackMsg(rerun_script=state).SerializeToString())
        deadline = sent + (timeout or self.opts.timeout)
        out: dict = {}
        while True:
            try:
                data = await asyncio.wait_for(self.ws.recv(), max(deadline - time.perf_counter(), 0))
            except TimeoutError:
                raise TimeoutError(f"the run did not finish within {timeout or self.opts.timeout:g} s") from None
            arrived = time.perf_counter()
            msg = ForwardMsg()
            msg.ParseFromString(data)
            kind = msg.WhichOneof("type")
            if self.opts.trace:
                self.session.log("received", len(data), kind)
            if kind in ("new_session", "navigation"):       # st.navigation's pages ("draw": pages/ mode's)
                for app_page in getattr(msg, kind).app_pages:
                    if app_page.page_name == "Draw":
                        self.draw_hash = app_page.page_script_hash
            elif kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
                element = msg.delta.new_element
                what = element.WhichOneof("type")
                if what == "bidi_component" and "draw_canvas_" in element.bidi_component.id:
                    self.canvas_id, self.fragment_id = element.bidi_component.id, msg.delta.fragment_id
                elif what == "button" and element.button.label == "Clear":
                    self.clear_id = element.button.id
                elif what == "plotly_chart" and element.plotly_chart.id.endswith("-draw_probs"):
                    out["probs_at"] = arrived
                    out["probs"] = json.loads(element.plotly_chart.spec)["data"][0]["y"]
                elif what == "exception":
                    out.setdefault("exception", f"{element.exception.type}: {element.exception.message}")
            elif kind == "script_finished":
                if msg.script_finished == ForwardMsg.FINISHED_WITH_COMPILE_ERROR:
                    raise NoPrediction("the page failed to compile")
                if msg.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                    out["sent"], out["finished"] = sent, arrived
                    if "exception" in out:
                        raise NoPrediction(f"st.exception on the page: {out['exception']}")
                    return out

    async def stroke(self, points, band: int) -> tuple[float, float]:
        from PIL import ImageDraw
        at = [(round(fx * CANVAS, 2), round(fy * CANVAS, 2)) for fx, fy in points]
        pen = ImageDraw.Draw(self.image)
        pen.line(at, fill=(255, 255, 255, 255), width=20, joint="curve")
        for x, y in (at[0], at[-1]):                                  # round caps, as the canvas draws
            pen.ellipse((x - 10, y - 10, x + 10, y + 10), fill=(255, 255, 255, 255))
        self.objects.append({"type": "Path", "version": "7.4.0", "stroke": "#ffffff", "strokeWidth": 20,
                             "strokeLineCap": "round", "strokeLineJoin": "round", "fill": None,
                             "path": [["M", *at[0]]] + [["L", *p] for p in at[1:]]})
        answer = await self.rerun([self.canvas_state()], fragment=True)
        if "probs" not in answer:
            raise NoPrediction("the fragment rerun showed no probability chart")
        if len(answer["probs"]) != 10 or answer["probs"] == self.probabilities:
            raise NoPrediction("the probability chart did not change")
        self.probabilities = answer["probs"]
        latency = (answer["probs_at"] - answer["sent"]) * 1000
        return latency, (answer["finished"] - answer["sent"]) * 1000

    async def clear(self) -> None:
        from streamlit.proto.WidgetStates_pb2 import WidgetState
        old = self.canvas_id
        await self.rerun([self.canvas_state(), WidgetState(id=self.clear_id, trigger_value=True)], fragment=True)
        if self.canvas_id == old:
            raise NoPrediction("Clear brought no new canvas")
        self.new_drawing()

    async def failed(self, n: int) -> None:
        """Start over on a new connection: the failed run's late messages must not answer the next request."""
        await self.ws.close()
        await self.open()

    async def finish(self) -> None:
        await self.ws.close()


# -- driving the sessions ------------------------------------------------------------------------
async def drive(url: str, opts, sessions: list[Session], on_start, on_end) -> dict:
    """Open every session, then let them all draw for opts.seconds; on_start and on_end are called at
    the window's ends (on_end before Chromium closes, to count its CPU time)."""
    async with contextlib.AsyncExitStack() as stack:
        if opts.client == "browser":
            from playwright.async_api import async_playwright
            playwright = await stack.enter_async_context(async_playwright())
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            stack.push_async_callback(browser.close)
            actors = [BrowserActor(browser, url, s, opts) for s in sessions]
        else:
            actors = [WsActor(url, s, opts) for s in sessions]
        start, stop_at = asyncio.Event(), [float("inf")]
        gate = asyncio.Semaphore(opts.open_at_once)     # page loads a few at a time, not 20 at once on 2 cores

        async def one(actor, session: Session):
            async with gate:
                task = asyncio.create_task(run_session(actor, session, start, stop_at, opts))
                while not (session.ready or session.errors or task.done()):
                    await asyncio.sleep(0.05)
            await task

        opening = time.monotonic()
        tasks = [asyncio.create_task(one(a, s)) for a, s in zip(actors, sessions)]
        while not all(s.ready or s.errors for s in sessions):
            await asyncio.sleep(0.2)
        opened = time.monotonic() - opening
        print(f"{sum(s.ready for s in sessions)}/{len(sessions)} {opts.client} sessions on the Draw page after "
              f"{opened:.0f} s; drawing for {opts.seconds:.0f} s", flush=True)
        window = on_start()
        began = time.monotonic()
        stop_at[0] = began + opts.seconds
        start.set()
        await asyncio.gather(*tasks)
        window.update(seconds=time.monotonic() - began, open_seconds=opened)
        on_end()
    return window


def run_clients(url: str, run, opts) -> dict:
    """The sessions against a server at `url` while training run `run` goes on; the report."""
    sessions = [Session(i) for i in range(opts.sessions)]
    window: dict = {}

    def on_start() -> dict:
        window.update(train_before=training_progress(run), cpu_before=cpu_by_kind(), loadavg=os.getloadavg(),
                      rss_before=server_rss_mb())
        return window

    def on_end() -> None:
        window.update(train_after=training_progress(run), cpu_after=cpu_by_kind(), rss_after=server_rss_mb(),
                      train_state=run.status().get("state"))

    result: dict = {}

    def in_thread():                     # asyncio in a thread of its own: safe beside pytest-playwright's sync API
        try:
            result["window"] = asyncio.run(drive(url, opts, sessions, on_start, on_end))
        except BaseException as exc:  # noqa: BLE001 - raised again below
            result["exception"] = exc
    worker = threading.Thread(target=in_thread, name="load-driver")
    worker.start()
    worker.join()
    if "exception" in result:
        raise result["exception"]
    return report(opts, sessions, window, run.config().batch_size)


def run_load(opts, root: Path | None = None, mnist=None, log=print) -> dict:
    """Everything in the module docstring; `root` is an empty saves root (a temporary one if None)."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lstm-load-"))) / "saves"
            root.mkdir()
        server_env = dict(item.split("=", 1) for item in opts.server_env)
        url, run = stack.enter_context(load_environment(root, mnist, opts.train_limit, server_env, log))
        return run_clients(url, run, opts)


# -- the report --------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values, default=None),
            "mean": statistics.fmean(values) if values else None}


def report(opts, sessions: list[Session], window: dict, batch_size: int) -> dict:
    seconds = window["seconds"]
    before, after = window["train_before"], window["train_after"]
    trained = (after.get("step", 0) - before.get("step", 0)) * batch_size
    cpu = {k: v - window["cpu_before"].get(k, 0.0) for k, v in window["cpu_after"].items()}
    latencies = [ms for s in sessions for ms in s.latencies]
    errors = [e for s in sessions for e in s.errors]
    stats = summary(latencies)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
        "server_env": list(opts.server_env),
        "cpus": os.cpu_count(), "client": opts.client, "sessions": opts.sessions, "seconds": seconds,
        "pause_s": opts.pause, "strokes_per_drawing": opts.strokes_per_drawing,
        "sessions_opened": sum(s.ready for s in sessions), "open_seconds": window["open_seconds"],
        "predictions": len(latencies), "predictions_per_s": len(latencies) / seconds,
        "predictions_per_session": [len(s.latencies) for s in sessions],
        "latency_ms": stats,
        "latency_is": ("mouseup to the new chart drawn, in the page" if opts.client == "browser" else
                       "rerun request sent to the probability chart received (the server's part; the "
                       f"browser adds the canvas's {CANVAS_DEBOUNCE_MS} ms debounce and its drawing)"),
        "client_latency_ms": summary([ms for s in sessions for ms in s.client]),
        "client_latency_is": ("this script's mouse.up() call to the answer" if opts.client == "browser" else
                              "rerun request sent to script_finished (the whole fragment run)"),
        "clear_ms": summary([ms for s in sessions for ms in s.clears]),
        "strokes_redrawn": sum(s.redrawn for s in sessions),
        "goal_p95_ms": GOAL_P95_MS, "goal_met": stats["p95"] is not None and stats["p95"] <= GOAL_P95_MS,
        "errors": len(errors), "error_list": errors[:100],
        "console_errors": [m for s in sessions for m in s.console_errors][:50],
        "training": {"state_at_end": window["train_state"], "samples_during_load": trained,
                     "samples_per_s_during_load": trained / seconds,
                     "samples_per_s_before_load": before.get("samples_per_s"), "progressed": trained > 0},
        "server_rss_mb": {"start": window["rss_before"], "end": window["rss_after"]},
        "loadavg_at_start": window["loadavg"], "cpu_seconds": cpu,
        "cpu_share": {k: v / (seconds * (os.cpu_count() or 1)) for k, v in cpu.items()},
    }


def print_report(r: dict) -> None:
    lat, cli = r["latency_ms"], r["client_latency_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    print(f"{r['sessions']} {r['client']} sessions ({r['sessions_opened']} opened in {r['open_seconds']:.0f} s), "
          f"{r['seconds']:.0f} s, pause {r['pause_s']} s between strokes")
    per = r["predictions_per_session"]
    print(f"predictions: {r['predictions']} ({r['predictions_per_s']:.1f}/s; per session {min(per, default=0)}"
          f"-{max(per, default=0)})")
    print(f"latency ({r['latency_is']}): p50 {fmt(lat['p50'])} ms, p95 {fmt(lat['p95'])} ms, "
          f"p99 {fmt(lat['p99'])} ms, max {fmt(lat['max'])} ms "
          f"(goal p95 <= {r['goal_p95_ms']:.0f} ms: {'met' if r['goal_met'] else 'MISSED'})")
    print(f"  {r['client_latency_is']}: p50 {fmt(cli['p50'])} ms, p95 {fmt(cli['p95'])} ms; "
          f"Clear: p50 {fmt(r['clear_ms']['p50'])} ms"
          + (f"; first strokes drawn again (canvas not ready): {r['strokes_redrawn']}" if r["client"] == "browser"
             else ""))
    t = r["training"]
    before = t["samples_per_s_before_load"]
    print(f"training meanwhile: {t['samples_during_load']:,} samples, {t['samples_per_s_during_load']:,.0f} "
          f"samples/s (before the load: {'-' if before is None else f'{before:,.0f}'}), state {t['state_at_end']}")
    print("CPU share of the machine: " + ", ".join(f"{k} {v:.0%}" for k, v in
                                                   sorted(r["cpu_share"].items(), key=lambda kv: -kv[1])))
    print(f"server memory: {r['server_rss_mb']['start']:.0f} MB at the start, {r['server_rss_mb']['end']:.0f} MB "
          f"at the end")
    print(f"errors: {r['errors']}")
    for e in r["error_list"][:10]:
        print(f"  session {e['session']}: {e['kind']}: {e['message']}")
    if r["console_errors"]:
        print(f"console errors (not counted): {len(r['console_errors'])}, e.g. {r['console_errors'][0]}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_draw", description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=20, help="concurrent sessions (default 20)")
    p.add_argument("--seconds", type=float, default=60, help="how long they all draw (default 60)")
    p.add_argument("--client", choices=["ws", "browser"], default="ws",
                   help="websocket clients (default) or Chromium tabs; see above")
    p.add_argument("--pause", type=float, default=1.0,
                   help="mean seconds between a prediction and the next stroke, a person drawing (default 1)")
    p.add_argument("--strokes-per-drawing", type=int, default=4, help="strokes before pressing Clear")
    p.add_argument("--timeout", type=float, default=30, help="seconds a prediction may take before it is an error")
    p.add_argument("--load-timeout", type=float, default=180, help="seconds to open the Draw page")
    p.add_argument("--open-at-once", type=int, default=4, help="sessions loading the page at the same time")
    p.add_argument("--train-limit", type=int, default=0,
                   help="training samples of the background run (default 0: all 55,000)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the server only, e.g. STREAMLIT_RUNNER_POST_SCRIPT_GC=false "
                        "or OMP_NUM_THREADS=1 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", action="store_true", help="print a session's recent events when it fails")
    p.add_argument("--screenshots", type=Path, default=None, help="browser: a screenshot of each failure here")
    p.add_argument("--out", type=Path, default=None, help="the JSON report (default SAVES/bench/load-<time>.json)")
    return p


def main(argv=None) -> int:
    opts = parser().parse_args(argv)
    result = run_load(opts)
    print_report(result)
    from lstm_core.runs import atomic_write_json, saves_root
    out = opts.out or saves_root() / "bench" / f"load-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"written to {out}")
    return 0 if result["errors"] == 0 and result["predictions"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
