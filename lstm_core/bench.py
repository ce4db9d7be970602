"""Benchmarks: `make bench` (python -m lstm_core.bench). Prints a table, writes SAVES/bench/<time>.json.

    python -m lstm_core.bench                        # throughput, roofline, baseline, latency, cold start
    python -m lstm_core.bench --tta                  # + wall time for `default` to reach 99.0% test accuracy
    python -m lstm_core.bench --full default best    # + train presets to the end: test accuracy, wall time

Training throughput is the real loop (fit) on real data: the median of its progress windows after the
first (warm-up), so batching, augmentation, the optimizer step and the scheduler are all in it. Its
roofline fraction is FLOPs per sample (from the model's shapes) x samples/s over the FLOP/s of a large
matrix multiply of the same dtype, measured in the same run. The baseline is the loop tutorials write:
torchvision's MNIST dataset, a DataLoader with per-sample ToTensor/Normalize, the same model and batch.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

from . import fused
from .config import TrainConfig, preset
from .data import MEAN, STD, default_data_dir, load_mnist, make_splits
from .devices import cpu_has_bf16
from .evaluate import evaluate
from .models import build_model
from .runs import atomic_write_json, saves_root
from .train import Callback, fit

REPO = Path(__file__).resolve().parent.parent


class Throughput(Callback):
    def __init__(self):
        self.windows = []

    def on_batch(self, state, record):
        self.windows.append(record["samples_per_s"])


# -- FLOPs and the roofline --------------------------------------------------------------------
def flops_per_sample(config: TrainConfig) -> float:
    """Training FLOPs per sample: the forward pass's multiply-adds x 2, times 3 (backward ~ 2x forward)."""
    if config.arch == "cnn":
        convs = [(1, 32, 28), (32, 32, 28), (32, 64, 14), (64, 64, 14)]             # (in, out, side), 3x3
        forward = sum(2 * 9 * c_in * c_out * side * side for c_in, c_out, side in convs)
        forward += 2 * (64 * 7 * 7 * 128 + 128 * 10)
        return 3 * forward
    steps, features = config.seq_shape
    directions = 2 if config.bidirectional else 1
    forward = 0
    for layer in range(config.num_layers):
        inputs = features if layer == 0 else config.hidden_size * directions
        forward += directions * steps * 2 * 4 * config.hidden_size * (inputs + config.hidden_size)
    forward += 2 * config.hidden_size * directions * 10
    return 3 * forward


def matmul_flops(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """The machine's matrix-multiply FLOP/s for `dtype` (a large square GEMM, all threads)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        count += 1
    return count * 2 * n ** 3 / (time.perf_counter() - started)


def gemm_bound(config: TrainConfig, repeats: int = 3) -> float | None:
    """Samples/s of a training step that did nothing but the fused kernel's GEMMs: the same calls, shapes
    and threads, without gate loops, optimizer or data. No kernel built on these GEMMs trains faster here.
    None where the fused kernel does not train this model."""
    if config.arch != "lstm" or not fused.available():
        return None
    steps, features = config.seq_shape
    directions = 2 if config.bidirectional else 1
    seconds = 0.0
    for layer in range(config.num_layers):
        inputs = features if layer == 0 else config.hidden_size * directions
        seconds += directions * fused.kernel().gemm_seconds(config.batch_size, steps, inputs, config.hidden_size,
                                                            layer > 0, repeats)
    return config.batch_size / seconds


def ceilings(config: TrainConfig, dtypes: list[str], tries: int = 3) -> tuple[dict, float | None]:
    """The matrix-multiply peak FLOP/s per dtype and the GEMM-only samples/s (gemm_bound), timed in turn
    `tries` times, the best of each: a shared host's neighbours slow some timings, and a ceiling is the
    machine at its best."""
    peak, bound = dict.fromkeys(dtypes, 0.0), None
    for _ in range(tries):
        for dtype in dtypes:
            peak[dtype] = max(peak[dtype], matmul_flops(torch.bfloat16 if dtype == "bf16" else torch.float32))
        rate = gemm_bound(config)
        bound = rate if bound is None else max(bound, rate)
    return peak, bound


# -- measurements ------------------------------------------------------------------------------
def train_throughput(config: TrainConfig, mnist, samples: int) -> float:
    """Training samples/s of `config` in fit, over `samples` training samples (one epoch)."""
    config = config.replace(epochs=1, limit_train=samples, val_size=1000, log_every=10)
    meter = Throughput()
    fit(config, [meter], data=mnist)
    return statistics.median(meter.windows[1:] or meter.windows)


def baseline_throughput(config: TrainConfig, batches: int = 60) -> float:
    """The tutorial loop: torchvision MNIST + DataLoader(ToTensor, Normalize), torch's nn.LSTM, Adam, and
    `.item()` every batch."""
    import torchvision
    from torchvision import transforms

    dataset = torchvision.datasets.MNIST(str(default_data_dir()), train=True, download=False,
                                         transform=transforms.Compose([transforms.ToTensor(),
                                                                       transforms.Normalize((MEAN,), (STD,))]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    fused.enable(False)                                # the tutorials' nn.LSTM, not our CPU kernel
    seen, started, losses = 0, None, []
    for i, (x, y) in enumerate(loader):
        if i == 5:                                     # warm-up done
            seen, started = 0, time.perf_counter()
        if i == 5 + batches:
            break
        x = x.squeeze(1) if config.seq_mode == "rows" else x.reshape(len(x), 784, 1)
        loss = F.cross_entropy(model(x if config.arch != "cnn" else x.reshape(len(x), 1, 28, 28)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())                     # as tutorials do, to print a running loss
        seen += len(y)
    fused.enable(True)
    return seen / (time.perf_counter() - started)


def eval_throughput(mnist, name: str = "default", repeats: int = 3) -> float:
    """Test-set evaluation samples/s (all 10,000 samples)."""
    config = preset(name)
    splits = make_splits(mnist, config)
    model = build_model(config)
    evaluate(model, splits.test_x, splits.test_y, config)
    started = time.perf_counter()
    for _ in range(repeats):
        evaluate(model, splits.test_x, splits.test_y, config)
    return repeats * len(splits.test_y) / (time.perf_counter() - started)


def predict_latency(mnist, name: str = "default", repeats: int = 300) -> dict:
    """Draw-page latency: one 280x280 RGBA canvas -> MNIST-like 28x28 -> probabilities and per-row beliefs."""
    import numpy as np

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
    return {"p50_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99) - 1]}


class TestEveryEpoch(Callback):
    """For the report only: test accuracy after each epoch (training decisions still use validation)."""

    def __init__(self, target: float):
        self.target, self.reached, self.curve = target, None, []

    def on_epoch_end(self, state, record):
        splits = self.splits
        acc = evaluate(state.model, splits.test_x, splits.test_y, state.config, detailed=False)["accuracy"]
        self.curve.append((record["epoch"], record["elapsed"], acc))
        if self.reached is None and acc >= self.target:
            self.reached = record["elapsed"]


def time_to_accuracy(mnist, name: str = "default", target: float = 0.99, epochs: int = 0) -> dict:
    config = preset(name).replace(epochs=epochs) if epochs else preset(name)
    probe = TestEveryEpoch(target)
    probe.splits = make_splits(mnist, config)
    started = time.perf_counter()
    history = fit(config, [probe], data=mnist)
    return {"preset": name, "target": target, "seconds_to_target": probe.reached,
            "final_test_accuracy": history.test["accuracy"], "wall_seconds": time.perf_counter() - started,
            "curve": probe.curve}


def full_run(name: str, mnist) -> dict:
    started = time.perf_counter()
    history = fit(preset(name), data=mnist)
    return {"preset": name, "test_accuracy": history.test["accuracy"], "wall_seconds": time.perf_counter() - started,
            "epochs": len(history.epochs), "best_epoch": history.best_epoch, "stopped": history.stopped}


def cold_start() -> dict:
    """Seconds from `streamlit run` to a healthy server, and to the first page drawn in Chromium."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless",
                               "true", "--server.port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    out = {}
    try:
        while time.perf_counter() - started < 120:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                time.sleep(0.05)
        out["server_ready_s"] = time.perf_counter() - started
        try:
            from playwright.sync_api import sync_playwright
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run"])
                page = browser.new_page()
                page.goto(url)
                page.get_by_role("heading", name="LSTM Studio").wait_for(timeout=120_000)
                out["first_page_s"] = time.perf_counter() - started
                browser.close()
        except Exception as exc:  # noqa: BLE001 - no browser here: report the server figure alone
            out["first_page_error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        server.terminate()
        server.wait(timeout=20)
    return out


# -- the report --------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_core.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=["default", "tutorial", "bilstm", "pixel"])
    parser.add_argument("--quick", action="store_true", help="skip evaluation, latency and cold start")
    parser.add_argument("--samples", type=int, default=12800, help="training samples per throughput figure")
    parser.add_argument("--tta", action="store_true", help="time for `default` to reach 99.0%% test accuracy")
    parser.add_argument("--tta-preset", default="default", help="the preset --tta trains (default: default)")
    parser.add_argument("--tta-target", type=float, default=0.99, help="the test accuracy --tta waits for")
    parser.add_argument("--tta-epochs", type=int, default=0, help="train this many epochs (0: the preset's)")
    parser.add_argument("--full", nargs="*", default=[], metavar="PRESET", help="train these presets to the end")
    parser.add_argument("--no-browser", action="store_true", help="skip the app cold-start figure")
    args = parser.parse_args(argv)
    mnist = load_mnist()
    dtypes = ["fp32"] + (["bf16"] if cpu_has_bf16() else [])
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
              "fused_lstm": fused.available(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "train": []}
    print("peak: the best of three large-GEMM timings just before each preset; GEMM-only: the roofline fraction "
          "of the fused\nkernel's GEMMs alone (best of three, in turn with the peak), without gate loops, optimizer "
          "or data", flush=True)
    print(f"{'preset':<10}{'dtype':<11}{'samples/s':>10}{'MFLOP/sample':>14}{'GFLOP/s':>9}{'peak':>6}{'roofline':>10}"
          f"{'GEMM-only':>11}{'baseline':>10}{'speedup':>9}", flush=True)
    for name in args.presets:
        base = preset(name)
        samples = args.samples // 8 if base.seq_mode != "rows" else args.samples   # 784 steps: slower
        baseline = baseline_throughput(base, batches=10 if base.seq_mode != "rows" else 60)
        # measured just before this preset's runs: a shared host's speed drifts over a long benchmark
        peak, bound = ceilings(base, dtypes)
        # fp32 with the fused CPU LSTM, fp32 with torch's nn.LSTM (oneDNN) for comparison, then bf16
        variants = ["fp32"] + (["fp32-torch"] if base.arch == "lstm" and fused.available() else []) + dtypes[1:]
        for dtype in variants:
            config = base.replace(amp="bf16") if dtype == "bf16" else base.replace(amp="off")
            fused.enable(dtype != "fp32-torch")
            rate = train_throughput(config, mnist, samples)
            fused.enable(True)
            flops = flops_per_sample(config)
            gemm_only = bound * flops / peak["fp32"] if bound and dtype == "fp32" else None
            row = {"preset": name, "dtype": dtype, "batch_size": config.batch_size, "samples_per_s": rate,
                   "mflop_per_sample": flops / 1e6, "gflops": rate * flops / 1e9,
                   "matmul_gflops": peak[dtype[:4]] / 1e9, "roofline": rate * flops / peak[dtype[:4]],
                   "gemm_only_samples_per_s": bound if gemm_only else None, "gemm_only_roofline": gemm_only,
                   "baseline_samples_per_s": baseline, "speedup": rate / baseline}
            result["train"].append(row)
            print(f"{name:<10}{dtype:<11}{rate:>10.0f}{flops / 1e6:>14.1f}{row['gflops']:>9.1f}"
                  f"{row['matmul_gflops']:>6.0f}{row['roofline']:>10.0%}"
                  f"{f'{gemm_only:.0%}' if gemm_only else '':>11}{baseline:>10.0f}{row['speedup']:>8.1f}x", flush=True)
    if args.quick:
        args.no_browser = True
    else:
        result["eval_samples_per_s"] = eval_throughput(mnist)
        print(f"evaluation (default, 10,000 test samples): {result['eval_samples_per_s']:,.0f} samples/s",
              flush=True)
        result["predict"] = predict_latency(mnist)
        print(f"draw prediction (default): p50 {result['predict']['p50_ms']:.2f} ms, "
              f"p99 {result['predict']['p99_ms']:.2f} ms", flush=True)
    if not args.no_browser:
        result["cold_start"] = cold_start()
        print("app cold start: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in result["cold_start"].items()), flush=True)
    if args.tta:
        result["time_to_accuracy"] = tta = time_to_accuracy(mnist, args.tta_preset, args.tta_target, args.tta_epochs)
        goal = f"{args.tta_target:.1%} test accuracy ({args.tta_preset})"
        print(f"time to {goal}: {tta['seconds_to_target']:.0f} s" if tta["seconds_to_target"]
              else f"never reached {goal}", f"(final {tta['final_test_accuracy']:.2%} after "
              f"{tta['wall_seconds']:.0f} s; per epoch: " + ", ".join(f"{a:.2%}" for _, _, a in tta["curve"]) + ")",
              flush=True)
    out = saves_root() / "bench" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["full"] = []
    for name in args.full:
        atomic_write_json(out, result)                          # full runs are long: keep what is measured so far
        result["full"].append(row := full_run(name, mnist))
        print(f"full {name}: test accuracy {row['test_accuracy']:.2%} in {row['wall_seconds']:.0f} s "
              f"({row['epochs']} epochs, best {row['best_epoch']}, {row['stopped']})", flush=True)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory of this process: {result['peak_rss_mb']:.0f} MB", flush=True)
    atomic_write_json(out, result)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
