"""Benchmarks: `make bench` (python -m lstm_core.bench). Prints a table, writes SAVES/bench/<time>.json.

    python -m lstm_core.bench                        # throughput, roofline, baseline, latency
    python -m lstm_core.bench --tta                  # + wall time for `default` to reach 99.0% test accuracy
    python -m lstm_core.bench --tta --tta-seeds 0 1 2   # the same over three seeds: median and range
    python -m lstm_core.bench --full default best    # + train presets to the end: test accuracy, wall time
    python -m lstm_core.bench --quick --presets --full default gru rnn --full-seeds 0 1 2   # the cells compared
    python -m lstm_core.bench --device cuda          # the same on a GPU (default: auto, the GPU where there is one)

Training throughput is the real loop (fit) on real data: the median of its progress windows after the
first (warm-up), so batching, augmentation, the optimizer step and the scheduler are all in it. The clock
stops for each progress record: the gradient-over-time probe an LSTM's records carry (a backward through
every time step, without cuDNN on a GPU: for `pixel`, 784 steps) and the callbacks are in no window. Its
roofline fraction is FLOPs per sample (from the model's shapes) x samples/s over the FLOP/s of a large
matrix multiply of the same dtype, measured in the same run. The baseline is the loop tutorials write:
torchvision's MNIST dataset, a DataLoader with per-sample ToTensor/Normalize, the same model and batch.

On a CPU the rows are fp32 (the fused CPU LSTM, lstm_core.cpu), fp32-torch (torch's nn.LSTM, oneDNN) and
bf16 where the CPU has bf16 instructions; the GRU and RNN rows (gru, rnn, PRESET/CELL) are torch's own
layers against the same peak, so their roofline reads as their speed at equal work beside the LSTM's. On a
GPU they are fp32 (amp=off: TF32 matmuls, as fit runs it), amp (amp=auto: what devices.policy_for decides,
fp16 autocast with loss scaling for cuDNN's LSTM) and fp32-native: torch's own CUDA layer with cuDNN off.
Every row's roofline divides by the GEMM peak of the dtype its recurrent layer really computes in
(policy.lstm_dtype; TF32 for fp32 on a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from . import cpu
from .config import TrainConfig, preset
from .data import MEAN, STD, default_data_dir, load_mnist, make_splits
from .devices import cpu_has_bf16, policy_for, resolve_device
from .evaluate import evaluate
from .models import build_model
from .runs import atomic_write_json, saves_root
from .train import Callback, fit


# what a samples/s figure times, said in the report and the table's heading
TIMING = "training steps only: the progress records and their gradient-over-time probe are outside the clock"


class Throughput(Callback):
    def __init__(self):
        self.windows = []

    def on_batch(self, state, record):
        self.windows.append(record["samples_per_s"])


# -- FLOPs and the roofline --------------------------------------------------------------------
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "irnn": 1}    # weight blocks per cell: its GEMMs' width in hidden sizes


def flops_per_sample(config: TrainConfig) -> float:
    """Training FLOPs per sample: the forward pass's multiply-adds x 2, times 3 (backward ~ 2x forward)."""
    if config.arch == "cnn":
        convs = [(1, 32, 28), (32, 32, 28), (32, 64, 14), (64, 64, 14)]             # (in, out, side), 3x3
        forward = sum(2 * 9 * c_in * c_out * side * side for c_in, c_out, side in convs)
        forward += 2 * (64 * 7 * 7 * 128 + 128 * 10)
        return 3 * forward
    steps, features = config.seq_shape
    directions = 2 if config.bidirectional else 1
    gates = GATES[config.cell]
    forward = 0
    for layer in range(config.num_layers):
        inputs = features if layer == 0 else config.hidden_size * directions
        forward += directions * steps * 2 * gates * config.hidden_size * (inputs + config.hidden_size)
    forward += 2 * config.hidden_size * directions * 10
    return 3 * forward


PEAK_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_key(dtype: torch.dtype, device: torch.device) -> str:
    """Which GEMM peak a computation in `dtype` is held to: fp32 on a GPU is TF32 (fit allows it there)."""
    if dtype == torch.float32:
        return "tf32" if device.type == "cuda" else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def peak_keys(device: torch.device) -> list[str]:
    """The GEMM peaks measured on `device`: every dtype a row may compute in there."""
    if device.type == "cuda":
        return ["tf32", "bf16", "fp16"]
    return ["fp32"] + (["bf16"] if cpu_has_bf16() else [])


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """fp32 matmuls on TF32 tensor cores while inside, on a GPU (what fit allows for its fp32 runs)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def matmul_flops(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0,
                 device: torch.device = torch.device("cpu")) -> float:
    """The device's matrix-multiply FLOP/s for `dtype` (a large square GEMM; all threads on a CPU)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    # a GPU's launches return at once: wait for each multiply, or the clock reads how fast they queue
    wait = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    wait()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        wait()
        count += 1
    return count * 2 * n ** 3 / (time.perf_counter() - started)


def peak_flops(device: torch.device, seconds: float = 0.5, tries: int = 1, n: int | None = None) -> dict[str, float]:
    """The GEMM FLOP/s of every dtype in peak_keys(device), the best of `tries` timings each: on a GPU TF32
    (fp32 with TF32 allowed), bf16 and fp16 on 8192-square matrices; on a CPU fp32 (and bf16) on 2048-square
    ones."""
    n = n or (8192 if device.type == "cuda" else 2048)
    with tf32_matmuls(device):
        return {key: max(matmul_flops(PEAK_DTYPES[key], n, seconds, device) for _ in range(tries))
                for key in peak_keys(device)}


def gemm_bound(config: TrainConfig, repeats: int = 3) -> float | None:
    """Samples/s of a training step that did nothing but the fused kernel's GEMMs: the same calls, shapes
    and threads, without gate loops, optimizer or data. No kernel built on these GEMMs trains faster here.
    None where the fused kernel does not train this model."""
    if config.arch != "lstm" or config.cell != "lstm" or not cpu.available():
        return None
    steps, features = config.seq_shape
    directions = 2 if config.bidirectional else 1
    seconds = 0.0
    for layer in range(config.num_layers):
        inputs = features if layer == 0 else config.hidden_size * directions
        seconds += directions * cpu.gemm_seconds(config.batch_size, steps, inputs, config.hidden_size, layer > 0,
                                                 repeats)
    return config.batch_size / seconds


def ceilings(config: TrainConfig, dtypes: list[str], tries: int = 3, seconds: float = 1.0) -> tuple[dict, float | None]:
    """On a CPU, the matrix-multiply peak FLOP/s per dtype and the GEMM-only samples/s (gemm_bound), timed in
    turn `tries` times, the best of each: a shared host's neighbours slow some timings, and a ceiling is the
    machine at its best."""
    peak, bound = dict.fromkeys(dtypes, 0.0), None
    for _ in range(tries):
        for dtype in dtypes:
            peak[dtype] = max(peak[dtype], matmul_flops(PEAK_DTYPES[dtype], seconds=seconds))
        rate = gemm_bound(config)
        bound = rate if bound is None else max(bound, rate)
    return peak, bound


# -- measurements ------------------------------------------------------------------------------
def train_throughput(config: TrainConfig, mnist, samples: int, log_every: int = 10) -> float:
    """Training samples/s of `config` in fit, over `samples` training samples (one epoch): the median of
    its progress windows of `log_every` batches after the first."""
    # the validation and test evaluations fit ends with are in no window: a few hundred samples keep them short
    config = config.replace(epochs=1, limit_train=samples, val_size=256, log_every=log_every)
    meter = Throughput()
    fit(config, [meter], data=first_test_samples(mnist, 256))
    return statistics.median(meter.windows[1:] or meter.windows)


def first_test_samples(mnist, n: int):
    """`mnist` with only its first `n` test samples, for a run whose test accuracy no figure needs in full."""
    return dataclasses.replace(mnist, test_images=mnist.test_images[:n], test_labels=mnist.test_labels[:n])


def bench_config(name: str) -> TrainConfig:
    """A preset by name, or "PRESET/CELL": that preset with another recurrent cell ("pixel/gru"), so the
    cells are timed at equal work."""
    name, _, cell = name.partition("/")
    return preset(name).replace(cell=cell) if cell else preset(name)


def variants(config: TrainConfig, device: torch.device) -> list[tuple[str, TrainConfig]]:
    """The rows a preset gets on `device`, each with the config it trains (see the module's docstring)."""
    if device.type == "cuda":
        names = ["fp32", "amp"] + (["fp32-native"] if config.arch == "lstm" else [])
    else:
        names = (["fp32"] + (["fp32-torch"] if config.arch == config.cell == "lstm" and cpu.available() else [])
                 + (["bf16"] if cpu_has_bf16() else []))
    amp = {"amp": "auto", "bf16": "bf16"}
    return [(name, config.replace(amp=amp.get(name, "off"))) for name in names]


@contextlib.contextmanager
def lstm_backend(variant: str):
    """The LSTM a variant trains on: torch's nn.LSTM instead of the fused CPU kernel (fp32-torch), torch's
    own CUDA LSTM instead of cuDNN's (fp32-native), else the usual one."""
    cpu.enable(variant != "fp32-torch")
    cudnn = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = cudnn and variant != "fp32-native"
    try:
        yield
    finally:
        cpu.enable(True)
        torch.backends.cudnn.enabled = cudnn


def train_row(name: str, variant: str, config: TrainConfig, mnist, samples: int, peak: dict[str, float],
              baseline: float | None = None, bound: float | None = None, log_every: int = 10) -> dict:
    """One row of the table: `config` trained as `variant` over `samples` samples, its roofline against
    the GEMM peak of the dtype its LSTM computes in, its speedup over `baseline` (samples/s) where there is
    one, and the fused kernel's GEMM-only ceiling (`bound`, samples/s) on the fp32 row."""
    device = resolve_device(config.device)
    policy = policy_for(config.amp, device, config.arch)
    key = peak_key(policy.lstm_dtype, device)
    with lstm_backend(variant):
        rate = train_throughput(config, mnist, samples, log_every)
    flops = flops_per_sample(config)
    gemm_only = bound * flops / peak[key] if bound and variant == "fp32" else None
    return {"preset": name, "dtype": variant, "amp": policy.note, "peak_dtype": key,
            "batch_size": config.batch_size, "samples_per_s": rate,
            "mflop_per_sample": flops / 1e6, "gflops": rate * flops / 1e9,
            "matmul_gflops": peak[key] / 1e9, "roofline": rate * flops / peak[key],
            "gemm_only_samples_per_s": bound if gemm_only else None, "gemm_only_roofline": gemm_only,
            "baseline_samples_per_s": baseline, "speedup": rate / baseline if baseline else None}


def table_header(device: torch.device) -> str:
    flops = "TFLOP/s" if device.type == "cuda" else "GFLOP/s"    # a GPU's peak has no room in GFLOP/s
    return (f"{'preset':<10}{'dtype':<11}{'samples/s':>10}{'MFLOP/sample':>14}{flops:>9}{'peak':>6}{'roofline':>10}"
            f"{'GEMM-only':>11}{'baseline':>10}{'speedup':>9}" + ("  amp" if device.type == "cuda" else ""))


def table_line(row: dict, device: torch.device) -> str:
    gpu = device.type == "cuda"
    unit, share = (1e3, ".1%") if gpu else (1, ".0%")
    gemm_only, baseline = row["gemm_only_roofline"], row["baseline_samples_per_s"]
    return (f"{row['preset']:<10}{row['dtype']:<11}{row['samples_per_s']:>10.0f}{row['mflop_per_sample']:>14.1f}"
            f"{row['gflops'] / unit:>9.1f}{row['matmul_gflops'] / unit:>6.0f}{row['roofline']:>10{share}}"
            f"{f'{gemm_only:.0%}' if gemm_only else '':>11}"
            + (f"{baseline:>10.0f}{row['speedup']:>8.1f}x" if baseline else f"{'':>19}")
            + (f"  {row['amp']}" if gpu else "")).rstrip()


def baseline_throughput(config: TrainConfig, batches: int = 60) -> float:
    """The tutorial loop on config.device: torchvision MNIST + DataLoader(ToTensor, Normalize), torch's
    nn.LSTM, Adam, and `.item()` every batch. Raises ImportError without torchvision."""
    import torchvision
    from torchvision import transforms

    device = resolve_device(config.device)
    dataset = torchvision.datasets.MNIST(str(default_data_dir()), train=True, download=False,
                                         transform=transforms.Compose([transforms.ToTensor(),
                                                                       transforms.Normalize((MEAN,), (STD,))]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)           # torch's nn.LSTM, as tutorials have it: never accelerated
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    wait = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    seen, started, losses = 0, None, []
    for i, (x, y) in enumerate(loader):
        if i == 5:                                     # warm-up done
            wait()
            seen, started = 0, time.perf_counter()
        if i == 5 + batches:
            break
        x, y = x.to(device), y.to(device)
        x = x.squeeze(1) if config.seq_mode == "rows" else x.reshape(len(x), 784, 1)
        loss = F.cross_entropy(model(x if config.arch != "cnn" else x.reshape(len(x), 1, 28, 28)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())                     # as tutorials do, to print a running loss
        seen += len(y)
    wait()
    return seen / (time.perf_counter() - started)


def eval_throughput(mnist, name: str = "default", repeats: int = 3, device: str = "cpu") -> float:
    """Test-set evaluation samples/s (all 10,000 samples) on `device`."""
    config = preset(name).replace(device=device)
    splits = make_splits(mnist, config, resolve_device(device))
    model = build_model(config).to(resolve_device(device))
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


def time_to_accuracy(mnist, name: str = "default", target: float = 0.99, epochs: int = 0, **changes) -> dict:
    """Train preset `name` (for `epochs`, 0: the preset's; `changes` to its config, e.g. device) and report
    when its test accuracy, measured after each epoch, first reached `target`."""
    config = preset(name).replace(**({"epochs": epochs} if epochs else {}), **changes)
    probe = TestEveryEpoch(target)
    probe.splits = make_splits(mnist, config, resolve_device(config.device))   # where the model trains
    started = time.perf_counter()
    history = fit(config, [probe], data=mnist)
    return {"preset": name, "target": target, "seconds_to_target": probe.reached,
            "final_test_accuracy": history.test["accuracy"], "wall_seconds": time.perf_counter() - started,
            "curve": probe.curve}


def seed_summary(seeds: list[int], runs: list[dict]) -> dict:
    """Median, min and max over seeds of a time_to_accuracy's final accuracy, wall time and time to target
    (None where a seed never reached it), with every seed's run."""
    def spread(values: list) -> dict:
        known = [v for v in values if v is not None]
        return {"median": statistics.median(known) if known else None, "min": min(known, default=None),
                "max": max(known, default=None), "missing": len(values) - len(known)}
    return {"seeds": seeds, "runs": runs, **{key: spread([r[key] for r in runs])
                                             for key in ("final_test_accuracy", "wall_seconds", "seconds_to_target")}}


def full_run(name: str, mnist, **changes) -> dict:
    """Train preset `name` (bench_config: "PRESET/CELL" too; with `changes` to its config) to the end: test
    accuracy and wall time."""
    config = bench_config(name).replace(**changes)
    started = time.perf_counter()
    history = fit(config, data=mnist)
    return {"preset": name, "seed": config.seed, "epochs_asked": config.epochs,
            "test_accuracy": history.test["accuracy"], "wall_seconds": time.perf_counter() - started,
            "train_seconds": history.train_seconds, "epochs": len(history.epochs), "best_epoch": history.best_epoch,
            "stopped": history.stopped}


def spread(values: list[float]) -> str:
    """Median and range, as the README writes a figure over seeds: "99.31% (99.16% to 99.33%)"."""
    return f"{statistics.median(values):.2%} ({min(values):.2%} to {max(values):.2%})"


# -- the report --------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_core.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=["default", "tutorial", "bilstm", "pixel", "gru", "rnn",
                                                          "pixel/gru", "pixel/rnn"],
                        help="presets to time; PRESET/CELL: the preset with another recurrent cell")
    parser.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda, cuda:N")
    parser.add_argument("--quick", action="store_true", help="skip evaluation and latency")
    parser.add_argument("--samples", type=int, default=12800, help="training samples per throughput figure")
    parser.add_argument("--tta", action="store_true", help="time for `default` to reach 99.0%% test accuracy")
    parser.add_argument("--tta-preset", default="default", help="the preset --tta trains (default: default)")
    parser.add_argument("--tta-target", type=float, default=0.99, help="the test accuracy --tta waits for")
    parser.add_argument("--tta-epochs", type=int, default=0, help="train this many epochs (0: the preset's)")
    parser.add_argument("--tta-seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="train once per seed (default: the preset's); with several, their median and range")
    parser.add_argument("--full", nargs="*", default=[], metavar="PRESET",
                        help="train these presets (or PRESET/CELL) to the end")
    parser.add_argument("--full-seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="train each --full preset once per seed: their median and range")
    parser.add_argument("--full-epochs", type=int, default=0, help="--full trains this many epochs (0: the preset's)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    mnist = load_mnist()
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
              "device": str(device), "fused_lstm": None if gpu else cpu.available(),   # (no GPU row builds it)
              "threads": torch.get_num_threads(), "torch": torch.__version__, "timing": TIMING, "train": []}
    if gpu:
        result["gpu"] = torch.cuda.get_device_name(device)
        # a GPU's speed does not drift like a shared CPU's: one timing of each peak serves every preset
        peak, bound = peak_flops(device), None
        print(f"{result['gpu']}: GEMM peak " + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in peak.items())
              + " TFLOP/s; each row's roofline is against the peak of the dtype its LSTM computes in", flush=True)
    else:
        print("peak: the best of three large-GEMM timings just before each preset; GEMM-only: the roofline "
              "fraction of the fused\nkernel's GEMMs alone (best of three, in turn with the peak), without gate "
              "loops, optimizer or data", flush=True)
    print(f"samples/s: {TIMING}", flush=True)
    print(table_header(device), flush=True)
    for name in args.presets:
        base = bench_config(name).replace(device=str(device))
        samples = args.samples // 8 if base.seq_mode != "rows" else args.samples   # 784 steps: slower
        try:
            baseline = baseline_throughput(base, batches=10 if base.seq_mode != "rows" else 60)
        except (ImportError, RuntimeError) as exc:     # a bare GPU host has no torchvision, or not its files
            baseline = None
            if "baseline_skipped" not in result:
                result["baseline_skipped"] = f"{type(exc).__name__}: {exc}"[:200]
                print(f"baseline skipped: {result['baseline_skipped']}", flush=True)
        if not gpu:   # measured just before this preset's runs: a shared host's speed drifts over a long benchmark
            peak, bound = ceilings(base, peak_keys(device))
        for variant, config in variants(base, device):
            result["train"].append(row := train_row(name, variant, config, mnist, samples, peak, baseline, bound))
            print(table_line(row, device), flush=True)
    if not args.quick:
        result["eval_samples_per_s"] = eval_throughput(mnist, device=str(device))
        print(f"evaluation (default, 10,000 test samples): {result['eval_samples_per_s']:,.0f} samples/s",
              flush=True)
        result["predict"] = predict_latency(mnist)
        print(f"draw prediction (default): p50 {result['predict']['p50_ms']:.2f} ms, "
              f"p99 {result['predict']['p99_ms']:.2f} ms", flush=True)
    if args.tta:
        seeds = args.tta_seeds or [preset(args.tta_preset).seed]
        goal = f"{args.tta_target:.1%} test accuracy ({args.tta_preset})"
        runs = []
        for seed in seeds:
            runs.append(tta := time_to_accuracy(mnist, args.tta_preset, args.tta_target, args.tta_epochs,
                                                device=str(device), seed=seed))
            print(f"seed {seed}: time to {goal}: {tta['seconds_to_target']:.0f} s" if tta["seconds_to_target"]
                  else f"seed {seed}: never reached {goal}", f"(final {tta['final_test_accuracy']:.2%} after "
                  f"{tta['wall_seconds']:.0f} s; per epoch: " + ", ".join(f"{a:.2%}" for _, _, a in tta["curve"])
                  + ")", flush=True)
        result["time_to_accuracy"] = runs[0]
        if len(runs) > 1:
            result["time_to_accuracy_seeds"] = summary = seed_summary(seeds, runs)
            print(f"over seeds {', '.join(map(str, seeds))}: final test accuracy median "
                  f"{summary['final_test_accuracy']['median']:.2%} (range {summary['final_test_accuracy']['min']:.2%} "
                  f"to {summary['final_test_accuracy']['max']:.2%}), wall time median "
                  f"{summary['wall_seconds']['median']:.0f} s, time to target median "
                  + (f"{reached['median']:.0f} s ({reached['min']:.0f} to {reached['max']:.0f} s"
                     f"{', not reached by ' + str(reached['missing']) if reached['missing'] else ''})"
                     if (reached := summary["seconds_to_target"])["median"] is not None else "never reached"),
                  flush=True)
    out = saves_root() / "bench" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["full"] = []
    for name in args.full:
        rows = []
        for seed in args.full_seeds or [None]:
            atomic_write_json(out, result)                      # full runs are long: keep what is measured so far
            changes = {"device": str(device), **({"seed": seed} if seed is not None else {}),
                       **({"epochs": args.full_epochs} if args.full_epochs else {})}
            result["full"].append(row := full_run(name, mnist, **changes))
            rows.append(row)
            print(f"full {name}, seed {row['seed']}: test accuracy {row['test_accuracy']:.2%} in "
                  f"{row['wall_seconds']:.0f} s ({row['epochs']} epochs, best {row['best_epoch']}, {row['stopped']})",
                  flush=True)
        if len(rows) > 1:
            print(f"full {name} over seeds {', '.join(str(r['seed']) for r in rows)}: test accuracy median "
                  f"{spread([r['test_accuracy'] for r in rows])}, wall time median "
                  f"{statistics.median(r['wall_seconds'] for r in rows):.0f} s", flush=True)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory of this process: {result['peak_rss_mb']:.0f} MB", flush=True)
    atomic_write_json(out, result)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
