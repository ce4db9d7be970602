"""The benchmark suite (`make bench`): its FLOP counts, its report and its modes, on small slices."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from lstm_core import bench, cpu, train
from lstm_core.bench import flops_per_sample, gemm_bound, predict_latency
from lstm_core.config import preset
from lstm_core.devices import cpu_has_bf16

from conftest import DATA_DIR, REPO


def test_flops_per_sample_follow_the_model_shapes():
    two_by_128 = preset("default").replace(num_layers=2, hidden_size=128)
    assert flops_per_sample(two_by_128) == pytest.approx(35.5e6, rel=0.01)          # the issue's ~35 MFLOP
    bi = two_by_128.replace(bidirectional=True)
    assert flops_per_sample(bi) > 2 * flops_per_sample(two_by_128)                   # layer 2 reads 2H features
    pixel = preset("pixel")
    assert flops_per_sample(pixel) == pytest.approx(3 * (784 * 8 * 128 * 129 + 2 * 128 * 10))


@pytest.mark.slow
def test_bench_writes_a_report_with_roofline_baseline_and_time_to_accuracy(tmp_path):
    env = {**os.environ, "LSTM_SAVES": str(tmp_path), "LSTM_DATA": str(DATA_DIR)}
    out = subprocess.run([sys.executable, "-m", "lstm_core.bench", "--quick", "--presets", "default", "--samples",
                          "1280", "--tta", "--tta-epochs", "1", "--tta-target", "0.9"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "roofline" in out.stdout and "time to 90.0% test accuracy (default)" in out.stdout
    [report] = (tmp_path / "bench").glob("*.json")
    result = json.loads(report.read_text())
    assert result["timing"] == bench.TIMING and f"samples/s: {bench.TIMING}" in out.stdout   # what it times
    rows = {row["dtype"]: row for row in result["train"]}
    assert set(rows) >= {"fp32"} | ({"fp32-torch"} if cpu.available() else set())
    for row in rows.values():
        assert row["samples_per_s"] > 0 and 0 < row["roofline"] < 1 and row["baseline_samples_per_s"] > 0
    if cpu.available():   # the kernel row's ceiling: its GEMMs alone
        assert rows["fp32"]["gemm_only_roofline"] > 0 and "GEMM-only" in out.stdout
    tta = result["time_to_accuracy"]
    assert len(tta["curve"]) == 1 and tta["final_test_accuracy"] > 0.9                # one epoch of real data
    assert tta["seconds_to_target"] == pytest.approx(tta["curve"][0][1])
    assert result["peak_rss_mb"] > 0


def test_throughput_times_training_without_the_gradient_probe_of_each_progress_record(mnist, monkeypatch):
    """Every progress record of an LSTM runs the gradient-over-time probe (a backward through every time
    step). Here each probe costs 1000 s on the clock train.py reads: inside a timed window it would hold
    every window of one batch of 64 to under 0.1 samples/s."""
    class Clock:                      # the time module, with the probe's cost added to perf_counter
        def __init__(self):
            self.probe_seconds, self.probes = 0.0, 0

        def perf_counter(self):
            return time.perf_counter() + self.probe_seconds

        def __getattr__(self, name):
            return getattr(time, name)

    clock, probe = Clock(), train.step_gradient_norms

    def costly_probe(*args, **kwargs):
        clock.probe_seconds += 1000.0
        clock.probes += 1
        return probe(*args, **kwargs)

    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(train, "step_gradient_norms", costly_probe)
    config = preset("default").replace(device="cpu", batch_size=64)
    rate = bench.train_throughput(config, mnist, samples=5 * 64, log_every=1)
    assert clock.probes >= 5                            # a probe after every batch, between the windows
    assert rate > 1.0, f"{rate:.3f} samples/s: the probe's time is inside the timed windows"


def test_gemm_bound_follows_the_kernels_gemms():
    if not cpu.available():
        assert gemm_bound(preset("default")) is None
        return
    default = preset("default")
    assert gemm_bound(default.replace(hidden_size=256)) < gemm_bound(default) / 2   # ~3.3x the GEMM FLOPs
    assert gemm_bound(preset("cnn")) is None


def test_prediction_latency_is_measured_on_canvas_sized_drawings(mnist):
    latency = predict_latency(mnist, repeats=20)
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]


def test_a_gpu_trains_fp32_as_tf32_amp_and_without_cudnn():
    """The rows a GPU gets, planned without one: fp32 (amp off, TF32), amp=auto, and torch's own CUDA LSTM
    for LSTMs; a row's peak is the one of the dtype its LSTM computes in."""
    gpu = torch.device("cuda", 0)
    rows = {name: config.amp for name, config in bench.variants(preset("default"), gpu)}
    assert rows == {"fp32": "off", "amp": "auto", "fp32-native": "off"}
    assert [name for name, _ in bench.variants(preset("cnn"), gpu)] == ["fp32", "amp"]
    assert bench.peak_key(torch.float32, gpu) == "tf32" and bench.peak_key(torch.float32, torch.device("cpu")) == "fp32"
    assert bench.peak_keys(gpu) == ["tf32", "bf16", "fp16"]


def test_a_row_is_held_to_the_peak_of_the_dtype_its_lstm_computes_in(mnist):
    config = preset("default").replace(device="cpu", amp="bf16")
    row = bench.train_row("default", "bf16", config, mnist, 512, {"fp32": 1e12, "bf16": 4e12}, log_every=1)
    # bf16 autocast runs the LSTM in bf16 only where the CPU has bf16 instructions, else in fp32
    assert row["peak_dtype"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert row["matmul_gflops"] == (4e3 if cpu_has_bf16() else 1e3) and row["speedup"] is None


def test_the_cpu_table_keeps_its_columns():
    row = {"preset": "default", "dtype": "fp32", "samples_per_s": 8566.2, "mflop_per_sample": 13.43, "gflops": 115.0,
           "matmul_gflops": 124.0, "roofline": 0.93, "gemm_only_roofline": 1.19, "baseline_samples_per_s": 2442.0,
           "speedup": 3.51, "amp": "fp32"}
    cpu = torch.device("cpu")
    assert bench.table_header(cpu) == ("preset    dtype       samples/s  MFLOP/sample  GFLOP/s  peak  roofline  "
                                       "GEMM-only  baseline  speedup")
    assert bench.table_line(row, cpu) == ("default   fp32             8566          13.4    115.0   124       93%"
                                          "       119%      2442     3.5x")
    # on a GPU: TFLOP/s, finer percentages, the amp policy; no baseline where torchvision is missing
    gpu = {**row, "gflops": 1300.0, "matmul_gflops": 495000.0, "roofline": 0.0026, "gemm_only_roofline": None,
           "baseline_samples_per_s": None, "speedup": None, "amp": "fp16 autocast with loss scaling"}
    line = bench.table_line(gpu, torch.device("cuda", 0))
    assert line.split() == ["default", "fp32", "8566", "13.4", "1.3", "495", "0.3%", "fp16", "autocast", "with",
                            "loss", "scaling"]


@pytest.mark.slow
def test_bench_without_torchvision_skips_the_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)           # a bare GPU host
    monkeypatch.setenv("LSTM_SAVES", str(tmp_path))
    assert bench.main(["--quick", "--presets", "cnn", "--samples", "256", "--device", "cpu"]) == 0
    [report] = (tmp_path / "bench").glob("*.json")
    result = json.loads(report.read_text())
    assert "torchvision" in result["baseline_skipped"] and "baseline skipped" in capsys.readouterr().out
    for row in result["train"]:
        assert row["samples_per_s"] > 0 and row["baseline_samples_per_s"] is None and row["speedup"] is None


def test_a_seed_summary_is_the_median_and_range_over_the_seeds():
    runs = [{"final_test_accuracy": acc, "wall_seconds": wall, "seconds_to_target": reached}
            for acc, wall, reached in ((0.990, 10.0, 5.0), (0.985, 12.0, None), (0.992, 11.0, 6.0))]
    summary = bench.seed_summary([0, 1, 2], runs)
    assert summary["final_test_accuracy"] == {"median": 0.990, "min": 0.985, "max": 0.992, "missing": 0}
    assert summary["wall_seconds"]["median"] == 11.0
    assert summary["seconds_to_target"] == {"median": 5.5, "min": 5.0, "max": 6.0, "missing": 1}   # one never did


def test_the_cells_flops_follow_their_gate_counts():
    """At equal width a GRU does 3/4 of an LSTM's GEMM work and an RNN 1/4: the rooflines compare them."""
    lstm = preset("default")
    recurrent = lambda config: flops_per_sample(config) - 3 * 2 * 128 * 10     # noqa: E731 - less the head
    assert recurrent(lstm.replace(cell="gru")) == pytest.approx(recurrent(lstm) * 3 / 4)
    assert recurrent(lstm.replace(cell="rnn")) == pytest.approx(recurrent(lstm) / 4)
    assert bench.bench_config("pixel/gru") == preset("pixel").replace(cell="gru")
    assert bench.bench_config("gru") == preset("gru")


def test_only_the_lstm_has_a_kernel_row_and_a_gemm_ceiling():
    for name in ("gru", "rnn", "pixel/irnn"):
        config = bench.bench_config(name)
        assert [variant for variant, _ in bench.variants(config, torch.device("cpu"))][:2] != ["fp32", "fp32-torch"]
        assert gemm_bound(config) is None


def test_full_runs_over_seeds_give_the_median_and_range(tmp_path, monkeypatch, capsys, mnist):
    """--full PRESET/CELL --full-seeds: one run per seed of the preset with that cell, then their spread."""
    monkeypatch.setenv("LSTM_SAVES", str(tmp_path))
    trained = []

    def fake_fit(config, callbacks=(), data=None):
        trained.append(config)
        return train.History(config, "cpu", epochs=[{}], test={"accuracy": 0.9 + config.seed / 100})

    monkeypatch.setattr(bench, "fit", fake_fit)
    monkeypatch.setattr(bench, "load_mnist", lambda: mnist)
    assert bench.main(["--quick", "--presets", "--full", "pixel/gru", "--full-seeds", "0", "1", "2",
                       "--full-epochs", "1", "--device", "cpu"]) == 0
    assert [(c.cell, c.seq_mode, c.seed, c.epochs) for c in trained] == [("gru", "pixels", s, 1) for s in (0, 1, 2)]
    out = capsys.readouterr().out
    assert "full pixel/gru over seeds 0, 1, 2: test accuracy median 91.00% (90.00% to 92.00%)" in out
