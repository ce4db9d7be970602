import math

import pytest
import torch
from torch import nn

from lstm_core import models
from lstm_core.config import TrainConfig, preset
from lstm_core.devices import CUDNN_LSTM_AUTOCAST_DTYPE, amp_policy, lstm_leaves_autocast
from lstm_core.models import CNNClassifier, LSTMClassifier, build_model, count_parameters


@pytest.mark.parametrize("mode, steps, features", [("rows", 28, 28), ("pixels", 784, 1), ("permuted", 784, 1)])
def test_lstm_shapes_per_sequence_mode(mode, steps, features):
    model = build_model(TrainConfig(seq_mode=mode, hidden_size=16, num_layers=2))
    assert isinstance(model, LSTMClassifier) and model.lstm.input_size == features
    x = torch.randn(3, steps, features)
    assert model(x).shape == (3, 10)
    assert model.logits_per_step(model.hidden_states(x)).shape == (3, steps, 10)
    assert model.hidden_states(x).shape == (3, steps, 16)


def test_last_step_of_the_per_step_logits_is_the_prediction():
    model = LSTMClassifier(28, 24, num_layers=2, dropout=0.3).eval()
    x = torch.randn(5, 28, 28)
    assert torch.allclose(model.logits_per_step(model.hidden_states(x))[:, -1], model(x), atol=1e-6)


def test_bidirectional_head_reads_both_final_states():
    model = LSTMClassifier(28, 16, num_layers=2, bidirectional=True).eval()
    x = torch.randn(4, 28, 28)
    assert model(x).shape == (4, 10) and model.head.in_features == 32
    out = model.hidden_states(x)                                   # (B, T, 2H)
    last = torch.cat([out[:, -1, :16], out[:, 0, 16:]], 1)         # forward after T, backward after step 1
    assert torch.allclose(model(x), model.head(last), atol=1e-6)
    with pytest.raises(ValueError, match="unidirectional"):
        model.logits_per_step(out)


def test_dropout_only_between_layers_when_there_are_several():
    assert LSTMClassifier(28, 8, num_layers=1, dropout=0.5).lstm.dropout == 0.0
    assert LSTMClassifier(28, 8, num_layers=2, dropout=0.5).lstm.dropout == 0.5


def test_cnn_shape_and_selection():
    model = build_model(preset("cnn"))
    assert isinstance(model, CNNClassifier)
    assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_parameter_counts_follow_the_config():
    # 4 gates x (input + hidden + 2 biases) x hidden for one layer, then the head
    model = build_model(TrainConfig(hidden_size=128, num_layers=1))
    assert count_parameters(model) == 4 * 128 * (28 + 128 + 2) + 128 * 10 + 10


@pytest.mark.parametrize("bidirectional", [False, True])
def test_logits_from_states_equal_forward(bidirectional):
    model = LSTMClassifier(28, 12, num_layers=2, bidirectional=bidirectional).eval()
    x = torch.randn(3, 28, 28)
    assert torch.allclose(model.logits_from_states(model.hidden_states(x)), model(x), atol=1e-6)


def test_forget_gates_start_open_and_long_sequences_get_the_chrono_initialisation():
    rows = build_model(TrainConfig(num_layers=2)).lstm
    hidden = rows.hidden_size
    for layer in range(2):
        ih, hh = getattr(rows, f"bias_ih_l{layer}"), getattr(rows, f"bias_hh_l{layer}")
        assert torch.equal(ih[hidden:2 * hidden] + hh[hidden:2 * hidden], torch.ones(hidden))
        assert ih[:hidden].abs().max() < 1                                   # the other gates keep torch's init

    torch.manual_seed(0)
    pixels = build_model(TrainConfig(seq_mode="pixels")).lstm
    forget, input_ = pixels.bias_ih_l0[hidden:2 * hidden], pixels.bias_ih_l0[:hidden]
    assert torch.equal(input_, -forget) and not pixels.bias_hh_l0[:2 * hidden].any()
    # log(U(1, 783)): memory spans from one step to the whole image, most of them long
    assert 0 <= forget.min() < 1.5 and 6 < forget.max() <= torch.log(torch.tensor(783.0))
    assert 4 < forget.median() < 7


@pytest.mark.parametrize("mode", ["rows", "pixels"])
def test_forget_init_picks_the_gate_biases_whatever_the_sequence(mode):
    """chrono and one on any sequence; torch leaves PyTorch's own biases (to watch gradients vanish)."""
    torch.manual_seed(0)
    chrono = build_model(TrainConfig(seq_mode=mode, forget_init="chrono")).lstm
    hidden, steps = chrono.hidden_size, 28 if mode == "rows" else 784
    forget = chrono.bias_ih_l0[hidden:2 * hidden]
    assert torch.equal(chrono.bias_ih_l0[:hidden], -forget) and forget.max() <= math.log(steps - 1)
    one = build_model(TrainConfig(seq_mode=mode, forget_init="one")).lstm
    assert torch.equal(one.bias_ih_l0[hidden:2 * hidden] + one.bias_hh_l0[hidden:2 * hidden], torch.ones(hidden))
    torch.manual_seed(0)
    plain = build_model(TrainConfig(seq_mode=mode, forget_init="torch")).lstm
    torch.manual_seed(0)
    reference = nn.LSTM(*((28, 128) if mode == "rows" else (1, 128)), batch_first=True)
    assert torch.equal(plain.bias_ih_l0, reference.bias_ih_l0) and torch.equal(plain.bias_hh_l0, reference.bias_hh_l0)
    assert (plain.bias_ih_l0 + plain.bias_hh_l0)[hidden:2 * hidden].abs().max() < 0.2     # forget gates half shut


def test_models_are_plain_torch():
    """The CPU kernel is cpu.accelerate's to put in; a model as built is torch's own modules only."""
    model = build_model(TrainConfig(num_layers=2, dropout=0.2))
    assert type(model.lstm) is nn.LSTM and type(model.dropout) is nn.Dropout


def test_bf16_autocast_on_a_cpu_without_bf16_runs_the_lstm_in_fp32(monkeypatch):
    # oneDNN raises for a bf16 LSTM on CPUs without AVX-512 BF16 or AMX; those run the layer in fp32
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    torch.manual_seed(0)
    model, x = LSTMClassifier(28, 16), torch.randn(2, 28, 28, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out, (h_n, _) = model.run_lstm(x)
        logits = model(x)
    assert out.dtype == torch.float32 and logits.dtype == torch.bfloat16      # the head still autocasts
    torch.testing.assert_close(out, model.lstm(x)[0])
    out.sum().backward()
    assert x.grad is not None and model.lstm.weight_hh_l0.grad is not None


def test_a_cuda_lstm_leaves_bf16_autocast_for_fp32():
    # cuDNN's LSTM would compute in fp16 under any CUDA autocast (devices.CUDNN_LSTM_AUTOCAST_DTYPE)
    assert lstm_leaves_autocast("cuda", torch.bfloat16) == (CUDNN_LSTM_AUTOCAST_DTYPE != torch.bfloat16)
    assert not lstm_leaves_autocast("cuda", torch.float16)
    assert lstm_leaves_autocast("cpu", torch.bfloat16, cpu_bf16=False)
    assert not lstm_leaves_autocast("cpu", torch.bfloat16, cpu_bf16=True)
    # the policy and the model's forward read the same rule
    assert amp_policy("bf16", "cuda", (9, 0)).lstm_outside_autocast == lstm_leaves_autocast("cuda", torch.bfloat16)
