"""Models that leave the app: a run's model as one ONNX or TorchScript file that takes images and returns
logits, with the app's preprocessing inside, so that using it needs neither lstm_core nor the run's config.

    path = export_run(run.path, "onnx")                       # RUN/model.onnx ("torchscript": RUN/model.ts.pt)
    session = onnxruntime.InferenceSession(str(path))
    logits = session.run(None, {"images": images})[0]         # (B, 1, 28, 28) float32 in [0, 1] -> (B, 10)
    logits = torch.jit.load(RUN / "model.ts.pt")(images)      # the TorchScript file, the same way

The weights are best.pt's: what `evaluate` and the Draw page use (final_state_dict.pth holds the same ones
once a run has finished: fit restores the best weights before saving it).

The input `images` is a batch of any size of 28x28 grey images, white digit on black, scaled to [0, 1]:
uint8 / 255, as torchvision's ToTensor gives MNIST. (A drawing or photo must first be made MNIST-like:
preprocess.from_upload.) Inside, the file does what data.batch_input does after that scaling: normalise with
the training set's mean and std, then shape the batch the way the model reads it: the CNN (B, 1, 28, 28);
an LSTM in rows mode (B, 28, 28), one row a step; pixels (B, 784, 1), one pixel a step in reading order;
permuted (B, 784, 1) in data.pixel_permutation's fixed order, which is stored in the file. The output
`logits` (B, 10) are unnormalised: softmax gives the probabilities, argmax the digit.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_model
from .config import TrainConfig
from .data import normalize, pixel_permutation
from .runs import Run, RunError, atomic_write_bytes, output_file

FORMATS = {"onnx": ".onnx", "torchscript": ".ts.pt"}     # format -> file suffix (a run's file: model + suffix)
INPUT_NAME, OUTPUT_NAME = "images", "logits"
INPUT_DOC = "images: (B, 1, 28, 28) float32, white digit on black in [0, 1] (uint8 / 255); logits: (B, 10)"


class MissingDependency(RuntimeError):
    """A package the chosen format needs is not installed; the message says how to install it."""


class ImageClassifier(nn.Module):
    """images (B, 1, 28, 28) in [0, 1] -> logits (B, 10): data.batch_input's normalisation and
    data.model_input's shaping in front of the model, so the exported file takes images. The permutation
    is a buffer: it goes into the file as a constant, where calling pixel_permutation while tracing could
    record its seeded randperm instead."""

    def __init__(self, model: nn.Module, config: TrainConfig):
        super().__init__()
        self.model = model
        self.arch, self.seq_mode = config.arch, config.seq_mode
        permuted = config.arch == "lstm" and config.seq_mode == "permuted"
        self.register_buffer("order", pixel_permutation().clone() if permuted else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images)                               # (B, 1, 28, 28)
        if self.arch == "cnn":
            return self.model(x)
        if self.seq_mode == "rows":
            return self.model(x.reshape(-1, 28, 28))        # (B, T=28, F=28)
        flat = x.reshape(-1, 784)                           # (B, 784), reading order
        if self.order is not None:
            flat = flat[:, self.order]
        return self.model(flat.unsqueeze(-1))               # (B, T=784, F=1)


def plain(model: nn.Module) -> nn.Module:
    """A copy of `model` in plain torch modules: cpu.accelerate swaps nn.LSTM for a subclass whose forward
    calls the C++ kernel, which tracing would not see as torch ops (and no file could run without it)."""
    model = copy.deepcopy(model).cpu().float().eval()
    for module in model.modules():
        if isinstance(module, nn.LSTM) and type(module) is not nn.LSTM:
            module.__class__ = nn.LSTM
    return model


def require(*packages: str) -> None:
    """Import each package, or refuse with the missing ones and the command that installs them."""
    missing = []
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingDependency(f"exporting to ONNX needs {' and '.join(missing)}, not installed here: "
                                "pip install 'lstm-studio[export]' (TorchScript needs nothing more)")


def suffix(fmt: str) -> str:
    if fmt not in FORMATS:
        raise RunError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


@contextlib.contextmanager
def torch_notices_off():
    """Silence what torch warns about while exporting, which the person exporting cannot act on: that
    torch.jit and the TorchScript-based ONNX exporter are deprecated (both still write files that load);
    that tracing freezes nn.LSTM's input checks (checks only: the batch size stays dynamic); and, said of
    every LSTM, that the ONNX file might fix the initial state at the example's batch size (it builds it
    from the input's shape). tests/test_export.py runs every file on other batch sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
        warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size other than 1")
        yield


def onnx_bytes(wrapper: ImageClassifier, example: torch.Tensor, config: TrainConfig, dynamo: bool) -> bytes:
    """The ONNX file, batch dimension dynamic, with the config and the input's description in its metadata.

    dynamo=False (TorchScript-based exporter) by default, though torch has deprecated it: the dynamo exporter
    gives the same graph (one ONNX LSTM node) and logits, but its tracing time grows with the sequence length,
    from seconds on rows to minutes on pixels (784 steps) where this one takes well under a second."""
    require("onnx", *(["onnxscript"] if dynamo else []))
    import onnx

    with torch_notices_off():
        if dynamo:
            program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verbose=False)
            proto = program.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(wrapper, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = INPUT_DOC
    onnx.helper.set_model_props(proto, {"lstm_studio.config": json.dumps(config.to_dict())})
    return proto.SerializeToString()


def torchscript_bytes(wrapper: ImageClassifier, example: torch.Tensor, config: TrainConfig) -> bytes:
    """The traced module (the batch size is read from the input, not fixed by the example), the config as
    config.json beside it: torch.jit.load(path, _extra_files={"config.json": ""}) reads it back."""
    with torch_notices_off():
        traced = torch.jit.trace(wrapper, example)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"config.json": json.dumps(config.to_dict())})
    return buffer.getvalue()


def export_model(model: nn.Module, config: TrainConfig, path: str | Path, fmt: str, dynamo: bool = False) -> Path:
    """Write `model` (built from `config`) as an `fmt` file ("onnx" or "torchscript") at `path`, atomically.
    `dynamo` chooses torch's dynamo-based ONNX exporter (onnx_bytes says why it is not the default)."""
    suffix(fmt)
    wrapper = ImageClassifier(plain(model), config).eval()
    example = torch.zeros(2, 1, 28, 28)   # (B, 1, 28, 28); any B > 1, so nothing takes B = 1 for a constant
    with torch.no_grad():
        data = (onnx_bytes(wrapper, example, config, dynamo) if fmt == "onnx"
                else torchscript_bytes(wrapper, example, config))
    path = Path(path)
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or type(exc).__name__}") from None
    return path


def export_run(path: str | Path, fmt: str, output: str | Path | None = None) -> Path:
    """Export the model of a run directory (its best.pt) or of a checkpoint file to `output`: by default
    model.onnx or model.ts.pt inside the run directory, or beside the checkpoint file under its name
    (last.pt -> last.onnx); a folder given as `output` (one that exists, or any path ending in a separator,
    made when missing) gets that default name. Returns the path written."""
    path = Path(path)
    default = ("model" if path.is_dir() else path.stem) + suffix(fmt)
    if path.is_dir() and not Run(path).best_path.exists():
        state = Run(path).status().get("state", "unknown")
        raise RunError(f"run {path.name} has no weights to export yet (no best.pt; it is {state})")
    model, config = load_model(path)
    output = output_file(output, (path if path.is_dir() else path.parent) / default)
    return export_model(model, config, output, fmt)
