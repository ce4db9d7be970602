"""The Draw page under load, briefly: a few sessions drawing at once, in Chromium and as
websocket clients, all get predictions and no errors while a training run goes on.

The latency goal is the benchmark's (`make load`, benchmarks/load_draw.py), not asserted here: timings on a
shared 2-core machine say more about the machine than about the app.
"""
import pytest

from benchmarks import cold_start
from benchmarks.load_draw import load_environment, parser, run_clients

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def loaded_app(tmp_path_factory, mnist):
    """A server over a saves root with a trained model, and a background training run in that root."""
    root = tmp_path_factory.mktemp("load") / "saves"
    root.mkdir()
    with load_environment(root, mnist, log=lambda *_: None) as (url, run):
        yield url, run


@pytest.mark.parametrize("client, sessions", [("browser", 3), ("ws", 6)])
def test_sessions_drawing_at_once_while_training_all_get_predictions(loaded_app, client, sessions):
    url, run = loaded_app
    opts = parser().parse_args(["--client", client, "--sessions", str(sessions), "--seconds", "8",
                                "--pause", "0.5", "--strokes-per-drawing", "3", "--timeout", "60"])
    report = run_clients(url, run, opts)
    assert report["errors"] == 0, report["error_list"]
    assert report["sessions_opened"] == sessions
    assert all(n >= 1 for n in report["predictions_per_session"]), report["predictions_per_session"]
    assert report["training"]["state_at_end"] == "running"          # the training went on meanwhile


def test_cold_start_times_the_server_and_the_first_page(saves, browser):
    figures = cold_start.measure(saves, browser)
    assert "first_page_error" not in figures, figures["first_page_error"]
    assert 0 < figures["server_ready_s"] < figures["first_page_s"]
