"""The benchmark suite (`make bench`): its FLOP counts, its report and its modes, on small slices."""
import json
import os
import subprocess
import sys

import pytest

from lstm_core import fused
from lstm_core.bench import flops_per_sample, gemm_bound, predict_latency
from lstm_core.config import preset

from conftest import DATA_DIR, REPO


def test_flops_per_sample_follow_the_model_shapes():
    two_by_128 = preset("default").replace(num_layers=2, hidden_size=128)
    assert flops_per_sample(two_by_128) == pytest.approx(35.5e6, rel=0.01)          # the issue's ~35 MFLOP
    bi = two_by_128.replace(bidirectional=True)
    assert flops_per_sample(bi) > 2 * flops_per_sample(two_by_128)                   # layer 2 reads 2H features
    pixel = preset("pixel")
    assert flops_per_sample(pixel) == pytest.approx(3 * (784 * 8 * 128 * 129 + 2 * 128 * 10))


def test_bench_writes_a_report_with_roofline_baseline_and_time_to_accuracy(tmp_path):
    env = {**os.environ, "LSTM_SAVES": str(tmp_path), "LSTM_DATA": str(DATA_DIR)}
    out = subprocess.run([sys.executable, "-m", "lstm_core.bench", "--quick", "--presets", "default", "--samples",
                          "1280", "--tta", "--tta-epochs", "1", "--tta-target", "0.9"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "roofline" in out.stdout and "time to 90.0% test accuracy (default)" in out.stdout
    [report] = (tmp_path / "bench").glob("*.json")
    result = json.loads(report.read_text())
    rows = {row["dtype"]: row for row in result["train"]}
    assert set(rows) >= {"fp32"} | ({"fp32-torch"} if fused.available() else set())
    for row in rows.values():
        assert row["samples_per_s"] > 0 and 0 < row["roofline"] < 1
        assert row["gflops"] == pytest.approx(row["samples_per_s"] * row["mflop_per_sample"] / 1e3)
        assert row["speedup"] == pytest.approx(row["samples_per_s"] / row["baseline_samples_per_s"])
        assert row["roofline"] == pytest.approx(row["gflops"] / row["matmul_gflops"])
    if fused.available():   # the fused row's ceiling: its GEMMs alone, against the same peak
        fp32 = rows["fp32"]
        assert fp32["gemm_only_roofline"] == pytest.approx(
            fp32["gemm_only_samples_per_s"] * fp32["mflop_per_sample"] / 1e3 / fp32["matmul_gflops"])
        assert "GEMM-only" in out.stdout
    tta = result["time_to_accuracy"]
    assert len(tta["curve"]) == 1 and tta["final_test_accuracy"] > 0.9                # one epoch of real data
    assert tta["seconds_to_target"] == pytest.approx(tta["curve"][0][1])
    assert result["peak_rss_mb"] > 0


def test_gemm_bound_follows_the_kernels_gemms():
    if not fused.available():
        assert gemm_bound(preset("default")) is None
        return
    default = preset("default")
    assert gemm_bound(default.replace(hidden_size=256)) < gemm_bound(default) / 2   # ~3.3x the GEMM FLOPs
    assert gemm_bound(preset("cnn")) is None


def test_prediction_latency_is_measured_on_canvas_sized_drawings(mnist):
    latency = predict_latency(mnist, repeats=20)
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
