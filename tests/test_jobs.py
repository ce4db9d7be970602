import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, tiny_config, wait_until
from lstm_core.jobs import (STOP_FILE, delete_run, device_holder, device_lock, launch_study, request_stop,
                            running_studies, study_running)
from lstm_core.runs import RunError, create_run, open_run


def test_a_held_device_makes_others_wait_and_names_its_holder(saves):
    holder = create_run(tiny_config(), saves, state="running")
    waiting = []
    with device_lock("cpu", holder.id, saves) as acquired:
        assert acquired and device_holder("cpu", saves) == holder.id
        # another process asks for the same device: it waits, hears who holds it, and gives up on stop
        code = ("import sys; from lstm_core.jobs import device_lock\n"
                "with device_lock('cpu', 'other', sys.argv[1], stop=lambda: True,"
                " on_wait=lambda h: print('waiting for', h)) as ok: print('acquired', ok)")
        out = subprocess.run([sys.executable, "-c", code, str(saves)], cwd=REPO, capture_output=True, text=True,
                             timeout=120).stdout
        waiting.append(out)
    assert f"waiting for {holder.id}" in waiting[0] and "acquired None" in waiting[0]
    assert device_holder("cpu", saves) is None                       # released, owner cleared
    with device_lock("cpu", "next", saves) as acquired:             # free again
        assert acquired


def test_the_lock_dies_with_its_process(saves):
    code = ("import sys, time; from lstm_core.jobs import device_lock\n"
            "with device_lock('cpu', 'gone', sys.argv[1]): print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(saves)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    started = time.time()
    with device_lock("cpu", "after", saves) as acquired:
        assert acquired and time.time() - started < 5


def test_stop_signals_the_training_process_and_delete_waits_for_the_end(saves):
    run = create_run(tiny_config(), saves)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    run.write_status(state="running", pid=worker.pid, pid_start=None)
    with pytest.raises(RunError, match="stop it before deleting it"):
        delete_run(run)
    request_stop(run)
    assert (run.path / STOP_FILE).exists()                            # read between batches, even after restarts
    assert worker.wait(timeout=10) == -signal.SIGTERM
    assert run.status()["state"] == "interrupted"                    # this stand-in never wrote "cancelled"
    delete_run(run)
    assert not run.path.exists()


@pytest.mark.slow
def test_a_launched_run_outlives_the_process_that_started_it(saves):
    """The app's server may restart mid-run: the training process is detached from it."""
    code = ("import sys; from conftest import tiny_config; from lstm_core.jobs import launch_training\n"
            "print(launch_training(tiny_config(epochs=1), sys.argv[1]).id)")
    launcher = subprocess.run([sys.executable, "-c", code, str(saves)], cwd=REPO / "tests", capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    run_id = launcher.stdout.strip()                       # the launcher has exited by now
    run = open_run(run_id, saves)
    wait_until(lambda: run.status()["state"] not in ("queued", "running"), 120, f"run {run_id} ending")
    assert run.status()["state"] == "completed", (run.path / "train.log").read_text()
    assert run.eval()["test_accuracy"] > 0.4


def test_a_launched_study_runs_from_the_launch_until_its_process_ends(saves):
    """Running at once, before the command has loaded anything, and listed under its storage; a command
    that refuses its flags ends it, saying why in tune.log."""
    storage = f"sqlite:///{saves / 'optuna.db'}"
    (saves / "studies" / "s").mkdir(parents=True)
    (saves / "studies" / "s" / STOP_FILE).touch()                  # left by an earlier stop of this study
    launch_study(["--study", "s", "--trials", "0", "--storage", storage], "s", storage, saves)
    assert study_running("s", saves) and not (saves / "studies" / "s" / STOP_FILE).exists()
    assert running_studies(storage, saves) == ["s"] and running_studies("sqlite:///other.db", saves) == []
    wait_until(lambda: not study_running("s", saves), 60, "the refused study's command ending", poll=0.1)
    assert running_studies(storage, saves) == []
    assert "error: --trials and --workers must be at least 1" in (saves / "studies" / "s" / "tune.log").read_text()


def hold(saves, devices, owner, shared=False, seconds=60):
    """A process that holds one of `devices` (printing which) until killed."""
    code = ("import sys, time; from lstm_core.jobs import device_lock\n"
            f"with device_lock({devices!r}, {owner!r}, sys.argv[1], shared={shared}) as d:"
            f" print(d, flush=True); time.sleep({seconds})")
    proc = subprocess.Popen([sys.executable, "-c", code, str(saves)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_auto_on_several_gpus_takes_the_first_free_one(saves):
    """Lock names only: the rule is the same whether the GPUs exist here or not."""
    gpus = ["cuda:0", "cuda:1", "cuda:2"]
    first, got = hold(saves, gpus, "a")
    assert got == "cuda:0"
    second, got = hold(saves, gpus, "b")
    assert got == "cuda:1"                                   # not queued behind the first on cuda:0
    try:
        with device_lock(gpus, "c", saves) as device:
            assert device == "cuda:2"
        first.kill()
        first.wait()
        with device_lock(gpus, "d", saves, poll=0.05) as device:
            assert device == "cuda:0"                        # freed by the kernel when its holder died
    finally:
        for p in (first, second):
            p.kill()
            p.wait()


def test_trials_share_the_cpu_and_a_waiting_run_goes_before_new_trials(saves):
    trial, got = hold(saves, ["cpu"], "s/trial_0", shared=True)
    assert got == "cpu"
    run, waited, release = [], [], threading.Event()

    def start_run():
        with device_lock("cpu", "r", saves, poll=0.05, on_wait=waited.append) as device:
            run.append(device)
            release.wait(30)
    thread = threading.Thread(target=start_run)
    try:
        with device_lock("cpu", "s/trial_1", saves, shared=True) as device:    # workers of a study share
            assert device == "cpu"
        # a run waits for the trial in progress, and says so, so that trials about to start leave the CPU to it
        thread.start()
        wait_until(lambda: waited, 10, "the run waiting for the trial's CPU", poll=0.05)
        assert not run
        stop_now = lambda: True  # noqa: E731
        with device_lock("cpu", "s/trial_2", saves, shared=True, stop=stop_now) as device:
            assert device is None                            # a new trial does not slip in before the run
        trial.kill()
        trial.wait()
        wait_until(lambda: run, 10, "the run taking the CPU its trial left", poll=0.05)
        assert run == ["cpu"]
    finally:
        trial.kill()
        trial.wait()
        release.set()
        if thread.ident is not None:        # started: it ends once it has the CPU and is released
            thread.join(timeout=10)
