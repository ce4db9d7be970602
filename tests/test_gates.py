"""gates.py held to torch's own nn.LSTM and nn.GRU: the gates it recomputes must give back, at every step of
every layer and direction, the hidden state (and the LSTM's cell state) torch computes."""
import pytest
import torch
from torch import nn

from conftest import tiny_config
from lstm_core import cpu
from lstm_core.gates import cell_of, last_layer, recompute
from lstm_core.models import build_model

TOLERANCE = 1e-5
SHAPES = {"rows": (28, 28), "pixels": (200, 1)}       # (T, F): an image's rows, and a long sequence
LAYOUTS = {"1-layer": (1, False), "2-layer": (2, False), "1-layer-bi": (1, True), "2-layer-bi": (2, True)}
# (module class, layers, bidirectional, (T, F)): both cells, every layout, both lengths
CASES = [pytest.param(kind, layers, bidirectional, shape, id=f"{kind.__name__}-{layout}-{length}")
         for kind in (nn.LSTM, nn.GRU) for layout, (layers, bidirectional) in LAYOUTS.items()
         for length, shape in SHAPES.items()]


def recurrent(kind: type, features: int, layers: int, bidirectional: bool, hidden: int = 24) -> nn.Module:
    torch.manual_seed(0)
    return kind(features, hidden, layers, batch_first=True, bidirectional=bidirectional).eval()


def sequence(shape: tuple[int, int], batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


def torch_steps(module: nn.Module, layer: int, direction: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """h (and for an LSTM, c), (B, T, H), after every step of one layer and direction, from torch itself: a
    one-layer copy of it fed one step at a time, its state carried; the backward direction reads x from
    its end and its steps come back in input order."""
    kind = nn.LSTM if isinstance(module, nn.LSTM) else nn.GRU
    single = kind(x.shape[-1], module.hidden_size, batch_first=True)
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    single.load_state_dict({f"{name}_l0": getattr(module, f"{name}{suffix}")
                            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    seq = x.flip(1) if direction else x
    state, hs, cs = None, [], []
    with torch.no_grad():
        for t in range(seq.shape[1]):
            _, state = single(seq[:, t:t + 1], state)
            h, c = state if kind is nn.LSTM else (state, None)
            hs.append(h[0])
            cs.append(c[0] if c is not None else None)
    steps = [torch.stack(hs, 1)] + ([torch.stack(cs, 1)] if kind is nn.LSTM else [])
    return tuple(s.flip(1) if direction else s for s in steps)


def torch_layers(module: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """torch_steps of every layer, both directions side by side, each layer reading torch's output of the
    one below."""
    layers = []
    for layer in range(module.num_layers):
        parts = [torch_steps(module, layer, d, x) for d in range(2 if module.bidirectional else 1)]
        layers.append(tuple(torch.cat(column, -1) for column in zip(*parts)))
        x = layers[-1][0]
    return layers


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("kind, layers, bidirectional, shape", CASES)
def test_every_step_of_every_layer_gives_back_torchs_states(kind, layers, bidirectional, shape):
    module = recurrent(kind, shape[1], layers, bidirectional)
    x = sequence(shape)
    mine = recompute(module, x)
    theirs = torch_layers(module, x)
    assert len(mine) == layers
    for got, expected in zip(mine, theirs):
        assert got.h.shape == (3, shape[0], module.hidden_size * (2 if bidirectional else 1))
        assert gap(got.h, expected[0]) <= TOLERANCE
        if kind is nn.LSTM:
            assert gap(got.values["cell state"], expected[1]) <= TOLERANCE
    with torch.no_grad():
        out, _ = module(x)
    assert gap(mine[-1].h, out) <= TOLERANCE                     # the stack as torch runs it, in one call


@pytest.mark.parametrize("kind, layers, bidirectional, shape", CASES)
def test_the_last_layer_from_the_modules_output_is_the_step_by_step_one(kind, layers, bidirectional, shape):
    module = recurrent(kind, shape[1], layers, bidirectional)
    x = sequence(shape)
    with torch.no_grad():
        out, _ = module(x)
    fast, slow = last_layer(module, x, out), recompute(module, x)[-1]
    assert gap(fast.h, out) <= TOLERANCE                         # h_t rebuilt from the gates and c_t alone
    assert fast.values.keys() == slow.values.keys()
    for name, values in fast.values.items():
        assert gap(values, slow.values[name]) <= TOLERANCE, name
    assert gap(last_layer(module, x).h, out) <= TOLERANCE        # without the output: the recurrence here


def test_the_gates_named_for_each_cell_are_fractions_and_a_plain_rnn_has_none():
    x = sequence(SHAPES["rows"])
    lstm = last_layer(recurrent(nn.LSTM, 28, 1, False), x)
    gru = last_layer(recurrent(nn.GRU, 28, 1, False), x)
    assert list(lstm.values) == ["input gate", "forget gate", "output gate", "cell state"]
    assert list(gru.values) == ["reset gate", "update gate"]
    for name, values in [*lstm.values.items(), *gru.values.items()]:
        if name != "cell state":
            assert 0 < float(values.min()) and float(values.max()) < 1, name
    for nonlinearity in ("tanh", "relu"):
        rnn = nn.RNN(28, 24, batch_first=True, nonlinearity=nonlinearity)
        assert cell_of(rnn) is None and recompute(rnn, x) is None and last_layer(rnn, x) is None


@pytest.mark.parametrize("bias, carried", [(20.0, True), (-20.0, False)], ids=["forget-open", "forget-shut"])
def test_a_forget_gate_held_open_carries_the_cell_forward_and_one_held_shut_forgets(bias, carried):
    module = recurrent(nn.LSTM, 28, 1, False)
    with torch.no_grad():
        module.bias_ih_l0[24:48] = bias                          # gate rows: input, forget, cell, output
    values = last_layer(module, sequence(SHAPES["rows"])).values
    forget, c, i = values["forget gate"], values["cell state"], values["input gate"]
    assert float((forget - (1.0 if carried else 0.0)).abs().max()) < 1e-6
    # what step t writes, i_t * tanh(.), is at most i_t: held open, the cell changes by no more than that from
    # the step before; held shut, that is all it holds
    written = c[:, 1:] - c[:, :-1] if carried else c[:, 1:]
    assert bool((written.abs() <= i[:, 1:] + 1e-6).all())


def test_an_update_gate_held_near_one_keeps_the_state():
    module = recurrent(nn.GRU, 28, 1, False)
    with torch.no_grad():
        module.bias_ih_l0[24:48] = 20.0                          # gate rows: reset, update, new
    result = last_layer(module, sequence(SHAPES["rows"]))
    assert float(result.values["update gate"].min()) > 1 - 1e-6
    assert float(result.h.abs().max()) < 1e-6                    # the zero state it started from, kept


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "irnn"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_the_apps_models_even_accelerated_on_a_cpu(cell, bidirectional):
    torch.manual_seed(0)
    config = tiny_config(cell=cell, bidirectional=bidirectional, num_layers=2)
    model = build_model(config).eval()
    x = sequence(SHAPES["rows"])
    for accelerated in (False, True):
        if accelerated:
            cpu.accelerate(model)
            if cell == "lstm" and cpu.available():
                assert type(model.recurrent) is not nn.LSTM               # the kernel's subclass
        with torch.no_grad():
            out = model.hidden_states(x)
        result = last_layer(model.recurrent, x, out)
        if cell in ("rnn", "irnn"):
            assert result is None
            continue
        assert gap(result.h, out) <= TOLERANCE
        assert gap(recompute(model.recurrent, x)[-1].h, out) <= TOLERANCE


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("error:RNN module weights are not part of single contiguous chunk")
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_a_module_on_the_gpu_gives_the_gates_it_gives_on_the_cpu(kind, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)       # TF32 would move torch's own output
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    module = recurrent(kind, 28, 2, True)
    x = sequence(SHAPES["rows"])
    here = last_layer(module, x)
    module.cuda()
    with torch.no_grad():
        out, _ = module(x.cuda())
    for there in (last_layer(module, x, out), last_layer(module, x)):     # x on the CPU: moved to the GPU
        assert there.h.device.type == "cuda"
        assert gap(there.h, out) <= 1e-4
        for name, values in here.values.items():
            assert gap(there.values[name].cpu(), values) <= 1e-4, name
