"""What the Tuning page shows of a study, as data: labels, what each plot still needs, the contour's axes,
the trials that can be inspected, and a study the storage does not hold."""
import json
import random

import optuna
import pytest

from lstm_core import plots
from lstm_core.artifacts import FILES_ATTR, MISSING_ATTR
from lstm_core.storage import make_storage
from app import studyview
from app.studyview import (absent_study, contour_note, contour_pair, draw_id, evaluated_trials, first_trial,
                           load_study, plottable, storage_studies, study_labels, study_metrics, trial_id, trial_label)

DISTRIBUTIONS = {"dropout": optuna.distributions.FloatDistribution(0.1, 0.5),
                 "hidden_size": optuna.distributions.IntDistribution(32, 128),
                 "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
                 "batch_size": optuna.distributions.IntDistribution(64, 256, step=64),
                 "weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)}


def study_of(*trials: dict, storage=None, name: str | None = None) -> optuna.Study:
    """A study of the trials described (params, and value / state / intermediate_values / user_attrs)."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for trial in trials:
        study.add_trial(optuna.trial.create_trial(distributions={k: DISTRIBUTIONS[k] for k in trial["params"]},
                                                  **trial))
    return study


def complete(value, **params) -> dict:
    return {"params": params, "value": value, "intermediate_values": {1: value}}


def test_study_labels_newest_first_then_the_ones_starting():
    summaries = [{"name": "old", "trials": 1, "best_value": 0.9, "started": "2026-01-01T00:00:00"},
                 {"name": "new", "trials": 2, "best_value": None, "started": "2026-02-01T00:00:00"},
                 {"name": "empty", "trials": 0, "best_value": None, "started": None}]
    labels = study_labels(summaries, ["new", "launched"])
    assert labels == {"new": "new · 2 trials", "old": "old · 1 trial · best 90.00%", "empty": "empty · 0 trials",
                      "launched": "launched · starting"}
    assert list(labels) == ["new", "old", "empty", "launched"]


def test_an_empty_study_can_plot_nothing_yet():
    ready = plottable(study_of())
    assert (ready.params, ready.varying, ready.contour) == ([], [], False)
    assert ready.notes == {"history": "No complete trial yet.", "parallel": "No complete trial yet.",
                           "slice": "No complete trial yet.", "intermediate": "No trial has finished an epoch yet.",
                           "contour": "The contour plot needs two searched parameters and two complete trials.",
                           "importances": "Parameter importances need two complete trials whose parameters differ."}
    assert contour_note(ready, []) == ready.notes["contour"]


def test_one_complete_trial_plots_all_but_the_contour_and_importances():
    ready = plottable(study_of(complete(0.9, hidden_size=64, lr=0.01),
                               {"params": {"hidden_size": 32, "lr": 1e-4}, "state": optuna.trial.TrialState.PRUNED,
                                "intermediate_values": {1: 0.1}}))
    assert [k for k, note in ready.notes.items() if note] == ["contour", "importances"]
    assert ready.params == ["hidden_size", "lr"] and ready.varying == []


def test_the_contour_starts_on_parameters_that_vary_and_says_what_a_pick_lacks():
    study = study_of(complete(0.5, dropout=0.1, hidden_size=64, lr=0.01),
                     complete(0.6, dropout=0.3, hidden_size=64, lr=0.02))
    ready = plottable(study)
    assert ready.contour and ready.varying == ["dropout", "lr"] and ready.notes["importances"] is None
    assert sorted(contour_pair(study, ready, None)) == ["dropout", "lr"]
    assert contour_pair(study, ready, ["hidden_size"]) == ["hidden_size"]       # a pick of this study stays
    assert sorted(contour_pair(study, ready, ["optimizer", "lr"])) == ["dropout", "lr"]   # another study's does not
    assert contour_note(ready, ["dropout", "lr"]) is None
    assert contour_note(ready, ["lr"]) == "Pick two parameters for the contour plot."
    assert contour_note(ready, ["hidden_size", "lr"]) == ("hidden_size has the same value in every complete trial: "
                                                          "pick one that varies.")


def test_the_contour_opens_on_the_two_most_important_parameters():
    """The value follows lr and batch_size; dropout and weight_decay vary as much but change nothing."""
    rng = random.Random(0)
    trials = []
    for _ in range(24):
        lr, batch, dropout, decay = (rng.uniform(1e-4, 1e-1), rng.choice([64, 128, 192, 256]), rng.uniform(0.1, 0.5),
                                     rng.uniform(1e-6, 1e-2))
        trials.append(complete(0.5 + 3 * lr + batch / 1000, lr=lr, batch_size=batch, dropout=dropout,
                               weight_decay=decay))
    study = study_of(*trials)
    ready = plottable(study)
    assert studyview.most_important(study, ready)[:2] in (["lr", "batch_size"], ["batch_size", "lr"])
    assert sorted(contour_pair(study, ready, None)) == ["batch_size", "lr"]
    # what the importances plot beside it ranks first, too
    bars = plots.study_figure(study, "importances", "val accuracy").data[0]
    assert set(bars.y[-2:]) == {"lr", "batch_size"}                       # plotly draws the first at the top


def test_the_study_metrics_count_trials_by_state_and_name_the_best():
    study = study_of(complete(0.5, lr=0.01), complete(0.7, lr=0.02),
                     {"params": {"lr": 0.001}, "state": optuna.trial.TrialState.FAIL})
    assert study_metrics(study) == [("complete", 2), ("pruned", 0), ("failed", 1), ("running", 0),
                                    ("best val accuracy", "70.00%", "trial 1")]
    assert study_metrics(study_of())[-1] == ("best val accuracy", "–", None)


def run_dir(path, evaluated: bool = True, weights: bool = True) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")     # what makes it a trial's folder here (artifacts.local_run)
    if evaluated:
        (path / "eval.json").write_text(json.dumps({"test_accuracy": 0.9}))
    if weights:
        (path / "best.pt").write_bytes(b"")
    return str(path)


def test_the_trials_to_inspect_and_the_first_one(tmp_path):
    elsewhere = str(tmp_path / "other-machine" / "t")         # a run folder that is not on this machine
    study = study_of(
        {**complete(0.5, lr=0.01), "user_attrs": {"run_dir": run_dir(tmp_path / "t0")}},
        {**complete(0.8, lr=0.02), "user_attrs": {"run_dir": run_dir(tmp_path / "t1")}},
        {**complete(0.9, lr=0.03), "user_attrs": {"run_dir": run_dir(tmp_path / "t2", evaluated=False)}},
        complete(0.95, lr=0.04),                                          # from another machine, without a store
        {"params": {"lr": 0.001}, "state": optuna.trial.TrialState.PRUNED,
         "user_attrs": {"run_dir": run_dir(tmp_path / "t4")}},
        {**complete(0.85, lr=0.05), "user_attrs": {"run_dir": elsewhere,     # its results in the artifact store
                                                   FILES_ATTR: {"eval.json": ["id-5", 10], "best.pt": ["id-6", 99]}}},
        {**complete(0.99, lr=0.06), "user_attrs": {"run_dir": elsewhere,     # its upload failed: opening says why
                                                   MISSING_ATTR: "0 of 9 files reached the artifact store"}})
    trials = evaluated_trials(study)
    assert list(trials) == [0, 1, 4, 5, 6] and first_trial(trials) == 5   # the best that can be opened
    assert first_trial({4: trials[4]}) == 4                               # none complete: the last
    assert trial_label(trials[1]) == "trial 1 · complete · val accuracy 80.00%"
    assert trial_label(trials[4]) == "trial 4 · pruned"
    assert trial_label(trials[5]) == "trial 5 · complete · val accuracy 85.00% · in the artifact store"
    assert trial_label(trials[6]) == "trial 6 · complete · val accuracy 99.00% · results missing"


def test_a_trial_is_listed_and_drawn_with_only_from_this_saves_root(saves, tmp_path):
    assert draw_id(run_dir(saves / "studies" / "s" / "trial_3")) == "s/trial_3"
    assert draw_id(run_dir(saves / "cache" / "s" / "trial_7")) == "s/trial_7"    # downloaded from a store
    unweighted = run_dir(saves / "studies" / "s" / "trial_4", weights=False)
    assert draw_id(unweighted) is None and trial_id(unweighted) == "s/trial_4"    # evaluated all the same
    outside = run_dir(tmp_path / "elsewhere" / "s" / "trial_5")
    assert draw_id(outside) is None and trial_id(outside) is None


def test_load_study_is_none_before_the_study_exists(saves):
    url = f"sqlite:///{saves / 'optuna.db'}"
    storage = make_storage(url)
    assert load_study(storage, "later") == (None, False)
    study_of(complete(0.5, lr=0.01), storage=url, name="now")
    study, live = load_study(storage, "now")
    assert study.study_name == "now" and live is False


@pytest.mark.parametrize("live, log, level", [(True, "", "info"), (False, "loading\nerror: no data\n", "error"),
                                              (False, None, "warning")])
def test_what_is_said_of_a_study_the_storage_does_not_hold(saves, live, log, level):
    if log is not None:
        (saves / "studies" / "gone").mkdir(parents=True)
        (saves / "studies" / "gone" / "tune.log").write_text(log)
    said, line = absent_study("gone", live)
    assert said == level
    assert ("error: no data" in line) == (level == "error") and "gone" in line


def test_the_default_storage_of_a_fresh_install_is_empty_not_an_error(tmp_path, monkeypatch):
    root = tmp_path / "fresh" / "saves"
    monkeypatch.setenv("LSTM_SAVES", str(root))
    assert storage_studies(studyview.default_storage()) == [] and root.is_dir()

