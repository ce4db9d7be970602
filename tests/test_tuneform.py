"""The Tuning page's launch form without Streamlit: the range widgets, the search space and `tune` command
they make (checked up front), and the launch."""
import json
from dataclasses import fields

import pytest

from lstm_core.__main__ import build_parser
from lstm_core.config import RECURRENT_ONLY, PRESETS, ConfigError, TrainConfig, preset
from lstm_core.runs import RunError
from lstm_core.storage import make_storage
from lstm_core.tune import DEFAULT_SPACE, SEARCH_RANGES, check_space
from app import tuneform
from app.tuneform import LAUNCH, LAUNCH_INPUTS, first_pick, log_grid, picked_range, plan_study, range_input

SPACE = {"hidden_size": {"type": "int", "low": 8, "high": 16},
         "lr": {"type": "float", "low": 0.005, "high": 0.02, "log": True}}


def test_log_grid_steps_1_2_5_per_decade():
    assert log_grid(1e-3, 1e-1) == [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]
    assert log_grid(3e-3, 0.3) == [5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2]


def test_each_searched_parameter_gets_the_widget_of_its_kind():
    kinds = {name: range_input(name, first_pick(name)).kind for name in SEARCH_RANGES}
    choices = {"cell", "seq_mode", "bidirectional", "forget_init", "optimizer", "scheduler", "amp"}
    assert kinds == {**{name: "slider" for name in SEARCH_RANGES}, **dict.fromkeys(choices, "pills"),
                     "lr": "select_slider", "weight_decay": "select_slider"}
    assert range_input("bidirectional", [True]).args["options"] == [False, True]
    assert range_input("optimizer", ["adam"]).args["options"] == ["adam", "adamw", "sgd", "rmsprop"]
    batch = range_input("batch_size", (64, 256)).args
    assert (batch["min_value"], batch["max_value"], batch["step"]) == (64, 1024, 64)
    assert range_input("dropout", (0.1, 0.5)).args == {"min_value": 0.0, "max_value": 0.8, "step": 0.01}
    # the others' sliders span the Train page's (narrower than a config accepts) in its steps
    assert range_input("aug_rotate", (0.0, 15.0)).args == {"min_value": 0.0, "max_value": 45.0, "step": 0.5}
    assert range_input("amp", ["off"]).args["options"] == ["off", "auto", "bf16"]     # offered, not first picked


def test_a_log_range_offers_its_grid_and_its_last_pick():
    ask = range_input("lr", (3e-5, 0.02))
    assert ask.label == "lr" and ask.args["value"] == (3e-5, 0.02)
    assert {3e-5, 0.02, 1e-6, 1.0} <= set(ask.args["options"]) and ask.args["options"] == sorted(ask.args["options"])
    assert ask.args["format_func"](3e-5) == "3e-05"


@pytest.mark.parametrize("name", SEARCH_RANGES)
def test_the_first_picks_make_the_first_ranges(name):
    assert picked_range(name, first_pick(name)) == SEARCH_RANGES[name]


def test_every_config_field_that_has_a_range_can_be_searched_from_every_preset():
    """All but what fixes the comparison (epochs, data sizes, seed), where a run computes, and arch."""
    fixed = {"arch", "epochs", "seed", "val_size", "limit_train", "device", "num_threads", "log_every"}
    assert set(SEARCH_RANGES) == {f.name for f in fields(TrainConfig)} - fixed
    assert list(DEFAULT_SPACE) == ["optimizer", "lr", "weight_decay", "hidden_size", "num_layers", "dropout",
                                   "batch_size", "bidirectional"]
    everything = {name: picked_range(name, first_pick(name)) for name in SEARCH_RANGES}
    for name in PRESETS:      # a CNN's trials search all but what only an LSTM reads (check_space refuses those)
        space = everything if preset(name).arch == "lstm" else {
            k: v for k, v in everything.items() if k not in RECURRENT_ONLY}
        assert check_space(space, preset(name)) == space


def test_picks_in_the_search_space_format():
    assert picked_range("dropout", (0.10000000000000002, 0.35)) == {"type": "float", "low": 0.1, "high": 0.35}
    assert picked_range("hidden_size", (8, 16)) == {"type": "int", "low": 8, "high": 16}
    assert picked_range("lr", (0.005, 0.02)) == SPACE["lr"]
    assert picked_range("optimizer", ["adam"]) == {"type": "categorical", "choices": ["adam"]}


def test_the_launch_inputs_cover_every_value_of_the_form():
    assert list(LAUNCH_INPUTS) == list(LAUNCH)
    assert LAUNCH_INPUTS["sampler"].args["options"][0] == LAUNCH["sampler"]
    assert LAUNCH_INPUTS["limit_train"].label == "limit training samples (0 = all)"


def tune_args(plan) -> dict:
    return vars(build_parser().parse_args(["tune", *plan.args]))


def test_the_plan_is_the_tune_command_of_the_form(saves):
    plan = plan_study("wide", {**LAUNCH, "trials": 7, "workers": 2, "sampler": "random"}, SPACE, "sqlite:///x.db")
    args = tune_args(plan)
    assert (args["study"], args["trials"], args["workers"], args["sampler"], args["pruner"]) == ("wide", 7, 2,
                                                                                                  "random", "median")
    assert (args["storage"], args["preset"], args["epochs"], args["limit_train"], args["val_size"]) == (
        "sqlite:///x.db", "default", 3, 10000, 5000)
    assert args["space"] == str(saves / "studies" / "wide" / "space.json") and args["timeout"] is None
    assert (plan.name, plan.storage, plan.space) == ("wide", "sqlite:///x.db", SPACE)
    assert tune_args(plan_study("wide", {**LAUNCH, "timeout": 600}, SPACE, "sqlite:///x.db"))["timeout"] == 600


def test_a_plan_is_refused_with_its_first_problem(saves, monkeypatch):
    with pytest.raises(RunError, match="invalid study name '../up'"):
        plan_study("../up", LAUNCH, SPACE, "sqlite:///x.db")
    wide = {"batch_size": {"type": "int", "low": 64, "high": 512}}
    with pytest.raises(ConfigError, match=r"with batch_size = 512: limit_train \(300\) must be at least batch_size"):
        plan_study("ok", {**LAUNCH, "limit_train": 300}, wide, "sqlite:///x.db")
    monkeypatch.setattr(tuneform, "study_running", lambda name: name == "busy")
    with pytest.raises(RunError, match="Study busy is running: stop it first, or pick another name."):
        plan_study("busy", LAUNCH, SPACE, "sqlite:///x.db")
    assert check_space(plan_study("idle", LAUNCH, SPACE, "sqlite:///x.db").space) == SPACE
    assert not (saves / "studies").exists()                  # planning writes nothing


def test_a_plan_with_an_artifact_store_passes_it_on_checked(saves, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_study("wide", LAUNCH, SPACE, "sqlite:///x.db", " relative/store ")
    # a folder as its absolute path: the workers start elsewhere, and the study records it for other machines
    assert tune_args(plan)["artifacts"] == plan.artifacts == str((tmp_path / "relative" / "store").resolve())
    assert tune_args(plan_study("wide", LAUNCH, SPACE, "sqlite:///x.db", "s3://bucket/prefix/"))["artifacts"] \
        == "s3://bucket/prefix"
    assert plan_study("wide", LAUNCH, SPACE, "sqlite:///x.db", "  ").artifacts is None     # empty: none
    assert "--artifacts" not in plan_study("wide", LAUNCH, SPACE, "sqlite:///x.db").args
    with pytest.raises(ConfigError, match=r"artifact store 's3://': name a bucket"):
        plan_study("wide", LAUNCH, SPACE, "sqlite:///x.db", "s3://")


def test_launch_refuses_an_artifact_store_it_cannot_write(saves, tmp_path, monkeypatch):
    monkeypatch.setattr(tuneform, "launch_study", lambda *args: pytest.fail("launched"))
    (tmp_path / "taken").write_text("a file where the store's folder would go")
    url = f"sqlite:///{saves / 'optuna.db'}"
    plan = plan_study("wide", LAUNCH, SPACE, url, str(tmp_path / "taken"))
    with pytest.raises(ConfigError, match="cannot make the artifact store folder"):
        tuneform.launch(plan, make_storage(url))
    assert not (saves / "studies").exists()


def test_launch_writes_the_space_and_starts_the_planned_command(saves, monkeypatch):
    started = []
    monkeypatch.setattr(tuneform, "launch_study", lambda *args: started.append(args))
    url = f"sqlite:///{saves / 'optuna.db'}"
    plan = plan_study("wide", LAUNCH, SPACE, url)
    tuneform.launch(plan, make_storage(url))
    assert json.loads((saves / "studies" / "wide" / "space.json").read_text()) == SPACE
    assert started == [(plan.args, "wide", url)]


def test_launch_refuses_a_storage_it_cannot_write(saves, tmp_path, monkeypatch):
    monkeypatch.setattr(tuneform, "launch_study", lambda *args: pytest.fail("launched"))
    path = tmp_path / "studies.db"
    make_storage(f"sqlite:///{path}")
    url = f"sqlite:///file:{path}?mode=ro&uri=true"
    with pytest.raises(ConfigError, match="attempt to write a readonly database"):
        tuneform.launch(plan_study("wide", LAUNCH, SPACE, url), make_storage(url, heartbeat=False))
    assert not (saves / "studies").exists()
