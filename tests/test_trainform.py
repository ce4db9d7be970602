"""The Train page's form without Streamlit: a widget for every config field, the config the widgets make,
the command line that trains the same config, Start, and the comparison of the recurrent cells."""
import shlex
from dataclasses import fields
from types import SimpleNamespace

import pytest

from lstm_core.__main__ import build_parser, config_from_args
from lstm_core.config import BOUNDS, CELLS, CHOICES, PRESETS, ConfigError, TrainConfig, preset
from lstm_core.runs import RunError, create_run, list_runs
from app import trainform
from app.trainform import (ADVANCED, COMMON, cell_configs, field_input, form_config, parameter_count,
                           start_comparison, train_command)

DEVICES = [SimpleNamespace(name="cpu", label="2 cores")]      # what field_input reads of available_devices()


def test_every_field_has_one_widget_once():
    assert sorted(COMMON + ADVANCED) == sorted(f.name for f in fields(TrainConfig))
    for name, value in preset("default").to_dict().items():
        ask = field_input(name, value, DEVICES)
        assert ask.kind in ("selectbox", "toggle", "number_input", "slider") and ask.label


@pytest.mark.parametrize("name", [f.name for f in fields(TrainConfig)])
def test_each_preset_value_is_within_its_widget(name):
    for preset_name in PRESETS:
        value = getattr(preset(preset_name), name)
        ask = field_input(name, value, DEVICES)
        if ask.kind == "selectbox":
            assert value in ask.args["options"]
        elif ask.kind in ("slider", "number_input"):
            assert ask.args["min_value"] <= value <= ask.args["max_value"]
            low, high = BOUNDS[name]
            assert low <= ask.args["min_value"] and ask.args["max_value"] <= max(high, value)


def test_widgets_by_kind_of_field():
    assert field_input("optimizer", "adam", DEVICES).args["options"] == CHOICES["optimizer"]
    assert field_input("bidirectional", False, DEVICES).kind == "toggle"
    lr = field_input("lr", 1e-3, DEVICES)
    assert (lr.kind, lr.label, lr.args["format"]) == ("number_input", "learning rate", "%.2e")
    seed = field_input("seed", 0, DEVICES)
    assert seed.kind == "number_input" and seed.args["step"] == 1 and "format" not in seed.args
    hidden = field_input("hidden_size", 128, DEVICES)
    assert hidden.kind == "slider"
    assert (hidden.args["min_value"], hidden.args["max_value"], hidden.args["step"]) == (1, 1024, 1)
    assert field_input("dropout", 0.1, DEVICES).args["step"] == 0.01


def test_a_value_beyond_a_sliders_range_widens_it():
    assert field_input("hidden_size", 2048, DEVICES).args["max_value"] == 2048


def test_the_device_picker_offers_auto_the_devices_here_and_a_value_from_elsewhere():
    ask = field_input("device", "cuda:3", DEVICES)
    assert ask.args["options"] == ["auto", "cpu", "cuda:3"]
    label = ask.args["format_func"]
    assert (label("auto"), label("cpu"), label("cuda:3")) == ("auto (best available)", "cpu — 2 cores",
                                                              "cuda:3 (not available here)")


def test_form_config_is_the_config_or_why_not():
    values = preset("default").to_dict()
    assert form_config(values) == (preset("default"), None)
    config, problem = form_config({**values, "limit_train": 100, "batch_size": 256})
    assert config is None and "limit_train (100) must be at least batch_size (256)" in problem


@pytest.mark.parametrize("preset_name, changes", [
    ("default", {}),
    ("default", {"hidden_size": 64, "bidirectional": True, "lr": 0.002, "seq_mode": "pixels"}),
    ("bilstm", {"bidirectional": False, "weight_decay": 3.5e-6, "device": "cpu", "aug_rotate": 0.0}),
    ("cnn", {"epochs": 2, "optimizer": "sgd", "momentum": 0.95}),
])
def test_the_command_trains_the_same_config(preset_name, changes):
    config = preset(preset_name).replace(**changes)
    command = train_command(config, preset_name)
    argv = shlex.split(command)
    assert argv[:6] == ["python", "-m", "lstm_core", "train", "--preset", preset_name]
    assert config_from_args(build_parser().parse_args(argv[3:])) == config
    assert len(argv) == 6 + sum(1 if isinstance(v, bool) else 2 for v in changes.values())


def test_the_command_names_flags_as_the_cli_does():
    command = train_command(preset("bilstm").replace(bidirectional=False, limit_train=1000), "bilstm")
    assert command.endswith("--no-bidirectional --limit-train 1000")


def test_the_parameter_count_is_the_models():
    # one layer: 4 gates x (input + hidden + 2 biases) x hidden, then the head
    assert parameter_count(preset("default")) == 4 * 128 * (28 + 128 + 2) + 128 * 10 + 10
    bigger = preset("default").replace(num_layers=2)
    assert parameter_count(bigger) - parameter_count(preset("default")) == 4 * 128 * (128 + 128 + 2)


def test_the_cell_is_asked_beside_the_arch_with_what_each_one_does():
    assert COMMON.index("cell") == COMMON.index("arch") + 1
    ask = field_input("cell", "lstm", DEVICES)
    assert (ask.kind, ask.label, ask.args["options"]) == ("selectbox", "recurrent cell", CELLS)
    assert all(f"{cell}: " in ask.args["help"] for cell in CELLS) and "Le et al. 2015" in ask.args["help"]
    forget = field_input("forget_init", "auto", DEVICES).args["help"]
    assert "LSTM's forget gate" in forget and "GRU's update gate" in forget and "plain RNN has none" in forget


def test_the_comparison_changes_the_cell_alone():
    config = preset("pixel").replace(seed=7, hidden_size=64)
    configs = cell_configs(config)
    assert [c.cell for c in configs] == ["lstm", "gru", "rnn"]
    for each in configs:
        assert {**each.to_dict(), "cell": config.cell} == config.to_dict()
    with pytest.raises(ConfigError, match="recurrent cells"):
        cell_configs(preset("cnn"))


def fake_launch(saves, refuse_from: int = 99):
    """launch_training without a process: a queued run, the first on the CPU, the next ones waiting;
    from the `refuse_from`-th on, the saves folder refuses the run."""
    launched = []

    def launch(config):
        if len(launched) >= refuse_from:
            raise RunError("the saves folder is full")
        run = create_run(config, saves)
        run.write_status(device=None if launched else "cpu")
        launched.append(run)
        return run
    return launch


def test_start_comparison_launches_one_run_per_cell_and_says_where_each_is(saves, monkeypatch):
    monkeypatch.setattr(trainform, "launch_training", fake_launch(saves))
    runs, notice = start_comparison(preset("default").replace(bidirectional=True))
    assert [run.config().cell for run in runs] == ["lstm", "gru", "rnn"]
    first, second, third = (run.id for run in runs)
    assert notice == (f"Comparing BiLSTM, BiGRU, BiRNN: {first} (BiLSTM) on cpu; {second} (BiGRU) queued; "
                      f"{third} (BiRNN) queued. A queued run starts when its device is free.")


def test_a_comparison_refused_at_its_first_run_leaves_none_and_a_later_refusal_names_those_started(saves,
                                                                                                  monkeypatch):
    monkeypatch.setattr(trainform, "launch_training", fake_launch(saves, refuse_from=0))
    with pytest.raises(RunError, match="^the saves folder is full$"):
        start_comparison(preset("default"))
    assert list_runs() == []
    monkeypatch.setattr(trainform, "launch_training", fake_launch(saves, refuse_from=2))
    with pytest.raises(RunError) as refused:
        start_comparison(preset("default"))
    started = [row["id"] for row in reversed(list_runs())]
    assert len(started) == 2
    assert str(refused.value) == (f"only part of the comparison started: {started[0]} (LSTM), {started[1]} (GRU) "
                                  "train on, but the RNN run could not start: the saves folder is full")
