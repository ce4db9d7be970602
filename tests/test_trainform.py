"""The Train page's form without Streamlit: a widget for every config field, the config the widgets make,
the command line that trains the same config, and Start."""
import shlex
from dataclasses import fields
from types import SimpleNamespace

import pytest

from lstm_core.__main__ import build_parser, config_from_args
from lstm_core.config import BOUNDS, CHOICES, PRESETS, TrainConfig, preset
from app.trainform import ADVANCED, COMMON, field_input, form_config, parameter_count, train_command

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
