"""`make gpu-check` (python -m lstm_core.gpucheck): its small CPU run on a host as bare as a GPU box, and
its verdict when a check fails."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lstm_core import gpucheck

from conftest import DATA_DIR, REPO

# what a bare GPU host lacks: gpucheck and all it imports must do without them
ABSENT = ["streamlit", "optuna", "plotly", "pandas", "torchvision", "PIL", "playwright", "scipy", "cmaes"]
BARE = ("import runpy, sys\n"
        f"for name in {ABSENT!r}:\n"
        "    sys.modules[name] = None   # import name -> ImportError\n"
        "sys.argv = ['lstm_core.gpucheck', *sys.argv[1:]]\n"
        "runpy.run_module('lstm_core.gpucheck', run_name='__main__', alter_sys=True)\n")


def gpucheck_on_a_bare_host(tmp_path, *args):
    env = {**os.environ, "LSTM_SAVES": str(tmp_path / "saves"), "LSTM_DATA": str(DATA_DIR)}
    return subprocess.run([sys.executable, "-c", BARE, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_small_cpu_run_measures_every_stage_without_the_apps_dependencies(tmp_path):
    report = tmp_path / "check.json"
    out = gpucheck_on_a_bare_host(tmp_path, "--device", "cpu", "--small", "--skip-tests", "--out", str(report))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert str(report) in out.stdout and "all checks passed" in out.stdout
    result = json.loads(report.read_text())
    assert result["passed"] and result["problems"] == [] and "tests" not in result
    assert result["peak"]["fp32"] > 1e9                                        # a GEMM peak, in FLOP/s
    rows = result["throughput"]
    assert {row["preset"] for row in rows} == set(gpucheck.PRESETS)
    for row in rows:
        assert "error" not in row, row
        # below 1 on a GPU (gpucheck checks it there); a CPU's fused kernel runs near a peak that is a timing
        # on a shared host, a few batches against a best of three, so it may pass it a little
        assert row["samples_per_s"] > 0 and 0 < row["roofline"] < 1.25, row
        assert row["peak_dtype"] in result["peak"] and row["amp"]
    tta = result["tta"]
    assert tta["preset"] == "default" and tta["epochs"] == 1 and 0.2 < tta["final_test_accuracy"] <= 1
    assert tta["wall_seconds"] > 0
    pixel = result["pixel"]
    assert pixel["epochs"] == 1 and pixel["wall_seconds"] > 0 and 0 <= pixel["test_accuracy"] <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_without_a_gpu_the_default_check_fails_in_one_clear_line(tmp_path):
    out = gpucheck_on_a_bare_host(tmp_path, "--skip-tests", "--out", str(tmp_path / "check.json"))
    assert out.returncode != 0
    [line] = out.stderr.strip().splitlines()
    assert "no CUDA GPU" in line and "--device cpu" in line
    assert not (tmp_path / "check.json").exists()


@pytest.mark.slow
def test_failing_cuda_tests_fail_the_check(tmp_path, monkeypatch, capsys):
    tests = tmp_path / "test_stand_in.py"
    tests.write_text("import pytest\n\n"
                     "@pytest.mark.cuda\ndef test_holds():\n    pass\n\n"
                     "@pytest.mark.cuda\ndef test_breaks():\n    assert 1 == 2\n")
    # the rest of the check as small as it goes: one preset, a few hundred samples
    monkeypatch.setattr(gpucheck, "PRESETS", ["default"])
    monkeypatch.setattr(gpucheck, "SMALL", gpucheck.Plan(batches=2, pixel_batches=1, peak_seconds=0.05, tta_epochs=1,
                                                         tta_limit=512, pixel_limit=100, val_size=200, test_size=200))
    report = tmp_path / "check.json"
    code = gpucheck.main(["--device", "cpu", "--small", "--tests", str(tests), "--out", str(report)])
    assert code == 1
    result = json.loads(report.read_text())
    assert (result["tests"]["passed"], result["tests"]["failed"]) == (1, 1)
    assert not result["passed"] and result["problems"] == [f"the CUDA tests failed: {result['tests']['summary']}"]
    assert "FAILED: the CUDA tests failed: 1 failed, 1 passed" in capsys.readouterr().out
    assert result["throughput"] and result["tta"] and result["pixel"]      # the measurements still ran
