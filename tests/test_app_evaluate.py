"""The Evaluate page under AppTest, over real tiny runs: a run and a tuning trial's run folder."""
import json

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, tiny_config
from lstm_core.recorder import RunRecorder
from lstm_core.runs import create_run
from lstm_core.train import fit

PAGE = str(REPO / "pages" / "evaluate.py")


@pytest.fixture(scope="module")
def evaluated_root(tmp_path_factory, mnist):
    """A saves root with one completed run, one completed trial folder, and one run never trained."""
    root = tmp_path_factory.mktemp("evaluate") / "saves"
    run = create_run(tiny_config(), root)
    fit(run.config(), [RunRecorder(run)], data=mnist)
    trial = create_run(tiny_config(hidden_size=24, epochs=1), path=root / "studies" / "s" / "trial_0")
    fit(trial.config(), [RunRecorder(trial)], data=mnist)
    queued = create_run(tiny_config(), root)
    return root, run, trial, queued


@pytest.fixture
def runs(evaluated_root, monkeypatch):
    root, run, trial, queued = evaluated_root
    monkeypatch.setenv("LSTM_SAVES", str(root))
    return run, trial, queued


def page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    return check(at)


def check(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at: AppTest) -> dict[str, dict]:
    return {c.proto.id.rsplit("-", 1)[-1]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}


def test_no_runs_is_a_friendly_message(saves):
    at = page()
    assert "No evaluated run yet" in at.info[0].value
    assert not at.get("plotly_chart") and not at.error and not at.selectbox


def test_only_evaluated_runs_and_trials_are_offered(runs):
    run, trial, queued = runs
    at = page()
    options = at.selectbox(key="eval_run").options
    assert len(options) == 2 and options[0].startswith(f"{run.id} · run")
    assert options[1].startswith("s/trial_0 · trial")
    assert not any(queued.id in o for o in options)


def test_one_run_shows_its_matrix_per_class_metrics_macros_and_mistakes(runs):
    run, _, _ = runs
    evaluation = run.eval()
    at = page()
    assert at.selectbox(key="eval_run").value == run.id
    figures = charts(at)
    z = figures["eval_cm"]["data"][0]["z"]
    assert z == evaluation["confusion_matrix"] and sum(map(sum, z)) == 10000
    per_class = figures["eval_per_class"]["data"]
    assert [d["name"] for d in per_class] == ["precision", "recall", "f1"]
    assert all(d["x"] == [str(n) for n in range(10)] for d in per_class)
    assert [d["y"] for d in per_class] == [[c[k] for c in evaluation["per_class"]] for k in ("precision", "recall", "f1")]
    metrics = {m.label: m.value for m in at.metric if m.label.startswith(("test", "macro"))}
    assert metrics == {"test accuracy": f"{evaluation['test_accuracy']:.2%}", "test loss": f"{evaluation['test_loss']:.4f}",
                       "macro precision": f"{evaluation['macro_precision']:.4f}",
                       "macro recall": f"{evaluation['macro_recall']:.4f}", "macro F1": f"{evaluation['macro_f1']:.4f}"}
    (gallery,) = at.get("image")
    top = sorted(evaluation["misclassified"], key=lambda m: -m["confidence"])[:40]
    assert len(evaluation["misclassified"]) > 40 and len(gallery.value) == 40
    assert gallery.captions == [f"{m['true']} → {m['pred']} ({m['confidence']:.0%})" for m in top]
    assert all(url.endswith(".png") for url in gallery.value)       # lossless: no JPEG smear on the pixels
    assert any(c.value.startswith("Python ") and f"torch {run.environment()['torch']}" in c.value
               for c in at.caption)                                         # where it trained
    recorded = [r for r in run.metrics() if r.get("event") == "batch"]
    gradients = figures["eval_gradients"]
    assert gradients["layout"]["yaxis"]["type"] == "log"
    assert gradients["data"][0]["y"] == [r["grad_norm"] for r in recorded]      # the run's own progress records
    steps = figures["eval_steps"]                       # beside them, the gradient reaching each of the 28 rows
    assert steps["data"][-1]["y"] == recorded[-1]["step_grad_norms"]
    assert steps["layout"]["xaxis"]["range"] == [0.5, 28.5]

    at.toggle(key="eval_normalize").set_value(True).run()
    rows = charts(check(at))["eval_cm"]["data"][0]["z"]
    assert [sum(row) for row in rows] == pytest.approx([1.0] * 10)
    assert rows[3][3] == pytest.approx(evaluation["confusion_matrix"][3][3] / sum(evaluation["confusion_matrix"][3]))


def test_a_trial_is_evaluated_like_a_run(runs):
    _, trial, _ = runs
    at = page()
    at.selectbox(key="eval_run").set_value("s/trial_0").run()
    check(at)
    assert charts(at)["eval_cm"]["data"][0]["z"] == trial.eval()["confusion_matrix"]
    assert f"{trial.eval()['test_accuracy']:.2%}" in [m.value for m in at.metric]


def test_two_runs_side_by_side_show_their_difference(runs):
    run, trial, _ = runs
    at = page()
    at.selectbox(key="eval_a").set_value(run.id)
    at.selectbox(key="eval_b").set_value("s/trial_0").run()
    check(at)
    figures = charts(at)
    cm_a, cm_b = run.eval()["confusion_matrix"], trial.eval()["confusion_matrix"]
    assert figures["eval_cm_a"]["data"][0]["z"] == cm_a and figures["eval_cm_b"]["data"][0]["z"] == cm_b
    diff = figures["eval_cm_diff"]["data"][0]["z"]
    assert diff == [[b - a for a, b in zip(ra, rb)] for ra, rb in zip(cm_a, cm_b)]
    assert sum(map(sum, diff)) == 0 and any(v for row in diff for v in row)
    metrics = {m.label: m for m in at.metric}
    delta = trial.eval()["test_accuracy"] - run.eval()["test_accuracy"]
    assert metrics["B: test accuracy"].delta == f"{delta:+.2%} vs A"


def test_side_by_side_needs_two_runs(tmp_path, monkeypatch, mnist):
    root = tmp_path / "saves"
    run = create_run(tiny_config(epochs=1), root)
    fit(run.config(), [RunRecorder(run)], data=mnist)
    monkeypatch.setenv("LSTM_SAVES", str(root))
    at = page()
    assert any("Side by side needs two evaluated runs" in i.value for i in at.info)
    assert set(charts(at)) == {"eval_cm", "eval_per_class", "eval_gradients", "eval_steps"}   # the one run's, no pair
