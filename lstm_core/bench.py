"""Benchmarks: `make bench` (python -m lstm_core.bench). Prints a table, writes saves/bench/<time>.json.

    python -m lstm_core.bench                 # training samples/s of the presets, evaluation samples/s
    python -m lstm_core.bench --full default  # also train a preset to the end: test accuracy and wall time

Throughput is the real training loop (fit) on real data, the median of its progress windows after the
first one (warm-up), so it includes batching, augmentation, the optimizer step and the scheduler.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from .config import preset
from .data import load_mnist, make_splits
from .evaluate import evaluate
from .runs import atomic_write_json, saves_root
from .train import Callback, fit


class Throughput(Callback):
    def __init__(self):
        self.windows = []

    def on_batch(self, state, record):
        self.windows.append(record["samples_per_s"])


def train_throughput(name: str, mnist, samples: int = 12800, **changes) -> dict:
    """Training samples/s of a preset, measured over `samples` training samples (one epoch)."""
    config = preset(name).replace(epochs=1, limit_train=samples, val_size=1000, log_every=10, **changes)
    meter = Throughput()
    fit(config, [meter], data=mnist)
    steady = meter.windows[1:] or meter.windows
    return {"preset": name, "samples_per_s": statistics.median(steady), "batch_size": config.batch_size,
            **({"amp": changes["amp"]} if "amp" in changes else {})}


def eval_throughput(mnist, name: str = "default", repeats: int = 3) -> dict:
    """Test-set evaluation samples/s (all 10,000 samples) of an untrained model of the preset."""
    from .models import build_model
    config = preset(name)
    splits = make_splits(mnist, config)
    model = build_model(config)
    evaluate(model, splits.test_x, splits.test_y, config)            # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        evaluate(model, splits.test_x, splits.test_y, config)
    return {"preset": name, "eval_samples_per_s": repeats * len(splits.test_y) / (time.perf_counter() - started)}


def predict_latency(mnist, name: str = "default", repeats: int = 300) -> dict:
    """Draw-page latency: one 280x280 RGBA canvas -> MNIST-like 28x28 -> probabilities and per-row beliefs."""
    import numpy as np
    import torch.nn.functional as F

    from .models import build_model
    from .preprocess import from_canvas, predict
    config = preset(name)
    model = build_model(config).eval()
    canvases = []
    for i in range(20):  # real digits, drawn large
        big = F.interpolate(mnist.test_images[i][None, None].float(), size=(240, 240), mode="bilinear")[0, 0]
        rgba = np.zeros((280, 280, 4), np.uint8)
        rgba[20:260, 20:260, :3] = big.clamp(0, 255).to(torch.uint8).numpy()[..., None]
        rgba[..., 3] = 255
        canvases.append(rgba)
    times = []
    for i in range(repeats + 10):
        started = time.perf_counter()
        predict(model, config, from_canvas(canvases[i % len(canvases)]))
        if i >= 10:                                                       # after warm-up
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"preset": name, "p50_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99) - 1]}


def full_run(name: str, mnist) -> dict:
    started = time.perf_counter()
    history = fit(preset(name), data=mnist)
    return {"preset": name, "test_accuracy": history.test["accuracy"], "wall_seconds": time.perf_counter() - started,
            "epochs": len(history.epochs), "best_epoch": history.best_epoch, "stopped": history.stopped}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_core.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["default", "tutorial", "bilstm", "pixel"])
    parser.add_argument("--full", nargs="*", default=[], metavar="PRESET", help="train these presets to the end")
    parser.add_argument("--samples", type=int, default=12800, help="training samples per throughput figure")
    args = parser.parse_args(argv)
    mnist = load_mnist()
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
              "processor": platform.processor(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "train": [], "eval": [], "full": []}
    for name in args.presets:
        samples = args.samples // 8 if preset(name).seq_mode != "rows" else args.samples  # 784 steps: slower
        result["train"].append(row := train_throughput(name, mnist, samples))
        print(f"train {name:<9} fp32  {row['samples_per_s']:>9.0f} samples/s  (batch {row['batch_size']})", flush=True)
    result["eval"].append(row := eval_throughput(mnist))
    print(f"eval  default         {row['eval_samples_per_s']:>9.0f} samples/s  (10,000 test samples)", flush=True)
    result["predict"] = row = predict_latency(mnist)
    print(f"draw  default         p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms  (preprocess + predict)",
          flush=True)
    for name in args.full:
        result["full"].append(row := full_run(name, mnist))
        print(f"full  {name:<9} test accuracy {row['test_accuracy']:.2%} in {row['wall_seconds']:.0f} s "
              f"({row['epochs']} epochs, best {row['best_epoch']})", flush=True)
    out = saves_root() / "bench" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
