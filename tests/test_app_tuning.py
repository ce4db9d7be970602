"""The Tuning page under AppTest, over real studies: one seeded by the CLI, studies made with Optuna
directly (as another tool would), and studies launched from the page in real background processes."""
import io
import json
import os
import subprocess
import sys

import optuna
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from conftest import DATA_DIR, REPO, wait_until
from lstm_core.runs import run_at
from lstm_core.jobs import request_study_stop, study_running, study_workers

PAGE = str(REPO / "pages" / "tuning.py")
ENTRY = str(REPO / "streamlit_app.py")
SMALL = ["--limit-train", "1000", "--val-size", "500", "--epochs", "2", "--batch-size", "100",
         "--aug-rotate", "0", "--aug-translate", "0", "--aug-scale", "0"]
SPACE = {"hidden_size": {"type": "int", "low": 8, "high": 32},
         "lr": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
         "optimizer": {"type": "categorical", "choices": ["adam", "adamw"]}}
OPTUNA_PLOTS = {"Optimization History Plot", "Intermediate Values Plot", "Contour Plot", "Hyperparameter Importances",
                "Parallel Coordinate Plot", "Slice Plot"}


def seed_study(root, name: str = "seeded", trials: int = 4) -> optuna.Study:
    """A real study of tiny trials, run by the CLI into the saves root `root` (~10-30 s)."""
    root.mkdir(parents=True, exist_ok=True)
    space = root.parent / "space.json"
    space.write_text(json.dumps(SPACE))
    result = subprocess.run([sys.executable, "-m", "lstm_core", "tune", "--study", name, "--trials", str(trials),
                             "--space", str(space), "--sampler-seed", "0", *SMALL], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "LSTM_SAVES": str(root), "LSTM_DATA": str(DATA_DIR)})
    assert result.returncode == 0, result.stderr
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'optuna.db'}")


@pytest.fixture(scope="module")
def seeded_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded") / "saves"
    seed_study(root)
    return root


@pytest.fixture
def seeded(seeded_root, monkeypatch) -> optuna.Study:
    monkeypatch.setenv("LSTM_SAVES", str(seeded_root))
    return optuna.load_study(study_name="seeded", storage=f"sqlite:///{seeded_root / 'optuna.db'}")


def check(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def page() -> AppTest:
    return check(AppTest.from_file(PAGE, default_timeout=120).run())


def charts(at: AppTest) -> dict[str, dict]:
    """Every plotly figure on the page, by its title (untitled ones by their key)."""
    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        title = (spec["layout"].get("title") or {}).get("text") or chart.proto.id
        out[title] = spec
    return out


def trial_heatmap(at: AppTest) -> list[list[float]]:
    (heatmap,) = [s["data"][0] for s in charts(at).values()
                  if s["data"] and s["data"][0]["type"] == "heatmap" and "true digit" in json.dumps(s["layout"])]
    return heatmap["z"]


def infos(at: AppTest) -> str:
    return " | ".join(i.value for i in at.info)


def states(study_name: str, storage: str) -> list[str]:
    """The state of each trial of a study, [] before the study exists."""
    try:
        return [t.state.name for t in optuna.load_study(study_name=study_name, storage=storage).trials]
    except KeyError:
        return []


def finished(study_name: str, storage: str) -> int:
    return sum(state in ("COMPLETE", "PRUNED", "FAIL") for state in states(study_name, storage))


def stop_and_wait(name: str) -> None:
    """Nothing lingers: stop the study, wait for its launcher and every worker to exit."""
    request_study_stop(name)
    wait_until(lambda: not study_workers(name), 240, f"the workers of {name} exiting")


# -- a seeded study ------------------------------------------------------------------------------
def test_the_seeded_study_shows_progress_and_all_six_plots(seeded):
    at = page()
    assert at.selectbox(key="tune_study").value == "seeded"
    figures = charts(at)
    assert OPTUNA_PLOTS <= set(figures)
    complete = [t for t in seeded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in seeded.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(complete) >= 2
    history = figures["Optimization History Plot"]["data"][0]
    assert sorted(history["y"]) == sorted(t.value for t in complete)     # one point per complete trial
    curves = [d for d in figures["Intermediate Values Plot"]["data"] if d["name"].startswith("Trial")]
    assert len(curves) == len(complete) + len(pruned)
    marks = [d["x"] for d in figures["Intermediate Values Plot"]["data"] if d["name"] == "pruned"]
    assert [len(x) for x in marks] == ([len(pruned)] if pruned else [])   # a cross at each pruned trial's end
    importances = figures["Hyperparameter Importances"]["data"][0]
    assert set(importances["y"]) == set(SPACE)
    metrics = {m.label: m.value for m in at.metric}
    assert (metrics["complete"], metrics["pruned"], metrics["failed"]) == (str(len(complete)), str(len(pruned)), "0")
    assert metrics["best val accuracy"] == f"{seeded.best_value:.2%}"
    assert "finished" in " ".join(m.value for m in at.markdown)
    assert not [b for b in at.button if b.label == "Stop"]              # nothing runs: no Stop, no refresh


def test_the_contour_plots_the_two_picked_parameters(seeded):
    at = page()
    # it opens on the two parameters at the top of the importances plot beside it (drawn bottom to top)
    ranked = charts(at)["Hyperparameter Importances"]["data"][0]["y"][::-1]
    assert at.multiselect(key="tune_contour").value == ranked[:2]
    at.multiselect(key="tune_contour").set_value(["optimizer", "hidden_size"]).run()
    check(at)
    layout = charts(at)["Contour Plot"]["layout"]
    assert (layout["xaxis"]["title"]["text"], layout["yaxis"]["title"]["text"]) == ("hidden_size", "optimizer")
    at.multiselect(key="tune_contour").set_value(["optimizer"]).run()
    assert "Contour Plot" not in charts(at) and "Pick two parameters for the contour plot." in infos(at)


def test_the_trial_table_has_a_row_per_trial_and_downloads_as_csv(seeded, monkeypatch):
    downloads = []
    real = st.download_button
    monkeypatch.setattr(st, "download_button", lambda *a, **k: downloads.append((a, k)) or real(*a, **k))
    at = page()
    table = at.dataframe[0].value
    assert list(table["number"]) == [t.number for t in seeded.trials]
    assert list(table["state"]) == [t.state.name for t in seeded.trials]
    assert list(table["param_hidden_size"]) == [t.params["hidden_size"] for t in seeded.trials]
    ((args, kwargs),) = [(a, k) for a, k in downloads if a[0] != "Download report"]   # (test_report.py's)
    assert args[0] == "Download CSV" and kwargs["file_name"] == "seeded-trials.csv" and kwargs["mime"] == "text/csv"
    csv = pd.read_csv(io.StringIO(args[1]))
    assert list(csv["number"]) == list(table["number"]) and list(csv["state"]) == list(table["state"])
    assert csv["value_val_accuracy"].tolist() == pytest.approx([t.value for t in seeded.trials])   # named
    assert list(csv["user_attrs_run_dir"]) == [t.user_attrs["run_dir"] for t in seeded.trials]
    # Optuna's own columns (trials_dataframe), as its other tools and notebooks name them
    assert list(csv.columns) == list(seeded.trials_dataframe().columns)
    assert list(csv["params_hidden_size"]) == list(table["param_hidden_size"])


def test_picking_a_trial_shows_its_confusion_matrix_and_per_class_metrics(seeded):
    at = page()
    assert at.selectbox(key="tune_trial").value == seeded.best_trial.number        # the best one first
    other = next(t for t in seeded.trials if t.number != seeded.best_trial.number)
    at.selectbox(key="tune_trial").set_value(other.number).run()
    check(at)
    evaluation = run_at(other.user_attrs["run_dir"]).eval()
    z = trial_heatmap(at)
    assert z == evaluation["confusion_matrix"] and sum(map(sum, z)) == 10000
    per_class = [s for s in charts(at).values() if [d["type"] for d in s["data"]] == ["bar"] * 3]
    assert [d["y"] for d in per_class[0]["data"]] == [[c[k] for c in evaluation["per_class"]]
                                                      for k in ("precision", "recall", "f1")]
    assert f"{evaluation['test_accuracy']:.2%}" in [m.value for m in at.metric]
    at.toggle(key="tune_normalize").set_value(True).run()
    assert all(sum(row) == pytest.approx(1.0) for row in trial_heatmap(at) if sum(row))


def test_open_in_train_page_carries_the_trial_config(seeded):
    at = AppTest.from_file(ENTRY, default_timeout=120).run()
    at.switch_page("pages/tuning.py").run()
    check(at)
    trial = max(seeded.trials, key=lambda t: t.params["hidden_size"])
    at.selectbox(key="tune_trial").set_value(trial.number).run()
    (button,) = [b for b in at.button if b.label == "Open in Train page"]
    button.click().run()
    check(at)
    config = run_at(trial.user_attrs["run_dir"]).config().to_dict()
    assert [t.value for t in at.title] == ["Train"]
    assert at.session_state["train_values"] == config
    assert at.slider(key="hidden_size").value == trial.params["hidden_size"] == config["hidden_size"]
    assert at.number_input(key="lr").value == pytest.approx(trial.params["lr"])
    assert at.selectbox(key="optimizer").value == trial.params["optimizer"]
    assert at.number_input(key="limit_train").value == 1000 and at.slider(key="epochs").value == 2


def test_use_on_draw_page_selects_the_trial_there(seeded):
    at = AppTest.from_file(ENTRY, default_timeout=120).run()
    at.switch_page("pages/tuning.py").run()
    trial = seeded.best_trial
    (button,) = [b for b in at.button if b.label == "Use on Draw page"]
    assert not button.disabled
    button.click().run()
    check(at)
    assert at.session_state["draw_run"] == f"seeded/trial_{trial.number}"
    assert [t.value for t in at.title] == ["Draw"]
    assert at.selectbox(key="draw_model").value == f"seeded/trial_{trial.number}"


# -- studies the page did not launch ------------------------------------------------------------
def test_an_empty_storage_offers_the_launch_form(saves):
    at = page()
    assert "No studies in this storage yet" in infos(at)
    assert not at.get("plotly_chart") and not at.error
    (launch,) = [b for b in at.button if b.label == "Launch study"]
    assert not launch.disabled
    assert at.text_input(key="tune_storage").value == f"sqlite:///{saves / 'optuna.db'}"


def test_an_artifact_store_the_launch_cannot_use_is_refused_in_one_line(saves, tmp_path):
    at = page()
    at.text_input(key="tune_artifacts").set_value("ftp://host/bucket").run()
    (error,) = check(at).error
    assert error.value == "artifact store 'ftp://host/bucket': a store is a folder or s3://BUCKET[/PREFIX]"
    (launch,) = [b for b in at.button if b.label == "Launch study"]
    assert launch.disabled
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    at.text_input(key="tune_artifacts").set_value(str(taken)).run()
    (launch,) = [b for b in check(at).button if b.label == "Launch study"]
    assert not at.error and not launch.disabled        # checked at the click, like the storage
    launch.click().run()
    (error,) = check(at).error
    assert error.value.startswith(f"cannot make the artifact store folder {taken}:")
    assert len(error.value.splitlines()) == 1
    assert not study_workers(at.text_input(key="tune_name").value)


def test_studies_of_any_storage_open_and_young_ones_show_notes(saves, tmp_path):
    """Studies made with Optuna directly, in a storage outside the saves root: one with a single trial
    (no run folder, as from another machine) and one with none."""
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    optuna.create_study(study_name="empty", storage=url, direction="maximize")
    one = optuna.create_study(study_name="one", storage=url, direction="maximize")
    distributions = {"hidden_size": optuna.distributions.IntDistribution(32, 128),
                     "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    one.add_trial(optuna.trial.create_trial(params={"hidden_size": 64, "lr": 0.01}, value=0.9,
                                            intermediate_values={1: 0.8, 2: 0.9}, distributions=distributions))
    one.add_trial(optuna.trial.create_trial(params={"hidden_size": 32, "lr": 1e-4}, state=optuna.trial.TrialState.PRUNED,
                                            intermediate_values={1: 0.1}, distributions=distributions))
    at = page()
    at.text_input(key="tune_storage").set_value(url).run()
    check(at)
    assert set(at.selectbox(key="tune_study").options) >= {"one · 2 trials · best 90.00%", "empty · 0 trials"}
    at.selectbox(key="tune_study").set_value("one").run()
    check(at)
    figures = charts(at)
    assert {"Optimization History Plot", "Intermediate Values Plot", "Parallel Coordinate Plot",
            "Slice Plot"} <= set(figures)
    assert "Contour Plot" not in figures and "Hyperparameter Importances" not in figures
    curves = {d["name"]: d for d in figures["Intermediate Values Plot"]["data"]}
    assert curves["Trial1"]["line"]["dash"] == "dot" and "dash" not in curves["Trial0"].get("line", {})
    assert (curves["pruned"]["x"], curves["pruned"]["y"]) == ([1], [0.1])    # a cross where the pruned trial ended
    assert "contour plot needs two" in infos(at) and "importances need two complete trials" in infos(at)
    assert "No trial has a test evaluation to open yet" in infos(at)
    at.selectbox(key="tune_study").set_value("empty").run()
    check(at)
    assert not at.get("plotly_chart")
    assert infos(at).count("No complete trial yet.") == 3 and "No trial has finished an epoch" in infos(at)
    assert "No trials yet." in [c.value for c in at.caption]


def test_the_contour_starts_on_parameters_that_vary(saves):
    study = optuna.create_study(study_name="flat", storage=f"sqlite:///{saves / 'optuna.db'}", direction="maximize")
    distributions = {"dropout": optuna.distributions.FloatDistribution(0.1, 0.5),
                     "hidden_size": optuna.distributions.IntDistribution(32, 128),
                     "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for dropout, lr, value in ((0.1, 0.01, 0.5), (0.3, 0.02, 0.6), (0.5, 0.005, 0.4)):
        study.add_trial(optuna.trial.create_trial(params={"dropout": dropout, "hidden_size": 64, "lr": lr},
                                                  value=value, distributions=distributions))
    at = page()
    assert at.multiselect(key="tune_contour").value == ["dropout", "lr"]
    assert "Contour Plot" in charts(at)
    at.multiselect(key="tune_contour").set_value(["hidden_size", "lr"]).run()
    assert "Contour Plot" not in charts(at)
    assert "hidden_size has the same value in every complete trial" in infos(at)


# -- launched from the page ------------------------------------------------------------------------
def launch(at: AppTest, name: str, trials: int, epochs: int, limit_train: int) -> None:
    at.text_input(key="tune_name").set_value(name)
    at.number_input(key="tune_trials").set_value(trials)
    at.number_input(key="tune_epochs").set_value(epochs)
    at.number_input(key="tune_limit_train").set_value(limit_train)
    at.number_input(key="tune_val_size").set_value(500)
    at.button_group(key="tune_params").set_value(["hidden_size", "lr"])
    at.run()
    at.slider(key="tune_space_hidden_size").set_value((8, 16))
    at.select_slider(key="tune_space_lr").set_value((0.005, 0.02)).run()
    check(at)
    (button,) = [b for b in at.button if b.label == "Launch study"]
    button.click().run()
    check(at)
    assert study_running(name)                      # at once, before the process has loaded anything


@pytest.mark.slow
def test_launch_runs_a_background_study_to_its_trial_count(saves):
    at = page()
    launch(at, "launched", trials=2, epochs=1, limit_train=1000)
    try:
        assert any("Started study launched" in s.value for s in at.success)
        assert at.selectbox(key="tune_study").value == "launched"
        space = json.loads((saves / "studies" / "launched" / "space.json").read_text())
        assert space == {"hidden_size": {"type": "int", "low": 8, "high": 16},
                         "lr": {"type": "float", "low": 0.005, "high": 0.02, "log": True}}
        storage = f"sqlite:///{saves / 'optuna.db'}"
        wait_until(lambda: finished("launched", storage) >= 2, 600, "two finished trials")
        wait_until(lambda: not study_running("launched"), 120, "the study ending")   # by itself, at its trial count
        log = (saves / "studies" / "launched" / "tune.log").read_text()
        assert "study launched: 2 finished" in log and "error:" not in log and "Traceback" not in log, log
        at.run()
        check(at)
        study = optuna.load_study(study_name="launched", storage=storage)
        assert len(at.dataframe[0].value) == len(study.trials) >= 2
        for trial in study.trials:                          # trained what the page's ranges allowed
            assert 8 <= trial.params["hidden_size"] <= 16 and 0.005 <= trial.params["lr"] <= 0.02
            assert run_at(trial.user_attrs["run_dir"]).config().epochs == 1
        # the median pruner never prunes a study's first two trials: both complete, both plotted
        history = charts(at)["Optimization History Plot"]["data"][0]
        assert sorted(history["y"]) == sorted(t.value for t in study.trials)
    finally:
        stop_and_wait("launched")


@pytest.mark.slow
def test_stop_ends_a_running_study(saves):
    at = page()
    launch(at, "long", trials=50, epochs=20, limit_train=20000)
    try:
        storage = f"sqlite:///{saves / 'optuna.db'}"
        wait_until(lambda: "RUNNING" in states("long", storage) and study_workers("long"), 300, "a running trial")
        at.run()
        check(at)
        assert "running" in " ".join(m.value for m in at.markdown)
        (stop,) = [b for b in at.button if b.label == "Stop"]
        stop.click().run()
        wait_until(lambda: not study_running("long"), 180, "the study stopping")
        study = optuna.load_study(study_name="long", storage=storage)
        assert len(study.trials) < 50 and not [t for t in study.trials if t.state.name == "RUNNING"]
        assert study.trials[-1].state.name == "PRUNED"        # the interrupted trial is kept, not as a result
        at.run()
        check(at)
        assert "finished" in " ".join(m.value for m in at.markdown)
    finally:
        stop_and_wait("long")
