"""The CUDA path, on a real GPU (every test here is skipped without one). `python -m lstm_core.gpucheck`
runs this file on a bare GPU machine: torch, numpy and pytest only, so nothing here may import
streamlit, optuna or plotly."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, REPO, StopAt, tiny_config, wait_until
from lstm_core.config import OPTIMIZERS, PRESETS, preset
from lstm_core.devices import CUDNN_LSTM_AUTOCAST_DTYPE, AmpUnsupported, cuda_capability, policy_for
from lstm_core.evaluate import autocast
from lstm_core.checkpoints import resume_checkpoint
from lstm_core.gpucheck import second_process_problem
from lstm_core.jobs import request_stop
from lstm_core.models import build_model
from lstm_core.recorder import RunRecorder
from lstm_core.runs import Run, create_run
from lstm_core.train import fit, prepare, train_step
from test_devices import assert_policy_is, table_row

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
AMP_MODES = ("off", "auto", "bf16")


def few_batches(name: str, amp: str, batches: int = 4):
    """A preset cut to a few batches of one epoch on the GPU."""
    config = preset(name)
    return config.replace(device="cuda", amp=amp, epochs=1, limit_train=batches * config.batch_size, val_size=500,
                          log_every=1)


def gpu_allows(amp: str) -> bool:
    return amp != "bf16" or cuda_capability(torch.device("cuda")) >= (8, 0)


@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_trains_under_every_amp_mode(name, amp, mnist):
    config = few_batches(name, amp)
    if not gpu_allows(amp):
        with pytest.raises(AmpUnsupported):
            fit(config, data=mnist)
        return
    history = fit(config, data=mnist)
    assert history.device.startswith("cuda") and len(history.epochs) == 1
    record = history.epochs[0]
    assert torch.isfinite(torch.tensor([record["train_loss"], record["val_loss"]])).all()
    assert 0.0 <= history.test["accuracy"] <= 1.0 and history.test["n"] == 10000


def test_cudnn_lstm_under_autocast_computes_in_the_dtype_the_policy_assumes():
    lstm = torch.nn.LSTM(28, 64, batch_first=True).cuda()
    x = torch.randn(8, 28, 28, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = lstm(x)[0]
    assert out.dtype == CUDNN_LSTM_AUTOCAST_DTYPE                  # fp16, whatever dtype autocast was asked for
    with torch.autocast("cuda", dtype=torch.float16):
        assert lstm(x)[0].dtype == torch.float16


@pytest.mark.parametrize("cell", ("lstm", "gru", "rnn"))
@pytest.mark.parametrize("amp", AMP_MODES)
def test_the_lstm_computes_in_the_policys_dtype_and_fp16_always_has_loss_scaling(amp, mnist, cell):
    """The GRU and the RNN are cuDNN RNNs too: the same autocast rule holds them (models.run_recurrent)."""
    device = torch.device("cuda")
    if not gpu_allows(amp):
        pytest.skip("no native bf16 on this GPU (refused: see the test above)")
    policy = policy_for(amp, device, "lstm")
    state, splits = prepare(few_batches("default", amp).replace(cell=cell), mnist)
    assert state.scaler.is_enabled() == policy.grad_scaler
    model = state.model
    x = torch.randn(16, 28, 28, device=device)
    with autocast(device, policy.dtype):
        states = model.hidden_states(x)
    assert states.dtype == policy.lstm_dtype
    assert policy.lstm_dtype != torch.float16 or policy.grad_scaler


@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("arch", ("lstm", "cnn"))
def test_the_policy_on_this_gpu_is_its_row_of_the_table_written_out_by_hand(arch, amp):
    device = torch.device("cuda")
    row = table_row(cuda_capability(device))
    if row is None:
        pytest.skip(f"no written-out row for compute capability {cuda_capability(device)} (before tensor cores)")
    assert_policy_is(lambda: policy_for(amp, device, arch), row[arch, amp])


# every preset (its own optimizer) and every optimizer (on `default`, momentum on), under every amp mode:
# fp16's loss scaling must not read found_inf on the host, with or without a fused step (train.step_if_finite)
SYNC_CASES = ([(name, None, amp) for name in PRESETS for amp in AMP_MODES]
              + [("default", optimizer, amp) for optimizer in OPTIMIZERS for amp in AMP_MODES])


@pytest.mark.parametrize("name, optimizer, amp", SYNC_CASES)
def test_a_training_step_never_waits_for_the_gpu(name, optimizer, amp, mnist):
    if not gpu_allows(amp):
        pytest.skip("no native bf16 on this GPU (refused: see test_every_preset_trains_under_every_amp_mode)")
    config = few_batches(name, amp, batches=8)
    if optimizer:
        config = config.replace(optimizer=optimizer, momentum=0.9)
    state, splits = prepare(config, mnist)
    size = state.config.batch_size
    order = torch.randperm(state.n_train, generator=state.generator).cuda()
    batches = [order[i * size:(i + 1) * size] for i in range(8)]
    for idx in batches[:3]:                      # warm-up: cuDNN plans, cached grids, the scaler's first scale
        train_step(state, splits, idx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")      # any host sync inside a step raises
    try:
        for idx in batches[3:]:
            loss, correct = train_step(state, splits, idx)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and 0 <= correct.item() <= size


def test_resuming_on_the_gpu_gives_the_same_run_as_never_stopping(tmp_path, mnist):
    """Dropout on the GPU (the head's and cuDNN's own between stacked layers) and augmentation draw from the
    GPU's and the CPU's random streams: a resumed run must continue every one of them."""
    config = tiny_config(device="cuda", num_layers=2, dropout=0.3, epochs=4, log_every=1, scheduler="onecycle",
                         patience=0, aug_rotate=5.0, aug_translate=0.05)
    straight = create_run(config, tmp_path)
    fit(config, [RunRecorder(straight)], data=mnist)
    stopped = create_run(config, tmp_path)
    stop = threading.Event()
    fit(config, [RunRecorder(stopped), StopAt(stop, 2, 3)], stop=stop, data=mnist)     # stops in epoch 3
    history = fit(config, [RunRecorder(stopped)], data=mnist, resume=resume_checkpoint(stopped))
    expected = [e["train_loss"] for e in straight.epochs()]
    got = [e["train_loss"] for e in history.epochs]
    # cuDNN may pick other kernels between processes: equal to float noise, far below what other dropout
    # masks in epochs 3 and 4 make
    assert got == pytest.approx(expected, rel=1e-5)
    assert [e["val_loss"] for e in history.epochs] == pytest.approx([e["val_loss"] for e in straight.epochs()],
                                                                    rel=1e-5)


def test_every_saved_file_loads_on_a_machine_without_a_gpu(tmp_path, mnist):
    run = create_run(tiny_config(device="cuda", epochs=1), tmp_path)
    fit(run.config(), [RunRecorder(run)], data=mnist)
    code = ("import sys, torch\n"
            "assert not torch.cuda.is_available()\n"
            "def tensors(x):\n"
            "    if isinstance(x, torch.Tensor): yield x\n"
            "    elif isinstance(x, dict): yield from (t for v in x.values() for t in tensors(v))\n"
            "    elif isinstance(x, (list, tuple)): yield from (t for v in x for t in tensors(v))\n"
            "for path in sys.argv[1:]:\n"
            "    loaded = torch.load(path, weights_only=True)\n"
            "    assert all(t.device.type == 'cpu' for t in tensors(loaded)), path\n"
            "print('ok')\n")
    files = [str(run.path / name) for name in ("best.pt", "last.pt", "final_state_dict.pth")]
    result = subprocess.run([sys.executable, "-c", code, *files], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    model = build_model(run.config())
    model.load_state_dict(torch.load(run.final_path, weights_only=True))     # the plain file MNIST scripts share


def test_two_runs_on_one_gpu_take_turns(tmp_path):
    """The second run starts once the first trains (it holds the GPU's lock) with far more work left than
    any GPU does before the second has queued; then the first is stopped, and the second trains after it."""
    problem = second_process_problem(torch.device("cuda:0"))
    if problem:
        pytest.skip(problem)
    env = {**os.environ, "LSTM_SAVES": str(tmp_path), "LSTM_DATA": str(DATA_DIR)}
    args = [sys.executable, "-m", "lstm_core", "train", "--device", "cuda:0", "--limit-train", "4000", "--val-size",
            "1000", "--batch-size", "100", "--patience", "0", "--json"]

    def start(name: str, epochs: int) -> tuple[subprocess.Popen, Run, Path, Path]:
        """A run whose output goes to files (an unread pipe could fill and stall it), once its folder exists."""
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen([*args, "--epochs", str(epochs)], cwd=REPO, env=env, stdout=stdout,
                                    stderr=stderr, text=True)

        def folder() -> str | None:                  # the first line it prints
            text = out.read_text()
            if "\n" in text:
                return text.partition("\n")[0]
            assert proc.poll() is None, f"the {name} run ended at once: {err.read_text()[-2000:]}"
            return None

        return proc, Run(Path(wait_until(folder, 300, f"the {name} run's folder"))), out, err

    first, first_run, first_out, _ = start("first", 1000)
    wait_until(lambda: first_run.status().get("state") == "running" or first.poll() is not None, 300,
               "the first run to take the GPU and train")
    second, second_run, second_out, second_err = start("second", 1)
    wait_until(lambda: second_run.status().get("waiting_for") or second.poll() is not None, 300,
               "the second run to queue behind the first")
    assert first.poll() is None and second.poll() is None, "the first run ended before the second had queued"
    request_stop(first_run)
    assert [p.wait(timeout=600) for p in (first, second)] == [0, 0], second_err.read_text()[-2000:]
    a, b = (json.loads(Path(json.loads(out.read_text().strip().splitlines()[-1])["run_dir"], "status.json")
                       .read_text()) for out in (first_out, second_out))
    assert a["state"] == "cancelled" and b["state"] == "completed"
    assert a["ended_at"] <= b["started_at"]                           # never both on the GPU at once
    assert a["device"] == b["device"] == "cuda:0"
    assert f"busy with run {first_run.id}" in second_err.read_text() and "queued" in second_err.read_text()


def test_the_benchmarks_roofline_stays_below_the_gpus_peak(mnist):
    """Every row is held to the GEMM peak of the dtype its LSTM computes in: a fraction at or above 1 means
    a FLOP count or a peak is wrong."""
    from lstm_core import bench

    device = torch.device("cuda")
    peak = bench.peak_flops(device, seconds=0.3)
    for name in ("default", "cnn"):
        for variant, config in bench.variants(preset(name).replace(device="cuda"), device):
            row = bench.train_row(name, variant, config, mnist, 20 * config.batch_size, peak, log_every=5)
            assert 0 < row["roofline"] < 1, row
