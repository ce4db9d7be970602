"""Exported files (lstm_core/export.py) give the app's logits from plain images, with nothing of lstm_core."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from lstm_core.__main__ import main
from lstm_core.checkpoints import CHECKPOINT_FORMAT, atomic_torch_save, load_model
from lstm_core.data import batch_input
from lstm_core.evaluate import predict_logits
from lstm_core.export import MissingDependency, export_model, export_run
from lstm_core.models import build_model
from lstm_core.runs import create_run, list_runs

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")   # torch's, about itself

# one model of each kind the exporter has to get right; "rows" is the conftest's fully trained run
MODELS = {
    "bi2": dict(bidirectional=True, num_layers=2, hidden_size=16, dropout=0.1),
    "permuted": dict(seq_mode="permuted", hidden_size=16),
    "pixels": dict(seq_mode="pixels", hidden_size=8),
    "cnn": dict(arch="cnn"),
    "gru": dict(cell="gru", num_layers=2, hidden_size=16, dropout=0.1),
    "bigru": dict(cell="gru", bidirectional=True, hidden_size=16),
    "rnn": dict(cell="rnn", hidden_size=16),
    "irnn-pixels": dict(cell="irnn", seq_mode="pixels", hidden_size=8),
    "gru-permuted": dict(cell="gru", seq_mode="permuted", hidden_size=8),
}


def images01(uint8: torch.Tensor) -> torch.Tensor:
    """uint8 MNIST images (N, 28, 28) -> the exported files' input, (N, 1, 28, 28) floats in [0, 1]."""
    return (uint8.float() / 255).unsqueeze(1)


def run_file(path, fmt: str, images: torch.Tensor) -> torch.Tensor:
    """Logits of an exported file, run the way a user outside the app would (onnxruntime or torch.jit)."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path))(images)


def needs(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_saves, mnist) -> dict:
    """name -> run directory: the conftest's trained rows run, and a run per MODELS entry whose best.pt holds
    weights trained for a few steps on a slice of the training set (fit would also test them on all 10,000
    images, the bulk of its time here; what is exported is only what best.pt holds)."""
    root = tmp_path_factory.mktemp("export") / "saves"
    out = {"rows": next(r for r in list_runs(trained_saves) if r["state"] == "completed")["path"]}
    torch.manual_seed(0)
    for name, changes in MODELS.items():
        config = tiny_config(**changes)
        model = build_model(config).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(4):
            idx = torch.arange(step * 50, (step + 1) * 50)
            loss = torch.nn.functional.cross_entropy(model(batch_input(mnist.train_images, idx, config)),
                                                     mnist.train_labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        run = create_run(config, root, state="completed")
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "model": model.state_dict()},
                          run.best_path)
        out[name] = str(run.path)
    return out


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", ["rows", *MODELS])
def test_an_exported_file_gives_the_apps_logits_from_images(runs, mnist, tmp_path, name, fmt):
    needs(fmt)
    path = export_run(runs[name], fmt, tmp_path)
    assert path.name == ("model.onnx" if fmt == "onnx" else "model.ts.pt")
    model, config = load_model(runs[name])
    for n in (7, 64):                       # neither the export's example batch size (2) nor each other's
        uint8 = mnist.test_images[:n]
        expected = predict_logits(model, uint8, config)      # the app's pipeline: uint8 -> batch_input -> model
        got = run_file(path, fmt, images01(uint8))
        assert got.shape == (n, 10)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_the_exported_model_is_plain_torch_even_after_the_cpu_kernel_ran_it(runs, mnist, tmp_path):
    model, config = load_model(runs["bi2"])
    expected = predict_logits(model, mnist.test_images[:5], config)   # swaps in the kernel's LSTM where built
    accelerated = type(model.lstm)
    path = export_model(model, config, tmp_path / "bi.ts.pt", "torchscript")
    torch.testing.assert_close(run_file(path, "torchscript", images01(mnist.test_images[:5])), expected,
                               atol=1e-4, rtol=1e-4)
    assert type(model.lstm) is accelerated          # the caller's model is left as it was


def test_files_carry_their_config(runs, tmp_path):
    config = load_model(runs["permuted"])[1].to_dict()
    extra = {"config.json": ""}
    torch.jit.load(str(export_run(runs["permuted"], "torchscript", tmp_path)), _extra_files=extra)
    assert json.loads(extra["config.json"]) == config
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(export_run(runs["permuted"], "onnx", tmp_path)))
    onnx.checker.check_model(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["lstm_studio.config"]) == config and "(B, 1, 28, 28)" in proto.doc_string


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The tensor attributes")     # torch.export's, about nn.LSTM's own attributes
def test_the_dynamo_exporter_gives_the_same_logits(runs, mnist, tmp_path):
    pytest.importorskip("onnxscript")
    needs("onnx")
    model, config = load_model(runs["rows"])
    path = export_model(model, config, tmp_path / "dynamo.onnx", "onnx", dynamo=True)
    images = images01(mnist.test_images[:33])
    torch.testing.assert_close(run_file(path, "onnx", images), predict_logits(model, mnist.test_images[:33], config),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_files_load_without_lstm_core(runs, tmp_path):
    """A fresh interpreter with only torch and onnxruntime: the files need nothing of this project."""
    needs("onnx")
    pytest.importorskip("onnxruntime")
    onnx_path, ts_path = export_run(runs["permuted"], "onnx", tmp_path), export_run(runs["cnn"], "torchscript", tmp_path)
    script = (f"import sys, torch, onnxruntime as ort\n"
              f"x = torch.rand(3, 1, 28, 28)\n"
              f"a = ort.InferenceSession({str(onnx_path)!r}).run(None, {{'images': x.numpy()}})[0]\n"
              f"b = torch.jit.load({str(ts_path)!r})(x)\n"
              f"assert not [m for m in sys.modules if m.startswith('lstm_core')]\n"
              f"print(a.shape, tuple(b.shape))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(3,", "10)", "(3,", "10)"]


# -- the whole test set ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["rows", "gru", "rnn", "irnn-pixels"])
def test_exported_files_agree_with_pytorch_on_the_whole_test_set(runs, mnist, tmp_path, name):
    model, config = load_model(runs[name])
    expected = predict_logits(model, mnist.test_images, config).argmax(1)
    images = images01(mnist.test_images)
    with_onnx = all(importlib.util.find_spec(p) for p in ("onnx", "onnxruntime"))
    for fmt in ("torchscript", "onnx") if with_onnx else ("torchscript",):
        predicted = run_file(export_run(runs[name], fmt, tmp_path), fmt, images).argmax(1)
        agreement = (predicted == expected).float().mean().item()
        print(f"{fmt}: {agreement:.4%} of {len(expected):,} test images get PyTorch's digit")
        assert agreement >= 0.999


# -- the command line ---------------------------------------------------------------------------------
@pytest.fixture
def cli(saves, capsys):
    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_export_writes_into_the_run_directory_and_prints_the_path(cli, saves, runs):
    run_dir = saves / "runs" / "r1"
    shutil.copytree(runs["rows"], run_dir)
    code, out, err = cli("export", "r1", "--format", "torchscript")
    assert code == 0, err
    assert out.strip() == str(run_dir / "model.ts.pt") and (run_dir / "model.ts.pt").is_file()
    pytest.importorskip("onnx")             # the `export` extra; TorchScript above needs nothing more
    code, out, err = cli("export", run_dir, "--format", "onnx", "--output", saves / "digits.onnx", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["path"] == str(saves / "digits.onnx") and summary["format"] == "onnx" and summary["bytes"] > 0


@pytest.mark.parametrize("args, message", [
    (["nope", "--format", "onnx"], "no run 'nope' in"),
    (["r1", "--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    (["r1"], "the following arguments are required: --format"),
    (["r1", "--format", "onnx", "--output", "/no/such/folder/m.onnx"], "there is no folder /no/such/folder"),
])
def test_export_refuses_bad_input_in_one_line(cli, saves, runs, args, message):
    shutil.copytree(runs["rows"], saves / "runs" / "r1")
    code, out, err = cli("export", *args)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out


def test_export_of_a_run_without_weights_says_so(cli, saves):
    create_run(tiny_config(), saves)
    run_id = list_runs(saves)[0]["id"]
    code, _, err = cli("export", run_id, "--format", "torchscript")
    assert code == 2 and f"run {run_id} has no weights to export yet (no best.pt; it is queued)" in err


def test_onnx_without_the_extra_names_the_install_command(cli, saves, runs, monkeypatch):
    shutil.copytree(runs["rows"], saves / "runs" / "r1")
    monkeypatch.setitem(sys.modules, "onnx", None)       # `import onnx` now raises ImportError
    code, _, err = cli("export", "r1", "--format", "onnx")
    assert code == 1 and "pip install 'lstm-studio[export]'" in err and "Traceback" not in err
    assert not (saves / "runs" / "r1" / "model.onnx").exists()
    with pytest.raises(MissingDependency, match="needs onnx"):
        export_run(saves / "runs" / "r1", "onnx")
    assert cli("export", "r1", "--format", "torchscript")[0] == 0      # TorchScript needs nothing more
