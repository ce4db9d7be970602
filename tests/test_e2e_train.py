"""The Train page in Chromium: start a run from the browser, watch its chart grow, reload, still see it."""
import pytest
from playwright.sync_api import Page, expect

from conftest import curve_points, set_number, streamlit_server, wait_for_points
from lstm_core.jobs import request_stop
from lstm_core.runs import run_at

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def train_url(tmp_path_factory):
    saves = tmp_path_factory.mktemp("e2e-train") / "saves"
    saves.mkdir()
    with streamlit_server(saves, tmp_path_factory.mktemp("e2e-train-log")) as url:
        yield url, saves
    for run in (saves / "runs").iterdir():        # training outlives the server by design: stop it here
        request_stop(run_at(run))


def test_start_a_run_watch_the_chart_grow_and_find_it_after_a_reload(page: Page, train_url):
    url, saves = train_url
    page.goto(f"{url}/train")
    expect(page.get_by_role("heading", name="Train")).to_be_visible(timeout=60_000)
    page.get_by_text("Advanced", exact=True).click()
    set_number(page, "limit training samples (0 = all)", 6000)
    set_number(page, "validation samples", 1000)
    page.get_by_role("button", name="Start training").click()
    expect(page.get_by_text("Started run")).to_be_visible(timeout=30_000)
    (run_dir,) = list((saves / "runs").iterdir())

    wait_for_points(page, 0, timeout=120_000)
    first = curve_points(page)
    wait_for_points(page, first, timeout=120_000)             # the live chart gained a point

    page.reload()
    expect(page.get_by_text(run_dir.name).first).to_be_visible(timeout=60_000)
    wait_for_points(page, 0, timeout=60_000)
    assert curve_points(page) >= first
    expect(page.get_by_test_id("stException")).to_have_count(0)
