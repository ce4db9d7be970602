"""The Tuning page in Chromium: a study seeded by the CLI opens with its plots drawn by plotly."""
import re

import optuna
import pytest
from playwright.sync_api import Page, expect

from conftest import streamlit_server
from test_app_tuning import seed_study

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def tuning_url(tmp_path_factory):
    saves = tmp_path_factory.mktemp("e2e-tuning") / "saves"
    study = seed_study(saves)
    # a newer study, made with Optuna directly, is the one the page opens first: the seeded one must be picked
    newer = optuna.create_study(study_name="newer", storage=f"sqlite:///{saves / 'optuna.db'}", direction="maximize")
    newer.add_trial(optuna.trial.create_trial(params={"hidden_size": 16}, value=0.5, distributions={
        "hidden_size": optuna.distributions.IntDistribution(8, 32)}))
    with streamlit_server(saves, tmp_path_factory.mktemp("e2e-tuning-log")) as url:
        yield url, study


# Streamlit's theme wraps a figure's title in <b> tags: compare the text without them.
TITLES = """[...document.querySelectorAll('.js-plotly-plot')].map(
    p => ((p.layout && p.layout.title && p.layout.title.text) || '').replace(/<[^>]+>/g, ''))"""


def plot_titles(page: Page) -> list[str]:
    return page.evaluate(f"() => {TITLES}")


def test_a_seeded_study_opens_with_its_plots(page: Page, tuning_url):
    url, study = tuning_url
    page.goto(url)                                       # a fresh server's first sub-URL runs in a legacy mode
    expect(page.get_by_role("heading", name="LSTM Studio")).to_be_visible(timeout=60_000)
    page.goto(f"{url}/tuning")
    expect(page.get_by_role("heading", name="Tuning")).to_be_visible(timeout=60_000)
    picker = page.get_by_role("combobox", name="Study")
    expect(picker).to_have_value(re.compile(r"^newer · 1 trial"), timeout=60_000)
    page.wait_for_function(f"() => {TITLES}.includes('Optimization History Plot')", timeout=120_000)
    picker.click()
    page.get_by_role("option", name=re.compile(r"^seeded · 4 trials")).click()
    expect(picker).to_have_value(re.compile(r"^seeded · 4 trials"), timeout=60_000)
    page.wait_for_function(f"() => {TITLES}.includes('Contour Plot')", timeout=120_000)   # newer has none

    page.wait_for_function(f"() => {TITLES}.includes('Optimization History Plot')", timeout=120_000)
    history = page.evaluate(f"""() => [...document.querySelectorAll('.js-plotly-plot')]
        [{TITLES}.indexOf('Optimization History Plot')].data[0].y""")
    complete = sorted(t.value for t in study.trials if t.state.name == "COMPLETE")
    assert sorted(history) == pytest.approx(complete)
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 8", timeout=60_000)
    assert {"Optimization History Plot", "Intermediate Values Plot", "Contour Plot", "Hyperparameter Importances",
            "Parallel Coordinate Plot", "Slice Plot"} <= set(plot_titles(page))
    expect(page.get_by_test_id("stException")).to_have_count(0)
