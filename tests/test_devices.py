"""The mixed-precision policy over a table of GPUs (a pure function: it runs without any GPU), what loss
scaling does with a step it overflowed, and the devices this machine reports."""
import math

import pytest
import torch

from lstm_core.config import OPTIMIZERS, ConfigError
from lstm_core.devices import (AmpUnsupported, amp_policy, amp_summary, available_devices, candidate_devices,
                               policy_for)

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
OFF = (None, False, FP32, False)
# The policy written out by hand, per compute capability, (arch, amp) -> (autocast dtype, grad_scaler,
# lstm_dtype, lstm_outside_autocast), or the refusal. tests/test_cuda.py holds the real GPU to its row.
AMP_TABLE = {
    (7, 5): {("lstm", "auto"): (FP16, True, FP16, False), ("cnn", "auto"): (FP16, True, FP16, False),
             ("lstm", "bf16"): AmpUnsupported, ("cnn", "bf16"): AmpUnsupported,
             ("lstm", "off"): OFF, ("cnn", "off"): OFF},
    (8, 0): {("lstm", "auto"): (FP16, True, FP16, False), ("cnn", "auto"): (BF16, False, BF16, False),
             ("lstm", "bf16"): (BF16, False, FP32, True), ("cnn", "bf16"): (BF16, False, BF16, False),
             ("lstm", "off"): OFF, ("cnn", "off"): OFF},
    (9, 0): {("lstm", "auto"): (FP16, True, FP16, False), ("cnn", "auto"): (BF16, False, BF16, False),
             ("lstm", "bf16"): (BF16, False, FP32, True), ("cnn", "bf16"): (BF16, False, BF16, False),
             ("lstm", "off"): OFF, ("cnn", "off"): OFF},
}


def table_row(capability: tuple[int, int]) -> dict | None:
    """AMP_TABLE's row for a GPU: the listed capability at or below it, 7.5's from 7.0 (the rules change at
    7.0, tensor cores, and 8.0, native bf16); None before 7.0."""
    if capability < (7, 0):
        return None
    return AMP_TABLE[max([cc for cc in AMP_TABLE if cc <= capability] or [(7, 5)])]


def assert_policy_is(make_policy, expected) -> None:
    """make_policy() against one entry of AMP_TABLE: its four fields, or the refusal the entry names."""
    if expected is AmpUnsupported:
        with pytest.raises(AmpUnsupported):
            make_policy()
        return
    policy = make_policy()
    assert (policy.dtype, policy.grad_scaler, policy.lstm_dtype, policy.lstm_outside_autocast) == expected


@pytest.mark.parametrize("amp", ("auto", "bf16", "off"))
@pytest.mark.parametrize("arch", ("lstm", "cnn"))
@pytest.mark.parametrize("cc", list(AMP_TABLE), ids=lambda cc: f"{cc[0]}.{cc[1]}")
def test_the_amp_policy_is_the_table_written_out_by_hand(cc, arch, amp):
    assert_policy_is(lambda: amp_policy(amp, "cuda", cc, arch), AMP_TABLE[cc][arch, amp])
# (GPU, compute capability, amp=auto for an LSTM, amp=auto for the CNN, whether amp=bf16 is allowed)
GPUS = [
    ("GTX 1080", (6, 1), None, None, False),
    ("P100", (6, 0), None, None, False),
    ("V100", (7, 0), FP16, FP16, False),
    ("T4", (7, 5), FP16, FP16, False),
    ("RTX 2080 Ti", (7, 5), FP16, FP16, False),
    ("A100", (8, 0), FP16, BF16, True),
    ("RTX 3090", (8, 6), FP16, BF16, True),
    ("RTX 4090", (8, 9), FP16, BF16, True),
    ("H100", (9, 0), FP16, BF16, True),
    ("B200", (10, 0), FP16, BF16, True),
    ("RTX 5090", (12, 0), FP16, BF16, True),
]


@pytest.mark.parametrize("gpu, cc, lstm, cnn, bf16", GPUS, ids=[g[0] for g in GPUS])
def test_every_gpu_gets_its_fast_precision_and_never_fp16_without_loss_scaling(gpu, cc, lstm, cnn, bf16):
    for arch, expected in (("lstm", lstm), ("cnn", cnn)):
        policy = amp_policy("auto", "cuda", cc, arch, gpu_name=gpu)
        assert policy.dtype == expected, (gpu, arch)
        assert policy.grad_scaler == (expected == FP16 or policy.lstm_dtype == FP16)
    off = amp_policy("off", "cuda", cc, "lstm")
    assert off.dtype is None and not off.grad_scaler and off.lstm_dtype == torch.float32
    if bf16:
        lstm_bf16 = amp_policy("bf16", "cuda", cc, "lstm")
        # cuDNN's LSTM would turn bf16 autocast into fp16 without loss scaling: it runs in fp32 instead
        assert lstm_bf16.dtype == BF16 and lstm_bf16.lstm_outside_autocast and lstm_bf16.lstm_dtype == torch.float32
        assert not lstm_bf16.grad_scaler
        assert amp_policy("bf16", "cuda", cc, "cnn").dtype == BF16
    else:
        # emulated bf16 (torch.cuda.is_bf16_supported() says True there too) is refused, with what to use instead
        with pytest.raises(AmpUnsupported, match=rf"{gpu} is {cc[0]}\.{cc[1]}.*amp=auto"):
            amp_policy("bf16", "cuda", cc, "lstm", gpu_name=gpu)
        assert issubclass(AmpUnsupported, ConfigError)            # the CLI answers it with exit 2, one line


def test_the_summary_a_person_reads_names_both_architectures_where_they_differ():
    assert amp_summary((9, 0)) == "LSTM: fp16 autocast with loss scaling; CNN: bf16 autocast"
    assert amp_summary((7, 5)) == "fp16 autocast with loss scaling"
    assert amp_summary((6, 1)) == "fp32 (no tensor cores)"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_step_whose_loss_scaling_overflowed_changes_nothing_whatever_the_optimizer(optimizer, mnist):
    """fp16's loss scaling skips a step whose scaled gradients overflowed: the fused optimizers in their own
    kernel, RMSprop (no fused step) by undoing its step on the device (train.step_if_finite), so that no
    step waits for the device to say which. Here on a CPU with a real GradScaler, whose scale of inf
    overflows every gradient."""
    from conftest import tiny_config
    from lstm_core.train import prepare, train_step

    state, splits = prepare(tiny_config(optimizer=optimizer, momentum=0.9, limit_train=200, val_size=100), mnist)
    idx = torch.arange(50)
    weights = lambda: {k: v.clone() for k, v in state.model.state_dict().items()}  # noqa: E731
    buffers = lambda: [(k, t.clone()) for s in state.optimizer.state.values() for k, t in s.items()  # noqa: E731
                       if k != "step" and isinstance(t, torch.Tensor)]          # (the count: see step_if_finite)

    def step(scale: float) -> None:
        state.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        train_step(state, splits, idx)

    before = weights()
    step(math.inf)                                   # the very first step overflows: nothing moves
    assert all(torch.equal(before[k], v) for k, v in weights().items())
    assert all(not t.any() for _, t in buffers())    # state buffers as the optimizer starts them: zeros
    step(1.0)                                        # a finite step trains
    trained, state_after = weights(), buffers()
    assert any(not torch.equal(before[k], v) for k, v in trained.items())
    assert state_after or optimizer == "sgd" and not state.optimizer.param_groups[0]["momentum"]
    step(math.inf)                                   # and a later overflow leaves weights and state as they were
    assert all(torch.equal(trained[k], v) for k, v in weights().items())
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(state_after, buffers(), strict=True))


def test_cpu_policy_is_fp32_unless_bf16_is_asked_for():
    assert amp_policy("auto", "cpu").dtype is None
    assert amp_policy("bf16", "cpu", cpu_bf16=True).lstm_dtype == BF16
    assert amp_policy("bf16", "cpu", cpu_bf16=False).lstm_dtype == torch.float32   # oneDNN has no bf16 LSTM there
    assert not any(amp_policy(a, "cpu").grad_scaler for a in ("off", "auto", "bf16"))


def test_this_machine_reports_its_devices_and_policy():
    devices = available_devices()
    assert devices[-1].name == "cpu" and devices[-1].amp == "fp32"
    assert policy_for("auto", torch.device("cpu")).dtype is None
    assert candidate_devices("cpu") == ["cpu"]
    if not torch.cuda.is_available():
        assert candidate_devices("auto") == ["cpu"]
        with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
            candidate_devices("cuda")


def test_the_environment_names_versions_processor_and_commit():
    import subprocess
    import sys

    from conftest import REPO
    from lstm_core.devices import environment
    env = environment(torch.device("cpu"))
    assert env["torch"] == torch.__version__ and env["python"] == sys.version.split()[0]
    assert env["cpu"] and env["threads"] == torch.get_num_threads() and env["gpu"] is None
    assert env["optuna"] and env["device"] == "cpu"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if head:                                                   # a checkout (CI's clean clone is one)
        assert env["git_commit"].startswith(head)
