"""A screenshot of each page of the real app, for the README: OUT/<page>.png for home, train, runs, evaluate,
draw and tuning.

    .venv/bin/python -m benchmarks.screenshots                   # or: make screenshots
    .venv/bin/python -m benchmarks.screenshots --out /tmp/shots --keep
    .venv/bin/python -m benchmarks.screenshots --out /tmp/narrow --saves KEPT/saves --width 900   # a narrow window

In a throwaway saves root it trains three small real models (a few thousand MNIST samples, a few epochs)
and runs a small Optuna study, then starts `streamlit run` over it and visits each page in Chromium,
doing what makes its picture say something: a run picked on Train and Evaluate, runs selected for their
curves on Runs, a digit drawn on Draw. A picture is taken once the page is drawn (no script running,
no spinner, every plotly chart drawn), cut at a height that keeps it readable in a README, and saved
as a 256-colour PNG. A few minutes on two cores.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .harness import CANVAS, CHROMIUM, CHROMIUM_ARGS, REPO, drag_on_canvas, streamlit_server

WIDTH, HEIGHT = 1400, 900     # a laptop-sized window: the README shows the layout people will see
TIMEOUT = 120_000             # ms; two shared cores draw a page of plotly charts slowly
STUDY = "lstm-search"

# (the name the pages below pick a run by, its preset and changes): Runs compares all three, the three
# cells, curves and gradients over time side by side; Train, Evaluate and Draw show the first
RUNS = (
    ("lstm", dict(preset="default")),
    ("gru", dict(preset="gru")),
    ("rnn", dict(preset="rnn")),
)
# a few thousand samples, a few epochs: seconds per run on a CPU, yet curves with a shape and a
# confusion matrix with a diagonal
SMALL = dict(limit_train=6000, val_size=1000, epochs=4, patience=0, log_every=5)
# trials of a second or two, over three parameters, so that every study plot has something to draw
STUDY_BASE = dict(hidden_size=32, epochs=3, batch_size=100, limit_train=2000, val_size=500, log_every=5,
                  aug_rotate=0.0, aug_translate=0.0, aug_scale=0.0, aug_shear=0.0)
STUDY_SPACE = {"hidden_size": {"type": "int", "low": 16, "high": 64},
               "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
               "optimizer": {"type": "categorical", "choices": ["adam", "adamw", "sgd"]}}
STUDY_TRIALS = 10

# the most of each page worth showing, in px; below Tuning's plots comes more of the same (its trial table,
# one trial's results as Evaluate shows them)
MAX_HEIGHT = {"home": 1400, "train": 1800, "runs": 1800, "evaluate": 2100, "draw": 1700, "tuning": 2150}


def check_browser() -> None:
    """Fail before any training when no browser can be driven, saying what to install."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        raise SystemExit(f"error: no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) "
                         "or set CHROMIUM to a Chromium or Chrome binary")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise SystemExit("error: Playwright is not installed in this environment: pip install playwright "
                         "(its Python package only; the browser is the system's Chromium)") from None


# -- content: real runs and a real study ---------------------------------------------------------------
def make_content(root: Path, log=print) -> dict[str, str]:
    """Train RUNS and run the study into `root`; the run id of each RUNS name."""
    from lstm_core.config import preset
    from lstm_core.data import load_mnist
    from lstm_core.recorder import RunRecorder
    from lstm_core.runs import create_run
    from lstm_core.train import fit
    from lstm_core.tune import run_worker

    mnist = load_mnist()
    ids = {}
    for name, spec in RUNS:
        spec = dict(spec)
        config = preset(spec.pop("preset")).replace(**{**SMALL, **spec})
        started = time.perf_counter()
        run = create_run(config, root)
        history = fit(run.config(), [RunRecorder(run)], data=mnist)
        ids[name] = run.id
        log(f"  run {run.id} ({name}): test accuracy {history.test['accuracy']:.1%}, "
            f"{time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    base = preset("default").replace(**STUDY_BASE)
    # no pruner: every trial runs to the end, so the importances and the parallel coordinates have lines
    study = run_worker(STUDY, trials=STUDY_TRIALS, base=base, space=STUDY_SPACE, root=root, pruner="none", seed=0)
    states = [t.state.name for t in study.trials]
    log(f"  study {STUDY}: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned trials, "
        f"{time.perf_counter() - started:.0f} s")
    return ids


# -- driving the pages -----------------------------------------------------------------------------------
# every plotly chart on the page has its figure drawn (plotly's layout and its SVG are there)
CHARTS_DRAWN_JS = """() => {
    const charts = [...document.querySelectorAll('[data-testid="stPlotlyChart"]')];
    return charts.every(c => { const p = c.querySelector('.js-plotly-plot');
                               return p && p._fullLayout && p.querySelector('.main-svg'); });
}"""


def settled(page, charts: int = 0) -> None:
    """Wait until the page is drawn: no script run going (Streamlit's status widget), no spinner or
    placeholder skeleton, at least `charts` plotly charts and every one of them drawn, then a moment for
    plotly's transitions and the fonts."""
    from playwright.sync_api import expect

    for test_id in ("stStatusWidget", "stSpinner", "stSkeleton"):
        expect(page.get_by_test_id(test_id)).to_have_count(0, timeout=TIMEOUT)
    if charts:
        page.wait_for_function(f"() => document.querySelectorAll('[data-testid=\"stPlotlyChart\"]').length >= {charts}",
                               timeout=TIMEOUT)
    page.wait_for_function(CHARTS_DRAWN_JS, timeout=TIMEOUT)
    page.evaluate("() => document.fonts.ready")
    page.wait_for_timeout(1500)
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=TIMEOUT)
    if page.get_by_test_id("stException").count():
        raise AssertionError(f"the page shows an exception: {page.get_by_test_id('stException').first.inner_text()}")


def open_page(page, url: str, path: str, heading: str) -> None:
    from playwright.sync_api import expect

    page.set_viewport_size({"width": page.viewport_size["width"], "height": HEIGHT})
    page.goto(f"{url}/{path}")
    expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible(timeout=TIMEOUT)


def choose(page, label: str, option: str) -> None:
    """Pick the option of selectbox `label` whose text has `option` in it (a run id)."""
    from playwright.sync_api import expect

    box = page.get_by_role("combobox", name=label)
    box.click()
    page.get_by_role("option", name=re.compile(re.escape(option))).first.click()
    expect(box).to_have_value(re.compile(re.escape(option)), timeout=TIMEOUT)
    settled(page)


# Where to end a picture of at most `cap` px: the page's own height when it fits, else the lowest line above
# `cap` that cuts through no element (every element's bottom is a candidate; a chart, a table or a column of
# one is never cut in half). Streamlit scrolls its main section, not the document, so Playwright's
# full-page screenshot would show only the window: the window is made as tall as the picture instead.
CUT_JS = """cap => {
    const main = document.querySelector('[data-testid="stMain"]');
    if (main.scrollHeight <= cap) return main.scrollHeight;
    const top = main.getBoundingClientRect().top - main.scrollTop;
    const boxes = [...main.querySelectorAll('[data-testid="stElementContainer"]')]
        .filter(e => e.checkVisibility())                   // not the content of a closed expander
        .map(e => e.getBoundingClientRect()).filter(r => r.height > 0)
        .map(r => [r.top - top, r.bottom - top]);
    const clean = y => y <= cap && !boxes.some(([t, b]) => t < y && y < b);
    const cuts = boxes.map(([t, b]) => b).filter(clean);
    if (!cuts.length) return cap;
    const cut = Math.max(...cuts);
    // a margin under the last element, short of the next one's top edge
    return Math.min(cut + 24, ...boxes.map(([t, b]) => t).filter(t => t > cut));
}"""


def shoot(page, out: Path, name: str, charts: int = 0) -> Path:
    """OUT/<name>.png of the page, down to MAX_HEIGHT[name] at most, once it is drawn."""
    from PIL import Image

    width = page.viewport_size["width"]     # the window's, as take_all opened it
    page.mouse.move(width - 1, 1)         # no hover toolbars or tooltips in the picture
    page.evaluate("() => document.activeElement && document.activeElement.blur()")   # nor a focus ring
    settled(page, charts)
    height = max(HEIGHT, round(page.evaluate(CUT_JS, MAX_HEIGHT[name])))
    page.set_viewport_size({"width": width, "height": height})
    settled(page, charts)       # a taller window can relayout the charts (no scrollbar, a new width)
    png = page.screenshot(animations="disabled", caret="hide")
    page.set_viewport_size({"width": width, "height": HEIGHT})
    path = out / f"{name}.png"
    # a screenshot of an app has few colours: a palette of 256 without dithering keeps text and lines sharp
    # at a third of the size or less
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def home(page, url: str, ids: dict) -> None:
    from playwright.sync_api import expect

    open_page(page, url, "", "LSTM Studio")
    expect(page.get_by_test_id("stDataFrame")).to_be_visible(timeout=TIMEOUT)


def train(page, url: str, ids: dict) -> None:
    from playwright.sync_api import expect

    open_page(page, url, "train", "Train")
    settled(page)
    choose(page, "Run", ids["lstm"])
    expect(page.get_by_text("Test results")).to_be_visible(timeout=TIMEOUT)


def runs(page, url: str, ids: dict) -> None:
    """Every run selected in the table, for their curves on one chart."""
    from playwright.sync_api import expect

    open_page(page, url, "runs", "Runs")
    table = page.get_by_test_id("stDataFrame")
    expect(table).to_be_visible(timeout=TIMEOUT)
    settled(page)
    # the table is drawn on a canvas: its rows are clicked where they are drawn, in the row-marker column
    # (a checkbox per row in a multi-row selection), one header row and then one row per run
    box = table.bounding_box()
    row_height = 35
    for row in range(len(ids)):
        page.mouse.click(box["x"] + 18, box["y"] + row_height * (row + 1.5))
        settled(page)
    expect(page.get_by_role("button", name=f"Delete selected ({len(ids)})")).to_be_visible(timeout=TIMEOUT)


def evaluate(page, url: str, ids: dict) -> None:
    open_page(page, url, "evaluate", "Evaluate")
    settled(page)
    choose(page, "Run or trial", ids["lstm"])
    page.get_by_test_id("stImage").first.wait_for(timeout=TIMEOUT)


# a "3", as fractions of the canvas: two bowls drawn in one stroke
THREE = [(0.30, 0.22), (0.42, 0.15), (0.58, 0.15), (0.68, 0.24), (0.66, 0.36), (0.55, 0.46), (0.45, 0.48),
         (0.57, 0.50), (0.68, 0.60), (0.69, 0.72), (0.60, 0.82), (0.45, 0.85), (0.30, 0.79)]


def draw(page, url: str, ids: dict, log=print) -> None:
    """A digit drawn with the mouse, and what the first LSTM run reads in it."""
    from playwright.sync_api import expect

    open_page(page, url, "draw", "Draw")
    canvas = page.locator(CANVAS)
    expect(canvas).to_be_visible(timeout=TIMEOUT)
    settled(page)
    choose(page, "Model", ids["lstm"])
    expect(canvas).to_be_visible(timeout=TIMEOUT)
    drag_on_canvas(page, THREE, steps=8)
    prediction = page.get_by_test_id("stMetric").filter(has_text="Prediction").get_by_test_id("stMetricValue")
    expect(prediction).to_be_visible(timeout=TIMEOUT)
    log(f"  the model reads the drawn 3 as a {prediction.inner_text()}")   # a misreading is worth a look


def tuning(page, url: str, ids: dict, log=print) -> None:
    """The study with every plot drawn. A plot Optuna could not draw leaves a note in its place: once in a
    while a fresh server's first import for the importances fails, and the next page run draws it."""
    from playwright.sync_api import expect

    for attempt in range(2):
        open_page(page, url, "tuning", "Tuning")
        expect(page.get_by_role("combobox", name="Study")).to_have_value(re.compile(rf"^{STUDY} "), timeout=TIMEOUT)
        expect(page.get_by_text(f"Study {STUDY} · finished")).to_be_visible(timeout=TIMEOUT)
        settled(page, 6)                    # Optuna's six plots (plots.STUDY_PLOTS)
        notes = page.get_by_text("Not drawn yet").all_inner_texts()
        if not notes:
            return
        log(f"  the Tuning page did not draw a plot: {notes[0][:300]}")
    raise AssertionError(f"the Tuning page did not draw every plot: {notes}")


# (file name, how to get the page there, the plotly charts it must have drawn)
PAGES = (("home", home, 0), ("train", train, 3), ("runs", runs, 1), ("evaluate", evaluate, 2),
         ("draw", draw, 4), ("tuning", tuning, 6))


def take_all(url: str, ids: dict, out: Path, width: int = WIDTH, log=print) -> list[Path]:
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": HEIGHT}, device_scale_factor=1)
            page = context.new_page()
            # the root first: a fresh server serves a first request for a page's URL in Streamlit's legacy
            # pages-directory mode (app.pagekit.leave_legacy_navigation)
            home(page, url, ids)
            settled(page)
            for name, visit, charts in PAGES:
                started = time.perf_counter()
                visit(page, url, ids)
                written.append(shoot(page, out, name, charts))
                log(f"  {name}.png: {written[-1].stat().st_size / 1024:.0f} KB, {time.perf_counter() - started:.0f} s")
        finally:
            browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.screenshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots",
                        help="the folder for the PNGs (default: docs/screenshots)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway saves root and the server's log, "
                        "and say where they are")
    parser.add_argument("--saves", type=Path, help="photograph this saves root as it is instead of training a "
                        "fresh one (one that --keep kept)")
    parser.add_argument("--width", type=int, default=WIDTH, help=f"the window's width in px (default {WIDTH}); a "
                        "narrower one shows how the charts read in narrow columns")
    opts = parser.parse_args(argv)
    check_browser()
    started = time.perf_counter()
    # the repository's copy of MNIST, not a fresh download into the throwaway root (the tests do the same)
    os.environ.setdefault("LSTM_DATA", str(REPO / "saves" / "data"))
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="lstm-screenshots-"))
        if opts.keep:
            stack.callback(print, f"kept {work}")
        else:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        if opts.saves:
            root = opts.saves.resolve()
            ids = existing_runs(root)
        else:
            root = work / "saves"
            root.mkdir()
            os.environ["LSTM_SAVES"] = str(root)      # the in-process training, then the server, read it
            print(f"training {len(RUNS)} runs and a study of {STUDY_TRIALS} trials in {root}")
            ids = make_content(root)
        print(f"taking the screenshots ({time.perf_counter() - started:.0f} s in)")
        url = stack.enter_context(streamlit_server(root, work))
        # into the work folder first: a page that fails leaves the pictures in OUT as they were, all of one run
        shots = work / "screenshots"
        shots.mkdir()
        taken = take_all(url, ids, shots, opts.width)
        opts.out.mkdir(parents=True, exist_ok=True)
        for path in taken:
            shutil.copyfile(path, opts.out / path.name)
    print(f"written to {opts.out} in {time.perf_counter() - started:.0f} s")
    return 0


def existing_runs(root: Path) -> dict[str, str]:
    """The RUNS names of the runs in a kept saves root, matched in the order they were trained."""
    from lstm_core.runs import list_runs

    oldest_first = [r["id"] for r in reversed(list_runs(root))]
    if len(oldest_first) < len(RUNS):
        raise SystemExit(f"error: {root} has {len(oldest_first)} runs; --saves takes a root this script made")
    return dict(zip((name for name, _ in RUNS), oldest_first))


if __name__ == "__main__":
    sys.exit(main())
