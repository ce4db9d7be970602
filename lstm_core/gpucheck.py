"""A GPU host's check: `make gpu-check` (python -m lstm_core.gpucheck). Runs the CUDA tests, then measures
what training costs on this GPU; one JSON file, a table, and a non-zero exit when a check fails.

    python -m lstm_core.gpucheck                          # on the GPU, sized for 8 minutes on an H100
    python -m lstm_core.gpucheck --device cpu --small     # the same stages on a CPU, in small
    python -m lstm_core.gpucheck --skip-tests --out gpu.json

Stages, in order, each written to the JSON as it ends (a run cut short keeps what it measured):
  tests       tests/test_cuda.py -m cuda in a subprocess: its pass/fail counts
  peak        the GEMM peak FLOP/s: TF32 (fp32 with TF32 allowed), bf16 and fp16 on a GPU; fp32 (and
              bf16) on a CPU
  throughput  samples/s of each preset at its batch size: fp32 (TF32), amp=auto (with its policy) and, for
              the LSTMs, fp32 on torch's own CUDA LSTM (cuDNN off); a roofline against the peak of the dtype
              the LSTM computes in (bench.py's rows; on a CPU bench.py's CPU rows)
  tta         `default` trained for its 15 epochs (amp=auto, as a user trains it): when it first reaches
              99.0% test accuracy
  pixel       one epoch of `pixel` (784 steps a sample, amp=auto): wall seconds and the test accuracy after it

A check fails when the CUDA tests fail or none ran on a GPU, a stage raises, a throughput is not positive,
a GPU row's roofline is not below 1, or (not --small) `default` never reaches 99.0%; the exit code is then
1. Without the device asked for (the default is cuda) it stops at once with one line and exit code 2. It
reads MNIST from $LSTM_DATA and needs nothing beyond torch, numpy and pytest: a bare GPU host has no
streamlit, optuna, plotly, pandas or torchvision.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from . import REPO, bench, cpu
from .config import preset
from .data import DataUnavailable, load_mnist
from .devices import policy_for, resolve_device
from .runs import atomic_write_json, saves_root

PRESETS = ["default", "tutorial", "bilstm", "pixel", "cnn"]
TESTS = REPO / "tests" / "test_cuda.py"
TESTS_TIMEOUT = 300          # seconds: the measurements after them need the rest of the 8 minutes
TTA_TARGET = 0.99


@dataclass(frozen=True)
class Plan:
    """How much each stage measures."""
    batches: int           # training batches per throughput figure, 28-step presets and the CNN
    pixel_batches: int     # the same for 784-step presets
    peak_seconds: float    # per GEMM peak timing
    tta_epochs: int        # `default`'s epochs for the time to 99.0%
    tta_limit: int         # its training samples; 0 = all 55,000
    pixel_limit: int       # the `pixel` epoch's training samples; 0 = all 55,000
    val_size: int          # validation samples of the tta and pixel runs
    test_size: int         # their test samples; 0 = all 10,000


# Sized for an H100 with room to spare: throughput over a few dozen batches, not epochs; the full `default`
# schedule (onecycle needs its 15 epochs to anneal); one whole `pixel` epoch
FULL = Plan(batches=100, pixel_batches=40, peak_seconds=0.5, tta_epochs=15, tta_limit=0, pixel_limit=0,
            val_size=5000, test_size=0)
SMALL = Plan(batches=4, pixel_batches=2, peak_seconds=0.2, tta_epochs=1, tta_limit=5000, pixel_limit=500,
             val_size=1000, test_size=1000)


# -- the stages --------------------------------------------------------------------------------
def run_tests(path: Path = TESTS, timeout: float = TESTS_TIMEOUT, echo=print) -> dict:
    """`pytest PATH -m cuda` in a subprocess from the repository root: its exit code and counts. Each line
    of its output goes to `echo` as it comes."""
    command = [sys.executable, "-m", "pytest", str(path), "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed_out = threading.Event()
    timer = threading.Timer(timeout, lambda: (timed_out.set(), proc.kill()))
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            echo(f"  | {lines[-1]}")
        proc.wait()
    finally:
        timer.cancel()
    return {"path": str(path), "command": " ".join(command[1:]), "returncode": proc.returncode,
            "timed_out": timed_out.is_set(), "seconds": time.perf_counter() - started,
            **pytest_counts(lines, proc.returncode), "tail": lines[-30:]}


def pytest_counts(lines: list[str], returncode: int) -> dict:
    """pytest's final counts ("3 passed, 1 skipped, 2 deselected in 4.1s") and a summary: that line, or
    where pytest could not run the tests at all (a usage or internal error: a missing file, a conftest that
    does not import), its error lines."""
    counts = dict.fromkeys(["passed", "failed", "skipped", "errors", "deselected"], 0)
    summary = next((line.strip("= ") for line in reversed(lines)
                    if re.search(r"(\d+ \w+|no tests ran).* in [\d.]+s\b", line)), "")
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b", summary):
        key = "errors" if what.startswith("error") else what
        counts[key] = counts.get(key, 0) + int(n)
    if returncode not in (0, 1, 5):
        errors = [line.strip() for line in lines if line.startswith(("ERROR", "E ")) or "while loading" in line]
        summary = "; ".join(errors[:3]) or summary
    return {**counts, "summary": summary or (lines[-1].strip() if lines else "no output")}


def throughput(mnist, device: torch.device, plan: Plan, peak: dict, echo=print) -> list[dict]:
    """bench.py's table rows for every preset in PRESETS, their rooflines against `peak`; on a CPU against
    each preset's own best-of-three peak just before it, as `make bench` does there, since a shared host's
    speed drifts. A row that raises is kept as its error."""
    rows = []
    for name in PRESETS:
        base = preset(name).replace(device=str(device))
        batches = plan.batches if base.seq_mode == "rows" else plan.pixel_batches
        if device.type != "cuda":
            peak = bench.peak_flops(device, plan.peak_seconds, tries=3)
        for variant, config in bench.variants(base, device):
            try:
                row = bench.train_row(name, variant, config, mnist, batches * config.batch_size, peak,
                                      log_every=max(1, batches // 4))
                echo(bench.table_line(row, device))
            except Exception as exc:  # noqa: BLE001 - one variant's failure is a finding; the others still count
                row = {"preset": name, "dtype": variant, "error": error_text(exc)}
                echo(f"{name:<10}{variant:<11}failed: {row['error']}")
                traceback.print_exc()
            rows.append(row)
    return rows


def time_to_target(mnist, device: torch.device, plan: Plan) -> dict:
    small = {"limit_train": plan.tta_limit, "val_size": plan.val_size} if plan.tta_limit else {}
    tta = bench.time_to_accuracy(planned_data(mnist, plan), "default", TTA_TARGET, plan.tta_epochs,
                                 device=str(device), **small)
    default = preset("default")
    return {**tta, "epochs": len(tta["curve"]), "amp": policy_for(default.amp, device, default.arch).note}


def pixel_epoch(mnist, device: torch.device, plan: Plan) -> dict:
    changes = {"epochs": 1, "device": str(device)}
    if plan.pixel_limit:
        changes.update(limit_train=plan.pixel_limit, val_size=plan.val_size)
    config = preset("pixel").replace(**changes)
    return {**bench.full_run("pixel", planned_data(mnist, plan), **changes),
            "samples": plan.pixel_limit or 60000 - config.val_size, "batch_size": config.batch_size,
            "amp": policy_for(config.amp, device, config.arch).note}


def planned_data(mnist, plan: Plan):
    """MNIST with the plan's test set (a small plan's accuracies are no figure worth 10,000 test samples)."""
    return bench.first_test_samples(mnist, plan.test_size) if plan.test_size else mnist


# -- the verdict -------------------------------------------------------------------------------
def problems(result: dict, device: torch.device, small: bool) -> list[str]:
    """Every failed check in `result`, one line each; none means the host passed."""
    found = []
    tests = result.get("tests")
    if tests:
        if "error" in tests:
            found.append(f"the CUDA tests could not be run: {tests['error']}")
        elif tests["timed_out"]:
            found.append(f"the CUDA tests did not finish in {TESTS_TIMEOUT} s")
        elif tests["returncode"] == 5:
            found.append(f"no CUDA test was collected from {tests['path']} ({tests['summary']})")
        elif tests["returncode"] != 0:
            found.append(f"the CUDA tests failed: {tests['summary']}")
        elif device.type == "cuda" and tests["passed"] == 0:
            found.append(f"no CUDA test ran on this GPU: {tests['summary']}")
    for stage in ("peak", "tta", "pixel"):
        if isinstance(result.get(stage), dict) and "error" in result[stage]:
            found.append(f"{stage} failed: {result[stage]['error']}")
    for row in result.get("throughput") or []:
        what = f"{row['preset']} {row['dtype']}"
        if "error" in row:
            found.append(f"{what} failed: {row['error']}")
        elif not row["samples_per_s"] > 0:
            found.append(f"{what}: no training throughput")
        elif device.type == "cuda" and not row["roofline"] < 1:   # (a CPU's peak drifts with its neighbours)
            found.append(f"{what}: roofline {row['roofline']:.0%} of the {row['peak_dtype']} peak (a ceiling "
                         "it cannot pass: the FLOP count or the peak is wrong)")
    tta = result.get("tta")
    if not small and isinstance(tta, dict) and "error" not in tta and tta["seconds_to_target"] is None:
        found.append(f"default never reached {TTA_TARGET:.1%} test accuracy in {tta['epochs']} epochs "
                     f"(final {tta['final_test_accuracy']:.2%})")
    return found


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(threads=torch.get_num_threads(), fused_lstm=cpu.available())
    info["amp_auto"] = {arch: policy_for("auto", device, arch).note for arch in ("lstm", "cnn")}
    return info


# -- the command -------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_core.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default; fails when there is no GPU), cuda:N, "
                                                         "auto, or cpu")
    parser.add_argument("--small", action="store_true", help="a few batches per figure, one short epoch for the "
                                                             "time to accuracy, a slice of the pixel epoch")
    parser.add_argument("--out", type=Path, help="the JSON file (default SAVES/bench/gpucheck-<time>.json)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    parser.add_argument("--tests", type=Path, default=TESTS, help=argparse.SUPPRESS)   # another tests file
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        build = "" if torch.version.cuda else f" (this torch, {torch.__version__}, is a CPU-only build)"
        print(f"gpucheck: {exc}{build}; `--device cpu --small` checks the CPU instead", file=sys.stderr)
        return 2
    plan = SMALL if args.small else FULL
    out = args.out or saves_root() / "bench" / f"gpucheck-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say = lambda text: print(f"[{time.perf_counter() - started:5.0f}s] {text}", flush=True)  # noqa: E731
    echo = lambda text: print(text, flush=True)  # noqa: E731
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "small": args.small,
              **device_info(device)}
    say(f"gpucheck on {result.get('gpu', 'the CPU')} ({device}), {'small' if args.small else 'full'} plan; "
        f"writing {out}")

    def stage(name: str, measure) -> None:
        try:
            result[name] = measure()
        except Exception as exc:  # noqa: BLE001 - a failed stage is reported; the later ones still run
            traceback.print_exc()
            result[name] = {"error": error_text(exc)}
            say(f"{name} failed: {result[name]['error']}")
        result["elapsed_s"] = time.perf_counter() - started
        atomic_write_json(out, result)

    if not args.skip_tests:
        say(f"tests: {args.tests} -m cuda")
        stage("tests", lambda: run_tests(args.tests, echo=echo))
        say(f"tests: {result['tests'].get('summary', result['tests'].get('error'))}")
    try:
        mnist = load_mnist()
    except DataUnavailable as exc:     # nothing to measure; the tests' verdict still stands
        print(f"gpucheck: {exc}", file=sys.stderr)
        return finish(result, [str(exc).splitlines()[0]] + problems(result, device, args.small), out, say)
    # a GPU's speed holds still: one timing each; a shared CPU's drifts, so the best of three
    stage("peak", lambda: bench.peak_flops(device, plan.peak_seconds, tries=1 if device.type == "cuda" else 3))
    if "error" not in result["peak"]:
        say("GEMM peak: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in result["peak"].items()))
    say("throughput (training samples/s in fit; roofline against the peak of the dtype the LSTM computes in)")
    echo(bench.table_header(device))
    if "error" not in result["peak"]:     # (a row's roofline needs the peak)
        stage("throughput", lambda: throughput(mnist, device, plan, result["peak"], echo))
    say(f"time to {TTA_TARGET:.1%}: default, {plan.tta_epochs} epoch(s)")
    stage("tta", lambda: time_to_target(mnist, device, plan))
    if "error" not in result["tta"]:
        tta = result["tta"]
        reached = f"{tta['seconds_to_target']:.1f} s" if tta["seconds_to_target"] else "not reached"
        say(f"time to {TTA_TARGET:.1%}: {reached}; final {tta['final_test_accuracy']:.2%} after "
            f"{tta['wall_seconds']:.1f} s ({tta['amp']}); per epoch "
            + ", ".join(f"{acc:.2%}" for _, _, acc in tta["curve"]))
    say(f"pixel: one epoch of {plan.pixel_limit or 'all'} training samples")
    stage("pixel", lambda: pixel_epoch(mnist, device, plan))
    if "error" not in result["pixel"]:
        px = result["pixel"]
        say(f"pixel: one epoch ({px['samples']:,} samples, batch {px['batch_size']}, {px['amp']}) in "
            f"{px['wall_seconds']:.1f} s, test accuracy {px['test_accuracy']:.2%}")
    result["elapsed_s"] = time.perf_counter() - started
    return finish(result, problems(result, device, args.small), out, say)


def finish(result: dict, found: list[str], out: Path, say) -> int:
    """Write the verdict into the report, print it, and return the exit code: 1 when a check failed."""
    result["problems"], result["passed"] = found, not found
    atomic_write_json(out, result)
    for line in found:
        print(f"FAILED: {line}", flush=True)
    say(f"{'all checks passed' if not found else f'{len(found)} check(s) failed'}; written to {out}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
