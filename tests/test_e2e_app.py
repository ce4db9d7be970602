"""The app in Chromium against a real streamlit server: the home page lists the trained run."""
import pytest
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser


def test_home_page_shows_the_trained_run(page: Page, app_url, trained_saves):
    (run_id,) = [p.name for p in (trained_saves / "runs").iterdir()]
    page.goto(app_url)
    expect(page.get_by_role("heading", name="LSTM Studio")).to_be_visible(timeout=60_000)
    table = page.get_by_test_id("stDataFrame")
    expect(table).to_be_visible(timeout=30_000)
    # st.dataframe paints its cells on a canvas; the cell text lives in a hidden accessibility grid
    # beside it, so the row is checked for being there, not for being visible.
    row = table.locator("tr", has=page.get_by_text(run_id, exact=True))
    expect(row).to_have_count(1)
    expect(row).to_contain_text("completed")
    expect(page.get_by_test_id("stException")).to_have_count(0)
