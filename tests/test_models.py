import math

import pytest
import torch
from torch import nn

from lstm_core import models
from lstm_core.config import TrainConfig, preset
from lstm_core.devices import CUDNN_LSTM_AUTOCAST_DTYPE, amp_policy, lstm_leaves_autocast
from lstm_core.models import CNNClassifier, RecurrentClassifier, build_model, count_parameters


@pytest.mark.parametrize("mode, steps, features", [("rows", 28, 28), ("pixels", 784, 1), ("permuted", 784, 1)])
def test_lstm_shapes_per_sequence_mode(mode, steps, features):
    model = build_model(TrainConfig(seq_mode=mode, hidden_size=16, num_layers=2))
    assert isinstance(model, RecurrentClassifier) and model.lstm.input_size == features
    x = torch.randn(3, steps, features)
    assert model(x).shape == (3, 10)
    assert model.logits_per_step(model.hidden_states(x)).shape == (3, steps, 10)
    assert model.hidden_states(x).shape == (3, steps, 16)


def test_last_step_of_the_per_step_logits_is_the_prediction():
    model = RecurrentClassifier(28, 24, num_layers=2, dropout=0.3).eval()
    x = torch.randn(5, 28, 28)
    assert torch.allclose(model.logits_per_step(model.hidden_states(x))[:, -1], model(x), atol=1e-6)


def test_bidirectional_head_reads_both_final_states():
    model = RecurrentClassifier(28, 16, num_layers=2, bidirectional=True).eval()
    x = torch.randn(4, 28, 28)
    assert model(x).shape == (4, 10) and model.head.in_features == 32
    out = model.hidden_states(x)                                   # (B, T, 2H)
    last = torch.cat([out[:, -1, :16], out[:, 0, 16:]], 1)         # forward after T, backward after step 1
    assert torch.allclose(model(x), model.head(last), atol=1e-6)
    with pytest.raises(ValueError, match="unidirectional"):
        model.logits_per_step(out)


def test_dropout_only_between_layers_when_there_are_several():
    assert RecurrentClassifier(28, 8, num_layers=1, dropout=0.5).lstm.dropout == 0.0
    assert RecurrentClassifier(28, 8, num_layers=2, dropout=0.5).lstm.dropout == 0.5


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
    model = RecurrentClassifier(28, 12, num_layers=2, bidirectional=bidirectional).eval()
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
    model, x = RecurrentClassifier(28, 16), torch.randn(2, 28, 28, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out, h_n = model.run_recurrent(x)
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


# -- the other cells -----------------------------------------------------------------------------
@pytest.mark.parametrize("cell, module", [("gru", nn.GRU), ("rnn", nn.RNN), ("irnn", nn.RNN)])
@pytest.mark.parametrize("mode, steps, features", [("rows", 28, 28), ("pixels", 784, 1), ("permuted", 784, 1)])
def test_every_cell_reads_every_sequence_mode(cell, module, mode, steps, features):
    model = build_model(TrainConfig(cell=cell, seq_mode=mode, hidden_size=16, num_layers=2, dropout=0.2)).eval()
    assert type(model.recurrent) is module and model.recurrent.input_size == features
    assert model.recurrent.dropout == 0.2
    x = torch.randn(3, steps, features)
    out = model.hidden_states(x)
    assert out.shape == (3, steps, 16) and model(x).shape == (3, 10)
    torch.testing.assert_close(model.logits_per_step(out)[:, -1], model(x))
    torch.testing.assert_close(model.logits_from_states(out), model(x))


@pytest.mark.parametrize("cell", ["gru", "rnn", "irnn"])
def test_a_bidirectional_cell_reads_both_final_states(cell):
    model = build_model(TrainConfig(cell=cell, hidden_size=8, num_layers=2, bidirectional=True)).eval()
    x = torch.randn(2, 28, 28)
    out = model.hidden_states(x)                                                 # (B, T, 2H)
    torch.testing.assert_close(model(x), model.head(torch.cat([out[:, -1, :8], out[:, 0, 8:]], 1)))


def test_parameters_are_named_after_their_cell_and_an_lstm_keeps_its_names():
    """Checkpoints saved before there were other cells hold 'lstm.*' keys: an LSTM still loads them."""
    names = {cell: next(iter(build_model(TrainConfig(cell=cell, hidden_size=8)).state_dict()))
             for cell in ("lstm", "gru", "rnn", "irnn")}
    assert names == {"lstm": "lstm.weight_ih_l0", "gru": "gru.weight_ih_l0", "rnn": "rnn.weight_ih_l0",
                     "irnn": "rnn.weight_ih_l0"}
    model = build_model(TrainConfig(hidden_size=8))
    assert model.recurrent is model.lstm


def test_the_cells_sizes_follow_their_gate_counts():
    """4 gates for an LSTM, 3 for a GRU, 1 for a plain RNN: at equal width, the weights scale with them."""
    for cell, gates in (("lstm", 4), ("gru", 3), ("rnn", 1), ("irnn", 1)):
        model = build_model(TrainConfig(cell=cell, hidden_size=64))
        assert count_parameters(model) == gates * 64 * (28 + 64 + 2) + 64 * 10 + 10


@pytest.mark.parametrize("mode, steps", [("rows", 28), ("pixels", 784)])
def test_the_gru_update_gate_starts_open_like_the_lstm_forget_gate(mode, steps):
    """torch's GRU keeps the previous state in proportion to its update gate z (order r, z, n), so a
    positive z bias carries memory: 1 on rows, chrono's log(U(1, T-1)) on pixels; torch leaves its own."""
    torch.manual_seed(0)
    gru = build_model(TrainConfig(cell="gru", seq_mode=mode, num_layers=2)).gru
    hidden = gru.hidden_size
    for layer in range(2):
        z = getattr(gru, f"bias_ih_l{layer}")[hidden:2 * hidden] + getattr(gru, f"bias_hh_l{layer}")[hidden:2 * hidden]
        if mode == "rows":
            assert torch.equal(z, torch.ones(hidden))
        else:
            assert 0 <= z.min() < 1.5 and 6 < z.max() <= math.log(steps - 1)
        assert getattr(gru, f"bias_ih_l{layer}")[:hidden].abs().max() < 1        # the reset gate keeps torch's
    torch.manual_seed(0)
    plain = build_model(TrainConfig(cell="gru", seq_mode=mode, forget_init="torch")).gru
    torch.manual_seed(0)
    reference = nn.GRU(*((28, 128) if mode == "rows" else (1, 128)), batch_first=True)
    assert torch.equal(plain.bias_ih_l0, reference.bias_ih_l0)


def test_an_open_update_gate_carries_the_gru_state_forward():
    """The point of the initialisation: with z near 1 a GRU's state after many steps still holds what it
    read first."""
    gru = build_model(TrainConfig(cell="gru", hidden_size=16, forget_init="torch")).gru
    with torch.no_grad():
        gru.bias_ih_l0[16:32] = 20.0                                       # z ~ 1: h' = h
    h0 = torch.randn(1, 1, 16)
    _, h_n = gru(torch.randn(1, 50, 28), h0)
    torch.testing.assert_close(h_n, h0, atol=1e-6, rtol=0)


def test_the_irnn_starts_from_the_identity_with_relu():
    model = build_model(TrainConfig(cell="irnn", hidden_size=16, num_layers=2))
    rnn = model.rnn
    assert rnn.nonlinearity == "relu" and build_model(TrainConfig(cell="rnn", hidden_size=4)).rnn.nonlinearity == "tanh"
    for layer in range(2):
        assert torch.equal(getattr(rnn, f"weight_hh_l{layer}"), torch.eye(16))
        assert not getattr(rnn, f"bias_ih_l{layer}").any() and not getattr(rnn, f"bias_hh_l{layer}").any()
    # with no input, the first layer carries a non-negative state unchanged through every step
    h0 = torch.rand(2, 1, 16)
    _, h_n = rnn(torch.zeros(1, 100, 28), h0)
    torch.testing.assert_close(h_n[0], h0[0])


def test_the_plain_rnn_keeps_torchs_own_initialisation():
    torch.manual_seed(0)
    rnn = build_model(TrainConfig(cell="rnn", hidden_size=16)).rnn
    torch.manual_seed(0)
    reference = nn.RNN(28, 16, batch_first=True)
    assert all(torch.equal(a, b) for a, b in zip(rnn.parameters(), reference.parameters()))


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_cells_other_than_the_lstm_under_cpu_bf16_autocast(monkeypatch, cell):
    """The same rule as the LSTM's: in fp32 outside autocast where the CPU has no bf16."""
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    model, x = build_model(TrainConfig(cell=cell, hidden_size=8)), torch.randn(2, 28, 28)
    with torch.autocast("cpu", torch.bfloat16):
        out, h_n = model.run_recurrent(x)
        logits = model(x)
    assert out.dtype == torch.float32 and h_n.shape == (1, 2, 8) and logits.shape == (2, 10)
