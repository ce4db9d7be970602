"""One-file HTML reports (lstm_core/report.py, `python -m lstm_core report`): a real run's and a real
study's, self-contained (plotly.js once, no outside resource), with what each must show; bad requests in one
line; and every figure of a report drawn by Chromium with the network cut off."""
import re
import shutil

import pytest
from plotly.offline import get_plotlyjs
from streamlit.testing.v1 import AppTest

from conftest import REPO, tiny_config
from lstm_core.runs import list_runs, read_json
from lstm_core.storage import default_storage
from lstm_core.tune import run_worker

SPACE = {"hidden_size": {"type": "int", "low": 8, "high": 32}}
PLOTLY_HEAD = get_plotlyjs()[:300]        # plotly.js's licence header: once per report, not per figure


def report(cli, *args) -> tuple[int, str, str]:
    code, err, out = cli("report", *args)
    return code, out.strip(), err.strip()


def figures(text: str) -> int:
    return text.count("Plotly.newPlot(")


def self_contained(text: str) -> str:
    """The report without its copy of plotly.js, after checking that it has exactly one and loads nothing."""
    assert text.count(PLOTLY_HEAD) == 1
    ours = text.replace(get_plotlyjs(), "")      # (plotly.js's own source has its logo's link in it)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", ours), "a report must load nothing from outside"
    return ours


@pytest.fixture(scope="module")
def study_saves(tmp_path_factory):
    """A saves root with a real two-trial study in its default SQLite storage."""
    root = tmp_path_factory.mktemp("report") / "saves"
    run_worker("rep", 2, tiny_config(limit_train=1000, val_size=500, batch_size=100), default_storage(root), SPACE,
               pruner="none", root=root, seed=0)
    return root


def test_a_run_report_shows_its_config_curves_gradients_results_and_mistakes(trained_saves, tmp_path, cli):
    (row,) = list_runs(trained_saves)
    out = tmp_path / "run.html"
    code, printed, err = report(cli, row["id"], "--saves", trained_saves, "-o", out)
    assert (code, printed, err) == (0, str(out), "")
    text = self_contained(out.read_text())
    evaluation = read_json(trained_saves / "runs" / row["id"] / "eval.json")
    # curves, gradient health, the gradient over time, the confusion matrix, per-class metrics
    assert figures(text) == 5
    assert f"Run {row['id']}" in text and "hidden_size" in text and "Most confident mistakes" in text
    assert f"{evaluation['test_accuracy']:.4g}" in text
    shown = min(12, len(evaluation["misclassified"]))
    assert text.count("data:image/png;base64,") == shown > 0


def test_a_run_report_goes_beside_the_run_by_default_and_into_a_folder_given_with_a_separator(
        trained_saves, tmp_path, cli):
    run = tmp_path / "copy"
    shutil.copytree(trained_saves / "runs" / list_runs(trained_saves)[0]["id"], run)
    assert report(cli, run)[:2] == (0, str(run / "report.html"))
    assert report(cli, run, "-o", f"{tmp_path / 'new'}/")[:2] == (0, str(tmp_path / "new" / "report.html"))
    assert (run / "report.html").stat().st_size == (tmp_path / "new" / "report.html").stat().st_size


def test_a_study_report_shows_every_optuna_plot_the_trials_and_the_best_trial(study_saves, tmp_path, cli):
    out = tmp_path / "study.html"
    code, printed, err = report(cli, "--study", "rep", "--saves", study_saves, "-o", out)
    assert (code, printed, err) == (0, str(out), "")
    text = self_contained(out.read_text())
    # history, intermediate values, contour, importances, parallel, slice; then the best trial's five
    assert figures(text) == 6 + 5
    assert "Study rep" in text and "Best trial:" in text and "<table>" in text


def test_bad_requests_are_one_line(trained_saves, study_saves, tmp_path, cli):
    run_id = list_runs(trained_saves)[0]["id"]
    one_of = "name a run (its id or folder), a study (--study NAME) or a trial (--study NAME --trial N), one of them"
    cases = [((), one_of), ((run_id, "--study", "rep"), one_of), ((run_id, "--trial", "0"), one_of),
             (("--study", "absent", "--saves", study_saves), f"no study 'absent' in {default_storage(study_saves)}"),
             (("no-such-run", "--saves", trained_saves), "no run 'no-such-run'")]
    for args, message in cases:
        code, out, err = report(cli, *args)
        assert code == 2 and out == "" and err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_saves / "runs" / run_id, damaged)
    (damaged / "config.json").write_text('{"arch": "lstm", "hidden')
    code, out, err = report(cli, damaged)
    assert code == 2 and err == "error: run damaged is damaged: config.json: not JSON (line 1 column 18)", err
    assert not (damaged / "report.html").exists()


# What a report may weigh beyond its one copy of plotly.js: its figures' data, a dozen small images, tables.
# A report that grows past it is inlining something per figure (plotly.js again, or raw arrays).
REPORT_OVERHEAD = 2_000_000


@pytest.mark.browser
@pytest.mark.parametrize("kind", ["run", "study"])
def test_chromium_draws_every_figure_of_a_report_with_the_network_cut_off(trained_saves, study_saves, tmp_path,
                                                                          cli, page, kind):
    out = tmp_path / f"{kind}.html"
    target = (list_runs(trained_saves)[0]["id"], "--saves", trained_saves) if kind == "run" else \
        ("--study", "rep", "--saves", study_saves)
    assert report(cli, *target, "-o", out)[0] == 0
    assert out.stat().st_size < len(get_plotlyjs().encode()) + REPORT_OVERHEAD
    shown = 5 if kind == "run" else 6 + 5       # a study's six Optuna plots, then its best trial's five
    asked = []
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
               else (asked.append(route.request.url), route.abort()))
    page.goto(out.as_uri())
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {shown}",
                           timeout=60_000)
    assert page.evaluate("document.querySelectorAll('.js-plotly-plot').length") == shown
    assert page.evaluate("document.querySelectorAll('img').length") > 0 and asked == []


def download_buttons(at) -> dict:
    assert not at.exception, [e.value for e in at.exception]
    return {b.label: b.proto for b in at.get("download_button")}


def test_the_evaluate_and_tuning_pages_offer_the_report_written_when_clicked(trained_saves, study_saves,
                                                                            monkeypatch):
    monkeypatch.setenv("LSTM_SAVES", str(trained_saves))
    at = AppTest.from_file(str(REPO / "pages" / "evaluate.py"), default_timeout=120).run()
    button = download_buttons(at)["Download report"]
    assert button.deferred_file_id and not button.url        # built on the click, not at every rerun
    monkeypatch.setenv("LSTM_SAVES", str(study_saves))
    at = AppTest.from_file(str(REPO / "pages" / "tuning.py"), default_timeout=120).run()
    buttons = download_buttons(at)
    assert buttons["Download report"].deferred_file_id and "Download CSV" in buttons
