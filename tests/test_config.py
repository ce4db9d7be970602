import json

import pytest

from lstm_core.config import PRESETS, ConfigError, TrainConfig, from_dict, preset, read_mapping


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": -5}, "hidden_size must be between 1 and 4096, got -5"),
    ({"dropout": 1.5}, "dropout must be between 0 and 0.9, got 1.5"),
    ({"lr": 0.0}, "lr must be between"),
    ({"optimizer": "adagrad"}, "optimizer must be one of adam, adamw, sgd, rmsprop"),
    ({"seq_mode": "columns"}, "seq_mode must be one of rows, pixels, permuted"),
    ({"scheduler": "step"}, "scheduler must be one of"),
    ({"device": "tpu"}, "device must be auto, cpu, cuda, cuda:N or mps"),
    ({"hidden_size": 12.5}, "hidden_size must be a whole number"),
    ({"hidden_size": True}, "hidden_size must be a whole number"),
    ({"bidirectional": "yes"}, "bidirectional must be true or false"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"lr": float("nan")}, "lr must be a number"),
    ({"limit_train": 50, "batch_size": 128}, "limit_train (50) must be at least batch_size (128)"),
    ({"val_size": 30000, "limit_train": 40000}, "val_size (30000) leaves too few"),
])
def test_invalid_values_name_the_field_range_and_value(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**changes)


def test_every_preset_is_valid_and_round_trips_through_json():
    assert set(PRESETS) == {"default", "tutorial", "bilstm", "pixel", "gru", "rnn", "cnn", "best"}
    for cfg in PRESETS.values():
        assert TrainConfig.from_json(cfg.to_json()) == cfg
        assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_presets_follow_their_recipes():
    t = preset("tutorial")
    assert (t.num_layers, t.hidden_size, t.dropout, t.optimizer, t.lr, t.weight_decay, t.batch_size, t.patience) == \
        (3, 95, 0.47, "adam", 1e-3, 5.36e-6, 96, 10)
    b = preset("bilstm")
    assert b.bidirectional and (b.num_layers, b.hidden_size, b.optimizer, b.scheduler) == (2, 128, "adamw", "plateau")
    assert b.aug_rotate > 0 and b.aug_translate > 0
    p = preset("pixel")
    assert p.seq_shape == (784, 1) and (p.hidden_size, p.optimizer, p.grad_clip, p.batch_size) == (128, "adam", 1.0, 100)
    assert preset("cnn").arch == "cnn"
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        preset("fast")


def test_config_is_frozen_and_replace_validates():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0
    assert cfg.replace(hidden_size=64).hidden_size == 64
    with pytest.raises(ConfigError, match="num_layers"):
        cfg.replace(num_layers=0)


def test_from_dict_refuses_unknown_keys_and_accepts_ints_for_floats():
    with pytest.raises(ConfigError, match="unknown config key 'hidden'"):
        from_dict({"hidden": 5})
    with pytest.raises(ConfigError, match="must be a mapping"):
        from_dict([1, 2])
    assert from_dict({"lr": 1}).lr == 1.0


def test_config_files_read_as_json_and_toml_and_malformed_ones_are_named(tmp_path):
    (tmp_path / "a.json").write_text('{"hidden_size": 64, "bidirectional": true}')
    (tmp_path / "b.toml").write_text('hidden_size = 48\noptimizer = "sgd"\n')
    (tmp_path / "bad.json").write_text('{"hidden_size": 64,')
    (tmp_path / "bad.toml").write_text('hidden_size = = 4')
    assert from_dict(read_mapping(tmp_path / "a.json")).bidirectional
    assert from_dict(read_mapping(tmp_path / "b.toml")).optimizer == "sgd"
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_mapping(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_mapping(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_mapping(tmp_path / "missing.json")
