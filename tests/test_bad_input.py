"""Bad input, one clear message per case, never a traceback, and nothing written.

- CLI flags out of range, of the wrong type, unknown or conflicting (train and tune): exit status 2
- config files (--config): malformed JSON or TOML, empty, unknown keys, wrong types, values out of range,
  unreadable; search-space files (tune --space)
- checkpoints: corrupt, truncated, empty, of another architecture or format, and pickles with a payload
  (refused by weights_only=True, never executed)
- run ids and study names with '../', '/' or absolute paths: user input never picks a path outside the
  saves root
- uploads: not images, corrupt, empty, decompression bombs (refused by pixel count before decoding)
- study storage URLs that cannot be reached, and storages that can be read but not written
- search spaces that would make every trial fail (a zero step, a step beyond the range, a choice or range
  end the config refuses, unknown keys, ranges on text or true/false fields): refused before any trial
- more workers than the cores and memory run at once (unless --force-workers), an absent device for tune
- saves roots that are a file or cannot be written, for every command and in the app
- flags that do not apply to the chosen architecture (LSTM-only flags with a CNN)
- the pages (AppTest): the Tuning, Draw and Train pages show the problem with st.error and work again once
  the input is fixed

The CLI runs in-process (`lstm_core.__main__.main`); one subprocess case proves the real command exits 2
with a single stderr line.
"""
import os
import pickle
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import ImageFile
from streamlit.testing.v1 import AppTest

from conftest import REPO, tiny_config
from lstm_core.checkpoints import CHECKPOINT_FORMAT, load_model
from lstm_core.config import ConfigError, TrainConfig
from lstm_core.jobs import request_study_stop
from lstm_core.models import build_model
from lstm_core.preprocess import ImageError, decode_image
from lstm_core.runs import RunError, create_run, open_run, safe_name, study_dir
from lstm_core.storage import make_storage
from lstm_core.tune import open_study, study_summaries
from test_preprocess import png

UNREACHABLE_SERVER = "postgresql+psycopg2://nobody@127.0.0.1:9/none"   # port 9 (discard): nothing listens


def refused(result, message: str) -> None:
    code, err, _ = result
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err      # one line, not argparse's usage dump


# -- CLI flags -----------------------------------------------------------------------------------
BAD_FLAGS = [
    (["train", "--hidden-size", "-5"], "hidden_size must be between 1 and 4096, got -5"),
    (["train", "--hidden-size", "abc"], "argument --hidden-size: invalid int value: 'abc'"),
    (["train", "--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (["train", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["train", "--seq-mode", "columns"], "invalid choice: 'columns'"),
    (["train", "--preset", "turbo"], "invalid choice: 'turbo'"),
    (["train", "--dropout", "2"], "dropout must be between 0 and 0.9, got 2.0"),
    (["train", "--batch-size", "0"], "batch_size must be between 1 and 8192, got 0"),
    (["train", "--device", "cuda:7"], "device 'cuda:7' was asked for"),
    (["train", "--device", "tpu"], "device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
    (["train", "--limit-train", "10"], "limit_train (10) must be at least batch_size (256)"),
    (["train", "--unknown-flag"], "unrecognized arguments: --unknown-flag"),
    (["train", "--run-dir", "somewhere", "--epochs", "3"],
     "--run-dir trains the config stored in the run; drop --epochs"),
    (["fly"], "argument command: invalid choice: 'fly'"),
    ([], "the following arguments are required: command"),
    (["tune"], "the following arguments are required: --study"),
    (["tune", "--study", "x", "--trials", "0"], "--trials and --workers must be at least 1"),
    (["tune", "--study", "x", "--workers", "0"], "--trials and --workers must be at least 1"),
    (["tune", "--study", "x", "--timeout", "-5"], "and --timeout positive"),
    (["tune", "--study", "x", "--sampler", "grid"], "invalid choice: 'grid'"),
    (["tune", "--study", "x", "--hidden-size", "0"], "hidden_size must be between 1 and 4096, got 0"),
    (["tune", "--study", "x", "--device", "cuda:7"], "device 'cuda:7' was asked for"),
    (["tune", "--study", "x", "--workers", "100000"], "--workers 100000 is more than this machine runs at once"),
    (["train", "--preset", "cnn", "--seq-mode", "pixels", "--bidirectional", "--hidden-size", "7"],
     "--seq-mode, --hidden-size, --bidirectional only apply to recurrent models (LSTM, GRU, RNN), and this config trains a CNN"),
    (["tune", "--study", "x", "--arch", "cnn", "--num-layers", "2"], "--num-layers only apply to recurrent models"),
    (["evaluate", "/some/missing/best.pt"], "no such file or run directory: /some/missing/best.pt"),
]


@pytest.mark.parametrize("args, message", BAD_FLAGS, ids=[" ".join(args) or "no-command" for args, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_message_and_write_nothing(cli, saves, args, message):
    refused(cli(*args), message)
    assert not any(saves.iterdir())


def test_the_real_command_exits_2_with_one_line_and_no_traceback(saves):
    result = subprocess.run([sys.executable, "-m", "lstm_core", "train", "--hidden-size", "-5"], cwd=REPO,
                            env={**os.environ, "LSTM_SAVES": str(saves)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: hidden_size must be between 1 and 4096, got -5\n" and not result.stdout
    assert not any(saves.iterdir())


# -- config and search-space files -------------------------------------------------------------------
BAD_CONFIG_FILES = [
    ("cut.json", '{"hidden_size": 64,', "is not valid JSON"),
    ("empty.json", "", "is not valid JSON: Expecting value: line 1 column 1"),
    ("typo.json", '{"hiden_size": 64}', "unknown config key 'hiden_size'; known keys: "),
    ("type.json", '{"hidden_size": "big"}', "hidden_size must be a whole number, got 'big'"),
    ("range.json", '{"dropout": 5}', "dropout must be between 0 and 0.9, got 5.0"),
    ("list.json", "[1, 2]", "must hold an object of field names to values"),
    ("cut.toml", "hidden_size = \n", "is not valid TOML"),
    ("type.toml", 'bidirectional = "yes"\n', "bidirectional must be true or false, got 'yes'"),
    ("binary.json", b"\xff\xfe\x00 not text", "cannot read config file"),
    ("folder.json", None, "Is a directory"),                   # None: a directory where the file should be
    ("missing.json", ..., "cannot read config file"),          # ...: no file at all
]


@pytest.mark.parametrize("name, content, message", BAD_CONFIG_FILES, ids=[name for name, *_ in BAD_CONFIG_FILES])
def test_bad_config_files_exit_2(cli, saves, tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not ...:
        path.write_text(content)
    refused(cli("train", "--config", path), message)
    assert not any(saves.iterdir())


@pytest.mark.parametrize("space, message", [
    ('{"hidden": {"type": "int", "low": 1, "high": 2}}', "'hidden' is not a TrainConfig field"),
    ('{"lr": {"type": "float", "low": 0, "high": 1, "log": true}}', "lr is log-scaled, so low must be > 0"),
    ('{"lr": {"type": "float", "low": 1, "high": 0.1}}', "lr needs numbers low <= high"),
    ('{"hidden_size": {"type": "int", "low": 1.5, "high": 4}}', "hidden_size is an int range, got 1.5..4"),
    ('{"lr": {"type": "bogus"}}', "lr needs a type of float, int or categorical"),
    ('{"optimizer": {"type": "categorical", "choices": []}}', "optimizer needs a non-empty list of choices"),
    ("{}", "a search space must be a non-empty mapping"),
    ('{"lr": ', "is not valid JSON"),
    # spaces that made every trial fail, hundreds a minute: refused before any trial
    ('{"hidden_size": {"type": "int", "low": 8, "high": 16, "step": 0}}', "hidden_size's step must be a number above 0"),
    ('{"hidden_size": {"type": "int", "low": 8, "high": 16, "step": 100}}',
     "hidden_size's step 100 is larger than its range 8..16: it would sample one value only"),
    ('{"optimizer": {"type": "categorical", "choices": ["lion"]}}', "with optimizer = 'lion': optimizer must be one of"),
    ('{"seq_mode": {"type": "categorical", "choices": ["rows", "columns"]}}', "with seq_mode = 'columns'"),
    ('{"hidden_size": {"type": "categorical", "choices": [64, 0]}}', "with hidden_size = 0: hidden_size must be between"),
    ('{"dropout": {"type": "float", "low": 0.1, "high": 2}}', "with dropout = 2: dropout must be between 0 and 0.9"),
    ('{"batch_size": {"type": "int", "low": 64, "high": 2048}}',
     "with batch_size = 2048: limit_train (1000) must be at least batch_size (2048)"),
    ('{"hidden_size": {"type": "int", "low": 8, "high": 16, "stp": 2}}', "hidden_size has an unknown key 'stp'"),
    ('{"hidden_size": {"type": "float", "low": 8, "high": 16}}', "hidden_size takes whole numbers or choices"),
    ('{"bidirectional": {"type": "int", "low": 0, "high": 1}}', "bidirectional is not a number: search it with choices"),
    ('{"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": true, "step": 1e-4}}',
     "lr cannot be log-scaled and stepped at once"),
    ('{"lr": {"type": "float", "low": NaN, "high": 1}}', "lr needs numbers low <= high"),
    ('{"lr": {"type": "float", "low": 0.1, "high": 1, "log": "yes"}}', "lr's log must be true or false"),
    ('{"hidden_size": {"type": "int", "low": 8, "high": 16, "step": 2.5}}', "so its step must be whole"),
], ids=["unknown-field", "log-from-zero", "low-above-high", "fractional-int", "unknown-type", "no-choices", "empty",
        "cut-json", "step-zero", "step-beyond-range", "refused-choice", "refused-text-choice", "choice-out-of-bounds",
        "range-end-out-of-bounds", "range-beyond-limit-train", "unknown-key", "float-range-on-int", "range-on-bool",
        "log-and-step", "nan", "log-not-bool", "fractional-step"])
def test_bad_search_spaces_are_refused(cli, saves, tmp_path, space, message):
    (tmp_path / "space.json").write_text(space)
    refused(cli("tune", "--study", "x", "--space", tmp_path / "space.json", "--limit-train", "1000"), message)
    assert not any(saves.iterdir())                      # no study, no trial, no folder


# -- paths: run ids, study names, files named on the command line ------------------------------------
@pytest.mark.parametrize("name", ["../etc", "/etc/passwd", "a/b", "..", "", "x" * 200, "run\x00"],
                         ids=["dotdot", "absolute", "slash", "parent", "empty", "too-long", "nul"])
def test_run_ids_cannot_leave_the_saves_root(tmp_path, name):
    with pytest.raises(RunError, match="invalid run id"):
        safe_name(name)
    with pytest.raises(RunError, match="invalid run id"):
        open_run(name, tmp_path)


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "", "ok/../../up"],
                         ids=["dotdot", "absolute", "slash", "parent", "empty", "inner-dotdot"])
def test_study_names_cannot_leave_the_saves_root(saves, name):
    for use in (lambda: study_dir(name, saves), lambda: request_study_stop(name, saves),
                lambda: open_study(name, f"sqlite:///{saves / 'optuna.db'}")):
        with pytest.raises(RunError, match=r"invalid study name .*no '/', no '\.\.'"):
            use()
    assert not any(saves.iterdir()) and [p.name for p in saves.parent.iterdir()] == ["saves"]   # not even a db


@pytest.mark.parametrize("args, message", [
    (["evaluate", "../escape"], "invalid run id '../escape'"),
    (["evaluate", "nope"], "no run 'nope' in "),
    (["evaluate", "."], "is not a run directory (no config.json)"),       # an existing folder, not a run
    (["train", "--resume", "../x"], "invalid run id '../x'"),
    (["tune", "--study", "../escape"], "invalid study name '../escape'"),
    (["tune", "--study", "/tmp/abs"], "invalid study name '/tmp/abs'"),
    (["tune", "--study", "a/b"], "invalid study name 'a/b'"),
], ids=["evaluate-dotdot", "evaluate-unknown-id", "evaluate-not-a-run", "resume-dotdot", "study-dotdot",
        "study-absolute", "study-slash"])
def test_the_cli_refuses_bad_paths_and_still_works(cli, saves, args, message):
    refused(cli(*args), message)
    code, _, out = cli("runs")                   # the same saves root afterwards: still usable, still empty
    assert code == 0 and "no runs yet" in out and not any(saves.iterdir())


# -- checkpoints -------------------------------------------------------------------------------------
def untrained_checkpoint(config: TrainConfig) -> dict:
    """A checkpoint of this project's format with fresh weights: what loading needs, without training."""
    return {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "model": build_model(config).state_dict()}


class Payload:
    """Unpickling this runs `touch marker`: what a hostile checkpoint does to torch.load(weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_checkpoint(kind: str, path, marker) -> None:
    good = untrained_checkpoint(tiny_config())
    if kind in ("truncated", "good"):
        torch.save(good, path)
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
    elif kind == "corrupt":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "payload-torch":                            # the realistic attack: a torch.save file
        torch.save({**good, "model": Payload(marker)}, path)
    elif kind == "payload-pickle":                           # a bare pickle, as torch's legacy format reads it
        path.write_bytes(pickle.dumps({"config": good["config"], "model": Payload(marker)}, protocol=2))
    elif kind == "foreign":
        torch.save({"weights": torch.ones(1)}, path)
    elif kind == "other-arch":                               # LSTM weights under a CNN config
        torch.save({**good, "config": TrainConfig(arch="cnn").to_dict()}, path)
    elif kind == "other-size":
        torch.save({**good, "config": tiny_config(hidden_size=64).to_dict()}, path)
    elif kind == "bad-config":
        torch.save({**good, "config": {**good["config"], "hidden_size": -1}}, path)
    elif kind == "newer-format":
        torch.save({**good, "format": CHECKPOINT_FORMAT + 1}, path)


BAD_CHECKPOINTS = [
    ("corrupt", "is not a readable checkpoint (corrupt, or not a file written by torch.save)"),
    ("truncated", "is not a readable checkpoint"),
    ("empty", "is not a readable checkpoint (the file is empty or cut short)"),
    ("payload-torch", "refused, nothing in it was run: it holds Python objects besides tensors "
                      "and plain values: Trying to load unsupported GLOBAL"),
    ("payload-pickle", "refused, nothing in it was run: it holds Python objects besides tensors "
                       "and plain values: Trying to load unsupported GLOBAL"),
    ("foreign", "is not an LSTM Studio checkpoint (no config and model inside)"),
    ("other-arch", "the weights do not fit the cnn model its config describes"),
    ("other-size", "the weights do not fit the lstm model its config describes"),
    ("bad-config", "holds an invalid config: hidden_size must be between 1 and 4096, got -1"),
    ("newer-format", f"was written by a newer LSTM Studio (format {CHECKPOINT_FORMAT + 1})"),
    ("missing", "no checkpoint at"),
]


@pytest.mark.parametrize("kind, message", BAD_CHECKPOINTS, ids=[kind for kind, _ in BAD_CHECKPOINTS])
def test_bad_checkpoints_are_refused_and_never_executed(tmp_path, kind, message):
    path, marker = tmp_path / f"{kind}.pt", tmp_path / "pwned"
    write_checkpoint(kind, path, marker)
    with pytest.raises(RunError) as refusal:
        load_model(path)
    assert message in str(refusal.value)
    assert "weights_only" not in str(refusal.value)      # torch's advice to load it unsafely is not passed on
    assert not marker.exists()                           # the payload never ran


def test_a_good_checkpoint_loads_so_the_refusals_above_are_about_the_files(tmp_path):
    write_checkpoint("good", tmp_path / "good.pt", None)
    model, config = load_model(tmp_path / "good.pt")
    assert config == tiny_config() and not model.training


def test_the_cli_refuses_a_junk_checkpoint(cli, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    refused(cli("evaluate", tmp_path / "junk.pt"), "junk.pt is not a readable checkpoint")


# -- uploads -----------------------------------------------------------------------------------------
def png_header_only(width: int, height: int, idat: bytes = zlib.compress(b"\x00" * 16)) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of (or broken) image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", idat) + chunk(b"IEND", b"")


NOISE = png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
TRUNCATED_PNG = NOISE[:len(NOISE) // 2]      # cut inside the image data (PIL forgives a missing end chunk)


@pytest.mark.parametrize("data, message", [
    (b"", "the file is empty"),
    (b"hello, I am not an image", "not an image PIL can read"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not an image PIL can read"),
    (TRUNCATED_PNG, "corrupt or truncated"),
    (png_header_only(64, 64, idat=b"garbage"), "corrupt or truncated"),
    (png_header_only(8000, 8000), "the image is 8000x8000 pixels; the limit is 40,000,000 pixels"),   # ours
    (png_header_only(100_000, 100_000), "far too many pixels; the limit is 40,000,000 pixels"),      # PIL's
], ids=["empty", "text", "svg", "truncated", "corrupt-data", "too-large", "bomb"])
def test_bad_uploads_are_refused_with_a_clear_message(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_a_50000_pixel_square_png_is_refused_from_its_header(monkeypatch):
    """2.5 gigapixels would need 2.5 GB to decode: the header alone must refuse it."""
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    started = time.perf_counter()
    with pytest.raises(ImageError, match="limit is 40,000,000 pixels"):
        decode_image(png_header_only(50_000, 50_000))
    assert time.perf_counter() - started < 1.0 and decoded == []


# -- storage -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, message", [
    (UNREACHABLE_SERVER, 'port 9 failed: Connection refused'),
    ("sqlite:////no/such/folder/optuna.db", "unable to open database file"),
    ("mysql://nobody@127.0.0.1:9/none", "the URL's database driver is not installed (No module named 'MySQLdb')"),
    ("nonsense://", "Can't load plugin: sqlalchemy.dialects:nonsense"),
], ids=["unreachable-server", "missing-folder", "driver-not-installed", "unknown-scheme"])
def test_an_unreachable_storage_is_a_clear_error(cli, saves, url, message):
    # in-process, pytest collects optuna's heartbeat deprecation warnings; the real command prints them too
    started = time.perf_counter()
    for open_it in (make_storage, study_summaries):          # the CLI's and the Tuning page's way in
        with pytest.raises(ConfigError) as refusal:
            open_it(url)
        assert f"cannot open the study storage {url!r}" in str(refusal.value) and message in str(refusal.value)
    refused(cli("tune", "--study", "x", "--storage", url), f"cannot open the study storage {url!r}")
    assert time.perf_counter() - started < 30 and not (saves / "studies").exists()


def test_a_storage_that_cannot_be_written_is_one_line_naming_the_file(cli, saves, tmp_path):
    path = tmp_path / "studies.db"
    make_storage(f"sqlite:///{path}")                        # a real storage, tables and all
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"    # what a read-only file or mount gives this process
    refused(cli("tune", "--study", "x", "--storage", read_only),
            f"cannot write the study storage file {path}: attempt to write a readonly database")
    assert not (saves / "studies").exists()


# -- where runs are saved ----------------------------------------------------------------------------
SAVES_COMMANDS = [["train", "--epochs", "1"], ["tune", "--study", "x"], ["runs"], ["evaluate", "some-run"]]


@pytest.mark.parametrize("args", SAVES_COMMANDS, ids=[a[0] for a in SAVES_COMMANDS])
def test_a_saves_root_that_is_a_file_is_refused_by_every_command(cli, tmp_path, args):
    file = tmp_path / "saves.txt"
    file.write_text("not a folder")
    refused(cli(*args, "--saves", file), f"the saves folder {file} is a file, not a folder")
    assert file.read_text() == "not a folder"


def sysfs_refuses_files() -> bool:
    try:
        os.close(os.open("/sys/kernel/lstm-probe", os.O_CREAT | os.O_WRONLY))
    except OSError:
        return True
    os.unlink("/sys/kernel/lstm-probe")
    return False


@pytest.mark.skipif(not sysfs_refuses_files(), reason="needs a /sys that refuses new files")
@pytest.mark.parametrize("args", SAVES_COMMANDS[:2], ids=[a[0] for a in SAVES_COMMANDS[:2]])
def test_a_saves_root_that_cannot_be_written_is_refused_before_anything_starts(cli, args):
    """sysfs refuses new files even to root: a folder this process cannot write into, as a read-only mount is."""
    code, err, _ = cli(*args, "--saves", "/sys/kernel")
    assert code == 2 and err.startswith("error: cannot write to the saves folder /sys/kernel: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_app_shows_a_bad_saves_root_in_the_clis_words(tmp_path, monkeypatch):
    file = tmp_path / "saves.txt"
    file.write_text("")
    monkeypatch.setenv("LSTM_SAVES", str(file))
    at = no_traceback(AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run())
    assert f"the saves folder {file} is a file, not a folder" in errors(at)


# -- the pages ---------------------------------------------------------------------------------------
def open_page(name: str) -> AppTest:
    return no_traceback(AppTest.from_file(str(REPO / "pages" / name), default_timeout=120).run())


def no_traceback(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def errors(at: AppTest) -> str:
    return " | ".join(e.value for e in at.error)


def button(at: AppTest, label: str):
    (found,) = [b for b in at.button if b.label == label]
    return found


@pytest.mark.parametrize("url", [UNREACHABLE_SERVER, "sqlite:////no/such/folder/optuna.db", "not a url"],
                         ids=["unreachable-server", "missing-folder", "not-a-url"])
def test_the_tuning_page_shows_an_unreachable_storage_and_recovers(saves, url):
    at = open_page("tuning.py")
    default = at.text_input(key="tune_storage").value
    no_traceback(at.text_input(key="tune_storage").set_value(url).run())
    assert f"cannot open the study storage {url!r}" in errors(at)
    assert button(at, "Launch study").disabled and not at.get("plotly_chart")
    no_traceback(at.text_input(key="tune_storage").set_value(default).run())
    assert not at.error and not button(at, "Launch study").disabled
    assert any("No studies in this storage yet" in i.value for i in at.info)


def test_the_tuning_page_refuses_to_launch_into_a_storage_it_cannot_write(saves, tmp_path):
    path = tmp_path / "studies.db"
    make_storage(f"sqlite:///{path}")
    at = open_page("tuning.py")
    no_traceback(at.text_input(key="tune_storage").set_value(f"sqlite:///file:{path}?mode=ro&uri=true").run())
    assert not at.error                                          # reading it is fine
    no_traceback(button(at, "Launch study").click().run())
    assert f"cannot write the study storage file {path}: attempt to write a readonly database" in errors(at)
    assert not (saves / "studies").exists()                     # nothing launched, nothing written


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b"], ids=["dotdot", "absolute", "slash"])
def test_the_tuning_page_refuses_a_study_name_that_leaves_the_saves_root(saves, name):
    at = no_traceback(open_page("tuning.py").text_input(key="tune_name").set_value(name).run())
    assert f"invalid study name {name!r}" in errors(at) and button(at, "Launch study").disabled
    no_traceback(at.text_input(key="tune_name").set_value("fine-name").run())
    assert not at.error and not button(at, "Launch study").disabled
    assert not (saves / "studies").exists() and sorted(p.name for p in saves.parent.iterdir()) == ["saves"]


def test_the_tuning_page_explains_a_range_that_makes_an_invalid_config(saves):
    at = no_traceback(open_page("tuning.py").number_input(key="tune_limit_train").set_value(300).run())
    assert not at.error                               # the preset's batches of 256 fit in 300 images
    at.slider(key="tune_space_batch_size").set_value((64, 512))
    no_traceback(at.run())
    assert "with batch_size = 512" in errors(at) and "limit_train (300) must be at least batch_size" in errors(at)
    assert button(at, "Launch study").disabled
    no_traceback(at.number_input(key="tune_limit_train").set_value(10000).run())
    assert not at.error and not button(at, "Launch study").disabled


def test_the_train_page_explains_an_invalid_combination_and_recovers(saves):
    at = open_page("train.py")
    at.slider(key="batch_size").set_value(256)
    no_traceback(at.number_input(key="limit_train").set_value(100).run())
    assert "limit_train (100) must be at least batch_size (256)" in errors(at)
    assert button(at, "Start training").disabled
    no_traceback(at.number_input(key="limit_train").set_value(0).run())
    assert not at.error and not button(at, "Start training").disabled


@pytest.fixture
def a_model(saves):
    """A saves root with one model the Draw page can use: fresh weights, marked completed (no training)."""
    run = create_run(tiny_config(), saves)
    torch.save(untrained_checkpoint(tiny_config()), run.best_path)
    run.write_status(state="completed")
    return run


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    return no_traceback(at.file_uploader(key="draw_upload").set_value((name, data, "image/png")).run())


def prediction_charts(at: AppTest) -> list:
    return [c for c in at.get("plotly_chart") if c.proto.id.endswith("-upload_probs")]


@pytest.mark.parametrize("name, data, message", [
    ("hello.png", b"hello", "not an image"),
    ("truncated.png", TRUNCATED_PNG, "corrupt or truncated"),
    ("empty.png", b"", "empty"),
    ("bomb.png", png_header_only(50_000, 50_000), "limit is 40,000,000 pixels"),
], ids=["not-an-image", "truncated", "empty", "bomb"])
def test_the_draw_page_shows_a_bad_upload_and_takes_a_good_one_next(a_model, name, data, message):
    at = upload(open_page("draw.py"), name, data)
    (error,) = at.error
    assert f"Cannot read {name}: " in error.value and message in error.value
    assert not prediction_charts(at)
    one = np.zeros((28, 28), np.uint8)
    one[4:24, 13:16] = 255                                   # a "1": any model reads something from it
    upload(at, "one.png", png(one))
    assert not at.error and prediction_charts(at)
