"""The Draw page in Chromium: mouse strokes on the canvas and an upload each get a prediction."""
import io

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from benchmarks.harness import CANVAS, drag_on_canvas

pytestmark = pytest.mark.browser

TIMEOUT = 60_000  # ms; the machine may be busy with other suites


@pytest.fixture
def draw_page(page: Page, app_url, trained_saves) -> Page:
    # The root first: on a fresh server the first request for a sub-URL is served in Streamlit's legacy
    # pages-directory mode, before st.navigation has registered /draw.
    page.goto(app_url)
    expect(page.get_by_role("heading", name="LSTM Studio")).to_be_visible(timeout=TIMEOUT)
    page.get_by_role("link", name="Draw", exact=True).click()
    expect(page.get_by_role("heading", name="Draw", exact=True)).to_be_visible(timeout=TIMEOUT)
    expect(page.locator(CANVAS)).to_be_visible(timeout=TIMEOUT)
    return page


def stroke(page: Page, points: list[tuple[float, float]]) -> None:
    """One mouse stroke through `points`, given as fractions of the canvas's size, once the canvas has taken
    it (its Undo button comes on). A canvas that Clear has just replaced can be on the page a moment before
    its drawing layer listens: a stroke it missed is drawn once more, as a person would."""
    undo = page.get_by_role("tabpanel").get_by_role("button", name="Undo")
    for attempt in range(2):
        drag_on_canvas(page, points)
        try:
            expect(undo).to_be_enabled(timeout=10_000)
            return
        except AssertionError:
            if attempt:
                raise


def bar_charts(page: Page) -> list[list[float]]:
    """The y values of every plotly chart on the page whose first trace is a bar chart."""
    return page.eval_on_selector_all(
        ".js-plotly-plot",
        "els => els.filter(e => e.data && e.data[0] && e.data[0].type === 'bar')"
        "          .map(e => Array.from(e.data[0].y))")


def expect_prediction(page: Page) -> int:
    """Wait for the active tab's prediction; check it against its probability chart; return it."""
    panel = page.get_by_role("tabpanel")
    metric = panel.get_by_test_id("stMetric").filter(has_text="Prediction")
    expect(metric).to_be_visible(timeout=TIMEOUT)
    expect(panel.locator(".js-plotly-plot").first).to_be_visible(timeout=TIMEOUT)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.js-plotly-plot')].some(e => e.data && e.data[0] && "
        "e.data[0].type === 'bar' && e.data[0].y.length === 10)", timeout=TIMEOUT)
    digit = int(metric.get_by_test_id("stMetricValue").inner_text())
    (probabilities,) = bar_charts(page)              # the other tab has no input in these tests
    assert len(probabilities) == 10 and sum(probabilities) == pytest.approx(1, abs=1e-4)
    assert int(np.argmax(probabilities)) == digit
    return digit


def test_strokes_on_the_canvas_get_a_prediction(draw_page: Page):
    page = draw_page
    expect(page.get_by_text("Draw a digit in the black box")).to_be_visible(timeout=TIMEOUT)
    stroke(page, [(0.5, 0.15), (0.5, 0.85)])                       # a "1"
    expect_prediction(page)
    expect(page.get_by_text("Draw a digit in the black box")).to_have_count(0)

    page.get_by_role("button", name="Clear").click()
    expect(page.get_by_text("Draw a digit in the black box")).to_be_visible(timeout=TIMEOUT)
    stroke(page, [(0.25, 0.2), (0.75, 0.2), (0.4, 0.85)])         # a "7"
    expect_prediction(page)
    expect(page.get_by_test_id("stException")).to_have_count(0)


def test_an_upload_gets_a_prediction(draw_page: Page, mnist):
    page = draw_page
    buffer = io.BytesIO()
    Image.fromarray(255 - np.asarray(mnist.test_images[0], dtype=np.uint8)).resize((200, 200)).save(buffer, "PNG")
    page.get_by_role("tab", name="Upload an image").click()
    page.get_by_role("tabpanel").locator("input[type=file]").set_input_files(
        files=[{"name": "seven.png", "mimeType": "image/png", "buffer": buffer.getvalue()}])
    expect_prediction(page)
    expect(page.get_by_role("tabpanel").get_by_text("inverted")).to_be_visible()
    expect(page.get_by_test_id("stException")).to_have_count(0)
