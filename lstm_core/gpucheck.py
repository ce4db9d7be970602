"""A GPU host's check: `make gpu-check` (python -m lstm_core.gpucheck). Runs the CUDA tests, then measures
what training costs on this GPU; one JSON file, a table, and a non-zero exit when a check fails.

    python -m lstm_core.gpucheck                          # on the GPU, within 450 s (one try of ~8 minutes)
    python -m lstm_core.gpucheck --device cpu --small     # the same stages on a CPU, in small
    python -m lstm_core.gpucheck --skip-tests --out gpu.json --budget 300

Before anything, MNIST must load from the data folder (data.default_data_dir: $LSTM_DATA, else SAVES/data;
the IDX files there or in its MNIST/raw), the folder the tests read too; else one line says which files
are missing where, and the exit code is 2. Stages, in order, each with a deadline (its share of the
budget left when it starts: time one stage leaves goes to the later ones), the JSON written after each
(and after each throughput row), so a run cut short keeps what it measured:
  tests       tests/test_cuda.py -m cuda in a subprocess of its own process group: its pass/fail counts. At
              its deadline the whole group is killed, training processes the tests started included
  peak        the GEMM peak FLOP/s: TF32 (fp32 with TF32 allowed), bf16 and fp16 on a GPU; fp32 (and
              bf16) on a CPU
  throughput  samples/s of each preset at its batch size: fp32 (TF32), amp=auto (with its policy) and, for
              the LSTMs, fp32 on torch's own CUDA LSTM (cuDNN off); a roofline against the peak of the dtype
              the LSTM computes in (bench.py's rows, timing training steps only; on a CPU its CPU rows)
  tta         `default` trained for its 15 epochs (amp=auto, as a user trains it): when it first reaches
              99.0% test accuracy
  pixel       one epoch of `pixel` (784 steps a sample, amp=auto): wall seconds and the test accuracy after it

A check fails when the CUDA tests fail or none ran on a GPU, a stage raises or is cut at its deadline, a
throughput is not positive, a GPU row's roofline is not below 1, or (not --small) `default` never reaches
99.0%; the exit code is then 1. Without the device asked for (the default is cuda) it stops at once with
one line and exit code 2. It needs nothing beyond torch, numpy and pytest: a bare GPU host has no
streamlit, optuna, plotly, pandas, torchvision or tensorboard. A GPU in exclusive-process compute mode is
named in one line (the tests that need a second process on it skip themselves); where the report's
folder cannot be written (a read-only checkout) the report goes to a temporary folder, and a line says where.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from . import REPO, bench, cpu
from .config import preset
from .data import DataUnavailable, default_data_dir, idx_problem, load_mnist
from .devices import policy_for, resolve_device
from .runs import atomic_write_json, saves_root

PRESETS = ["default", "tutorial", "bilstm", "pixel", "cnn"]
TESTS = REPO / "tests" / "test_cuda.py"
BUDGET = 450.0     # seconds for all the stages: one try of about 8 minutes, less start-up and the verdict
# each stage's share of the budget; at its start a stage gets its share of what is left among the stages
# still to run (the last gets all of it). The tests are most of it: a failing test is the finding that counts
SHARES = {"tests": 0.5, "peak": 0.03, "throughput": 0.2, "tta": 0.17, "pixel": 0.1}
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


# -- time limits -------------------------------------------------------------------------------
class StageTimeout(BaseException):
    """A stage ran past its deadline. Not an Exception, like KeyboardInterrupt: the handlers that keep a stage
    going past one failure (a throughput row's) must not keep it going past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise StageTimeout inside the block once `seconds` have passed. It arrives between two Python
    bytecodes, so a torch op under way ends first; one that never returns (a hung GPU) is for the caller's
    own time limit, and the report written after every stage keeps what was measured before it. Only
    the main thread gets signals: elsewhere the block runs without a deadline."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise StageTimeout(f"cut at its deadline of {seconds:.1f} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_group(command: list[str], timeout: float, echo=print, cwd: Path = REPO) -> dict:
    """`command` in a session (and process group) of its own, each line of its output to `echo` as it comes.
    At `timeout` seconds the whole group is killed, and when the command ends so is whatever it left running:
    a training process a test started would otherwise keep the GPU from the stages after it."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            echo(lines[-1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=10)   # a process that left the group may hold the pipe open: not worth a hang
    return {"returncode": proc.returncode, "timed_out": timed_out, "timeout_s": timeout,
            "seconds": time.perf_counter() - started, "lines": lines}


# -- the GPU's compute mode --------------------------------------------------------------------
def compute_mode(gpu: str) -> str | None:
    """nvidia-smi's compute mode of `gpu` (an index or GPU-<uuid>): Default, Exclusive_Process or
    Prohibited; None where nvidia-smi is missing or does not answer."""
    try:
        out = subprocess.run(["nvidia-smi", f"--id={gpu}", "--query-gpu=compute_mode", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    mode = out.stdout.strip()
    return mode if out.returncode == 0 and mode else None


def nvidia_smi_id(device: torch.device) -> str:
    """`device` as nvidia-smi names it: by UUID, since CUDA_VISIBLE_DEVICES renumbers torch's indices."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"GPU-{uuid}" if uuid else str(device.index or 0)


def sharing_problem(mode: str | None) -> str | None:
    """One line when a GPU in compute mode `mode` cannot have two processes on it at once; else None."""
    if mode is None or mode == "Default":
        return None
    return (f"the GPU's compute mode is {mode}: only one process at a time can hold a CUDA context on it, so "
            "the tests that need a second process on it are skipped")


def second_process_problem(device: torch.device) -> str | None:
    """None when another process can compute on `device` while this one holds a CUDA context there; else one
    line saying why not. nvidia-smi's compute mode where it answers; else this process takes a context and
    a child process tries for one (so never call it where this process must stay off the GPU)."""
    mode = compute_mode(nvidia_smi_id(device))
    if mode is not None:
        return sharing_problem(mode)
    torch.zeros(1, device=device)
    probe = subprocess.run([sys.executable, "-c", f"import torch; torch.zeros(1, device='cuda:{device.index or 0}')"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return (f"a second process could not use {device} beside this one ({last}): the GPU is likely in "
            "exclusive-process compute mode, so the tests that need a second process on it are skipped")


# -- where the report goes ---------------------------------------------------------------------
def writable(path: Path) -> tuple[Path, str | None]:
    """`path` when its folder can be written here; else the same name in a new temporary folder (a read-only
    checkout), with one line saying so and where."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
        return path, None
    except OSError as exc:
        moved = Path(tempfile.mkdtemp(prefix="lstm-gpucheck-")) / path.name
        return moved, f"{path.parent} cannot be written ({exc.strerror or exc}): the report goes to {moved}"


# -- the stages --------------------------------------------------------------------------------
def run_tests(path: Path = TESTS, timeout: float = BUDGET * SHARES["tests"], echo=print) -> dict:
    """`pytest PATH -m cuda` from the repository root, in a process group of its own killed at `timeout`
    seconds (run_group): its exit code and counts. Each line of its output goes to `echo` as it comes."""
    command = [sys.executable, "-m", "pytest", str(path), "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    run = run_group(command, timeout, lambda line: echo(f"  | {line}"))
    lines = run.pop("lines")
    return {"path": str(path), "command": " ".join(command[1:]), **run, **pytest_counts(lines, run["returncode"]),
            "tail": lines[-30:]}


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


def throughput(mnist, device: torch.device, plan: Plan, peak: dict, presets=PRESETS, echo=print):
    """bench.py's table rows for every preset in `presets`, one at a time as each is measured, their rooflines
    against `peak`; on a CPU against each preset's own best-of-three peak just before it, as `make bench`
    does there, since a shared host's speed drifts. A row that raises is kept as its error."""
    for name in presets:
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
            yield row


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
    stages = result.get("stages", {})
    tests = result.get("tests")
    if "error" in stages.get("tests", {}):
        found.append(f"the CUDA tests could not be run: {stages['tests']['error']}")
    elif tests:
        if tests["timed_out"]:
            found.append(f"the CUDA tests did not finish in their {tests['timeout_s']:.0f} s (their process group "
                         "was killed)")
        elif tests["returncode"] == 5:
            found.append(f"no CUDA test was collected from {tests['path']} ({tests['summary']})")
        elif tests["returncode"] != 0:
            found.append(f"the CUDA tests failed: {tests['summary']}")
        elif device.type == "cuda" and tests["passed"] == 0:
            found.append(f"no CUDA test ran on this GPU: {tests['summary']}")
    for stage, record in stages.items():
        if stage == "tests":
            continue
        if "error" in record:
            found.append(f"{stage} failed: {record['error']}")
        elif record.get("timed_out"):
            found.append(f"{stage} was cut at its {record['deadline_s']:.1f} s deadline (of a "
                         f"{result['budget_s']:.0f} s budget)")
        elif "skipped" in record:
            found.append(f"{stage} did not run: {record['skipped']}")
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
    if not small and tta and tta["seconds_to_target"] is None:
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
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m lstm_core.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default; fails when there is no GPU), cuda:N, "
                                                         "auto, or cpu")
    parser.add_argument("--small", action="store_true", help="a few batches per figure, one short epoch for the "
                                                             "time to accuracy, a slice of the pixel epoch")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for all the stages together "
                        f"(default {BUDGET:.0f}); each stage is cut at its share of them")
    parser.add_argument("--out", type=Path, help="the JSON file (default SAVES/bench/gpucheck-<time>.json)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    parser.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS, metavar="PRESET",
                        help="the presets the throughput stage measures (default: all)")
    parser.add_argument("--tests", type=Path, default=TESTS, help=argparse.SUPPRESS)   # another tests file
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        build = "" if torch.version.cuda else f" (this torch, {torch.__version__}, is a CPU-only build)"
        print(f"gpucheck: {exc}{build}; `--device cpu --small` checks the CPU instead", file=sys.stderr)
        return 2
    data_dir = default_data_dir()
    try:      # before the tests, which read the same folder (tests/conftest.py)
        mnist = load_mnist(data_dir)
    except DataUnavailable as exc:
        why = idx_problem(data_dir) or str(exc).splitlines()[0]
        print(f"gpucheck: {why}; put MNIST's four IDX files there, or point $LSTM_DATA at their folder",
              file=sys.stderr)
        return 2
    plan = SMALL if args.small else FULL
    out, moved = writable(args.out or saves_root() / "bench" /
                          f"gpucheck-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    say = lambda text: print(f"[{time.perf_counter() - started:5.0f}s] {text}", flush=True)  # noqa: E731
    echo = lambda text: print(text, flush=True)  # noqa: E731
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "small": args.small,
              "budget_s": args.budget, "data": str(data_dir), **device_info(device), "stages": {}}
    say(f"gpucheck on {result.get('gpu', 'the CPU')} ({device}), {'small' if args.small else 'full'} plan, "
        f"{args.budget:.0f} s budget; writing {out}")
    if moved:
        say(moved)
    if device.type == "cuda":    # nvidia-smi only: this process must hold no CUDA context while the tests run
        result["compute_mode"] = mode = compute_mode(nvidia_smi_id(device))
        say(f"compute mode: {sharing_problem(mode) or mode or 'unknown (no answer from nvidia-smi)'}")
    todo = [name for name in SHARES if name != "tests" or not args.skip_tests]

    def stage(name: str, measure, needs: str | None = None) -> None:
        """Run stage `name` under its deadline, record how it ended in result["stages"] and write the report.
        `measure` returns the stage's result (None: it stored its own as it went)."""
        left = args.budget - (time.perf_counter() - started)
        seconds = left * SHARES[name] / sum(SHARES[n] for n in todo[todo.index(name):])
        record = result["stages"][name] = {"deadline_s": round(seconds, 1)}
        begun = time.perf_counter()
        if needs is not None and needs not in result:
            record["skipped"] = f"it needs the {needs} stage's result"
        elif seconds <= 0:
            record["skipped"] = f"the {args.budget:.0f} s budget was spent"
        else:
            try:
                if name == "tests":         # a subprocess with its own deadline, the group killed at it
                    result[name] = measure(seconds)
                    record["timed_out"] = result[name]["timed_out"]
                else:
                    with deadline(seconds):
                        value = measure()
                    if value is not None:
                        result[name] = value
            except StageTimeout:
                record["timed_out"] = True
                say(f"{name}: cut at its {seconds:.1f} s deadline; what it measured before is kept")
            except Exception as exc:  # noqa: BLE001 - a failed stage is reported; the later ones still run
                traceback.print_exc()
                record["error"] = error_text(exc)
                say(f"{name} failed: {record['error']}")
        record["seconds"] = time.perf_counter() - begun
        result["elapsed_s"] = time.perf_counter() - started
        atomic_write_json(out, result)

    if not args.skip_tests:
        say(f"tests: {args.tests} -m cuda")
        stage("tests", lambda seconds: run_tests(args.tests, seconds, echo=echo))
        say(f"tests: {result.get('tests', {}).get('summary', result['stages']['tests'].get('error'))}")
    # a GPU's speed holds still: one timing each; a shared CPU's drifts, so the best of three
    stage("peak", lambda: bench.peak_flops(device, plan.peak_seconds, tries=1 if device.type == "cuda" else 3))
    if "peak" in result:
        say("GEMM peak: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in result["peak"].items()))
    say(f"throughput (training samples/s in fit, {bench.TIMING}; roofline against the peak of the dtype the "
        "LSTM computes in)")
    echo(bench.table_header(device))
    result["throughput"] = []

    def measure_throughput() -> None:
        for row in throughput(mnist, device, plan, result["peak"], args.presets, echo):
            result["throughput"].append(row)
            atomic_write_json(out, result)

    stage("throughput", measure_throughput, needs="peak")     # (a row's roofline needs the peak)
    say(f"time to {TTA_TARGET:.1%}: default, {plan.tta_epochs} epoch(s)")
    stage("tta", lambda: time_to_target(mnist, device, plan))
    if "tta" in result:
        tta = result["tta"]
        reached = f"{tta['seconds_to_target']:.1f} s" if tta["seconds_to_target"] else "not reached"
        say(f"time to {TTA_TARGET:.1%}: {reached}; final {tta['final_test_accuracy']:.2%} after "
            f"{tta['wall_seconds']:.1f} s ({tta['amp']}); per epoch "
            + ", ".join(f"{acc:.2%}" for _, _, acc in tta["curve"]))
    say(f"pixel: one epoch of {plan.pixel_limit or 'all'} training samples")
    stage("pixel", lambda: pixel_epoch(mnist, device, plan))
    if "pixel" in result:
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
