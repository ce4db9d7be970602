"""lstm_core.cpu: the kernel's LSTM against nn.LSTM's results and gradients, accelerate() and its
fallbacks, the kernel's dropout, batches and argument checks, and the process set-up.

The whole file skips where no C++ compiler is (or LSTM_STUDIO_FUSED=0): torch's ops are used there. With
a compiler, the kernel must build, and every test runs."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lstm_core import cpu, models
from lstm_core.config import TrainConfig, preset
from lstm_core.cpu import kernel as cpu_kernel
from lstm_core.cpu.lstm import applies, dropout_mask, run
from lstm_core.devices import cpu_has_bf16
from lstm_core.models import build_model

from conftest import REPO

if os.environ.get("LSTM_STUDIO_FUSED", "1") == "0" or not (shutil.which("c++") or shutil.which("g++")):
    pytest.skip("no CPU kernel here (no C++ compiler, or LSTM_STUDIO_FUSED=0): torch's ops are used instead",
                allow_module_level=True)


def test_kernel_builds_here():
    assert cpu.available(), cpu_kernel.error()


def run_both(lstm: nn.LSTM, x: torch.Tensor):
    """Outputs and every gradient (weights and input) of nn.LSTM and of the kernel for one random loss."""
    results = []
    weights = None
    for fn in (lstm, lambda inp: run(lstm, inp)):
        lstm.zero_grad()
        inp = x.clone().requires_grad_()
        out, (h, c) = fn(inp)
        if weights is None:
            gen = torch.Generator().manual_seed(1)
            weights = [torch.randn(t.shape, generator=gen) for t in (out, h, c)]
        sum((t * w).sum() for t, w in zip((out, h, c), weights)).backward()
        results.append([out.detach(), h.detach(), c.detach(), inp.grad] + [p.grad.clone() for p in lstm.parameters()])
    return results


# the kernel computes 95 and 60 units as 96 and 64 (zero-weight padding units): the outputs must not show it
@pytest.mark.parametrize("layers,bidirectional,hidden", [(1, False, 128), (3, False, 95), (2, True, 64), (2, True, 60)])
def test_matches_nn_lstm_outputs_and_gradients(layers, bidirectional, hidden):
    torch.manual_seed(0)
    lstm = nn.LSTM(28, hidden, layers, batch_first=True, bidirectional=bidirectional)
    x = torch.randn(7, 28, 28)          # odd batch: uneven rows per thread
    assert applies(lstm, x)
    ref, ours = run_both(lstm, x)
    for a, b in zip(ref, ours):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("layers,bidirectional,hidden,batch", [(1, False, 128, 7), (3, False, 95, 1), (2, True, 64, 5)])
def test_inference_keeps_no_steps_and_matches_nn_lstm(mode, layers, bidirectional, hidden, batch):
    """Without autograd the kernel keeps only the outputs; they and (h_n, c_n) must still be nn.LSTM's."""
    torch.manual_seed(0)
    lstm = nn.LSTM(28, hidden, layers, batch_first=True, bidirectional=bidirectional).eval()
    x = torch.randn(batch, 28, 28)
    with torch.no_grad():
        ref = lstm(x)
    if mode == "frozen":                  # grad mode on, but nothing needs a gradient
        lstm.requires_grad_(False)
        ours = run(lstm, x)
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            ours = run(lstm, x)
    for a, b in zip((ref[0], *ref[1]), (ours[0], *ours[1])):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)
    assert ours[0].grad_fn is None


@pytest.mark.slow   # compiles two more builds of the kernel (a minute here)
@pytest.mark.parametrize("isa, march", [("avx2", ["-march=haswell"]), ("plain", [])])
def test_narrower_vector_builds_match_nn_lstm_too(monkeypatch, isa, march):
    """The gate loops and the batch builder have AVX-512, AVX2 and plain-float versions, chosen when the
    kernel is compiled for the CPU at hand; build the ones this machine would not pick, and check them."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("not an x86 CPU")
    if isa == "avx2" and " avx2 " not in Path("/proc/cpuinfo").read_text().replace("\n", " "):
        pytest.skip("this CPU has no AVX2")
    from torch.utils import cpp_extension
    build = cpp_extension.load(f"lstm_studio_test_{isa}", [str(cpu_kernel.SOURCE)],
                               extra_cflags=["-O3", "-ffast-math", "-fopenmp", *march])
    native = cpu_kernel.load()
    monkeypatch.setitem(cpu_kernel._state, "kernel", build)
    for layers, bidirectional, hidden in ((3, False, 95), (2, True, 20)):
        torch.manual_seed(0)
        lstm = nn.LSTM(28, hidden, layers, batch_first=True, bidirectional=bidirectional)
        ref, ours = run_both(lstm, torch.randn(5, 28, 28))
        for a, b in zip(ref, ours):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)
    images, idx, u = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8), torch.arange(19, -1, -1), torch.rand(20, 5) * 2 - 1
    spans = [0.5, 0.2, 0.3, 0.4, 0.4]
    torch.testing.assert_close(build.batch_images(images, idx, u, spans, 0.1, 0.3),
                               native.batch_images(images, idx, u, spans, 0.1, 0.3), rtol=0, atol=1e-4)


def test_final_state_only_matches_too():
    """The classifier reads h_n alone: the backward pass then gets no per-step gradient at all."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(28, 32, 2, batch_first=True), nn.Linear(32, 10)
    x, y = torch.randn(5, 28, 28), torch.randint(0, 10, (5,))
    grads = []
    for fn in (lstm, lambda inp: run(lstm, inp)):
        lstm.zero_grad()
        nn.functional.cross_entropy(head(fn(x)[1][0][-1]), y).backward()
        grads.append([p.grad.clone() for p in lstm.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_inference_mode_and_batch_of_one():
    torch.manual_seed(0)
    lstm = nn.LSTM(1, 16, 1, batch_first=True).eval()
    x = torch.randn(1, 50, 1)
    with torch.inference_mode():
        out, (h, _) = run(lstm, x)
        ref, (h_ref, _) = lstm(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-6)


def test_falls_back_to_nn_lstm_where_the_kernel_does_not_apply():
    lstm = nn.LSTM(28, 16, batch_first=True)
    assert not applies(lstm.double(), torch.randn(2, 28, 28, dtype=torch.float64))
    lstm = lstm.float()
    assert not applies(lstm, torch.randn(28, 28))                        # unbatched
    with torch.autocast("cpu", torch.bfloat16):
        assert not applies(lstm, torch.randn(2, 28, 28))
    assert not applies(nn.LSTM(28, 16, batch_first=False), torch.randn(28, 2, 28))
    assert not applies(nn.LSTM(28, 16, batch_first=True, proj_size=8), torch.randn(2, 28, 28))
    cpu.enable(False)
    try:
        assert not applies(lstm, torch.randn(2, 28, 28))
    finally:
        cpu.enable(True)
    assert applies(lstm, torch.randn(2, 28, 28))


def test_accelerate_keeps_the_parameters_state_dict_and_results():
    """accelerate() changes the class of a model's nn.LSTM in place: the same Parameter objects, the same state_dict, the same outputs; nn.LSTM's own path where the kernel does not
    apply (an initial state, an unbatched input)."""
    torch.manual_seed(0)
    model = build_model(TrainConfig(num_layers=2, hidden_size=24, dropout=0.3)).eval()
    plain = build_model(TrainConfig(num_layers=2, hidden_size=24, dropout=0.3)).eval()
    plain.load_state_dict(model.state_dict())
    params, state = list(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}
    assert cpu.accelerate(model) is model
    assert type(model.lstm) is cpu.lstm.LSTM and type(model.dropout) is nn.Dropout
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(5, 28, 28)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=2e-5)
    h0 = (torch.zeros(2, 5, 24), torch.zeros(2, 5, 24))
    torch.testing.assert_close(model.lstm(x, h0)[0], plain.lstm(x, h0)[0])       # torch's path, given a state
    torch.testing.assert_close(model.lstm(x[0])[0], plain.lstm(x[0])[0])          # and unbatched
    cpu.accelerate(model)                                                         # again: nothing changes
    assert type(model.lstm) is cpu.lstm.LSTM
    plain.load_state_dict(model.state_dict())                                     # checkpoints are nn.LSTM's
    cnn = build_model(preset("cnn"))
    assert cpu.accelerate(cnn) is cnn                                             # nothing to route


def test_training_evaluation_and_prediction_on_a_cpu_go_through_the_kernel(mnist):
    from lstm_core.evaluate import predict_logits
    from lstm_core.preprocess import from_canvas, predict
    from lstm_core.train import prepare
    config = TrainConfig(limit_train=256, val_size=256)
    state, _ = prepare(config, mnist)
    assert type(state.model.lstm) is cpu.lstm.LSTM
    model = build_model(config)
    predict_logits(model, mnist.test_images[:10], config)
    assert type(model.lstm) is cpu.lstm.LSTM
    model = build_model(config)
    predict(model, config, from_canvas(None))
    assert type(model.lstm) is cpu.lstm.LSTM


def test_accelerate_changes_nothing_without_the_kernel(monkeypatch):
    monkeypatch.setitem(cpu_kernel._state, "kernel", None)
    model = cpu.accelerate(build_model(TrainConfig()))
    assert type(model.lstm) is nn.LSTM


@pytest.mark.parametrize("bf16", [False, True])
def test_an_accelerated_model_under_cpu_autocast(monkeypatch, bf16):
    """Under bf16 autocast the kernel steps aside: a CPU with bf16 runs nn.LSTM in bf16; one without (oneDNN
    would raise) runs the layer in fp32 outside autocast, which is the kernel's again."""
    if bf16 and not cpu_has_bf16():
        pytest.skip("this CPU has no bf16: oneDNN's bf16 LSTM would raise")
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: bf16)
    torch.manual_seed(0)
    model = cpu.accelerate(build_model(TrainConfig(hidden_size=16)))
    x = torch.randn(2, 28, 28, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out, h_n = model.run_recurrent(x)
    assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
    if not bf16:
        torch.testing.assert_close(out, nn.LSTM.forward(model.lstm, x)[0], rtol=1e-4, atol=2e-5)
    out.float().sum().backward()
    assert x.grad is not None and model.lstm.weight_hh_l0.grad is not None


def test_switched_off_by_environment():
    code = "from lstm_core import cpu; print(cpu.available())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "LSTM_STUDIO_FUSED": "0"})
    assert out.stdout.strip() == "False"


def test_dropout_between_layers():
    torch.manual_seed(0)
    mask = dropout_mask(torch.Size([200, 500]), 0.3)
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert mask.eq(0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert mask.mean().item() == pytest.approx(1.0, abs=0.02)   # expectation kept
    torch.manual_seed(0)
    assert torch.equal(dropout_mask(torch.Size([200, 500]), 0.3), mask)   # follows torch's seed
    assert not torch.equal(dropout_mask(torch.Size([200, 500]), 0.3), mask)
    # in training, layer outputs are dropped; in eval the model is deterministic and equals nn.LSTM
    lstm = nn.LSTM(28, 32, 2, batch_first=True, dropout=0.5)
    x = torch.randn(4, 28, 28)
    assert not torch.allclose(run(lstm, x)[0], run(lstm, x)[0])
    lstm.eval()
    torch.testing.assert_close(run(lstm, x)[0], lstm(x)[0], rtol=1e-4, atol=1e-6)


def test_unidirectional_layers_drop_their_input_as_the_kernel_reads_it():
    """Between unidirectional layers the kernel drops the previous layer's output as it copies it into its
    steps (and its gradient on the way back): the same as torch's layers with dropout_mask's masks between."""
    torch.manual_seed(0)
    lstm = nn.LSTM(28, 95, 3, batch_first=True, dropout=0.4)
    singles = [nn.LSTM(28 if layer == 0 else 95, 95, batch_first=True) for layer in range(3)]
    for layer, single in enumerate(singles):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(single, name + "_l0").data.copy_(getattr(lstm, f"{name}_l{layer}"))
    x = torch.randn(5, 28, 28)
    weights = torch.randn(5, 28, 95)
    results = []
    for path in ("kernel", "torch with masks"):
        inp = x.clone().requires_grad_()
        torch.manual_seed(7)                      # the same dropout seeds, drawn in the same order
        if path == "kernel":
            out = run(lstm, inp)[0]
        else:
            out = inp
            for layer, single in enumerate(singles):
                out = single(out)[0]
                if layer < 2:
                    out = out * dropout_mask(out.shape, 0.4)
        (out * weights).sum().backward()
        params = lstm.parameters() if path == "kernel" else (p for single in singles for p in single.parameters())
        results.append([out.detach(), inp.grad] + [p.grad for p in params])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)
    assert results[0][1].eq(0).sum() == 0                   # the input of layer 1 is never dropped


def test_process_set_up_flushes_denormals():
    cpu.prepare_process()
    assert torch.tensor([1e-323], dtype=torch.float64).item() == 0    # denormals are zero on this thread
    if platform.machine() in ("x86_64", "AMD64"):
        assert cpu.flush_denormals()                                  # and on the pool's threads


def test_big_step_buffers_are_reused_between_batches():
    """Each batch of the pixel model needs ~0.5 GB of step buffers, in blocks glibc would map afresh and
    unmap when freed: the kernel keeps them for the next batch, which then faults no pages in."""
    import resource
    torch.manual_seed(0)
    lstm = nn.LSTM(1, 128, batch_first=True)
    x = torch.randn(64, 784, 1)                           # gates alone: 64 x 784 x 512 floats, 103 MB

    def batch():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run(lstm, x)[1][0].sum().backward()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    batch()
    assert batch() < 5000                                 # ~0.25 GB of fresh pages: ~60,000 faults


# The kernel's entry points read raw CPU pointers: a tensor on another device ("meta" stands in for CUDA,
# which no test machine needs), of another dtype or of the wrong shape must raise an error that names the
# argument, not crash the process or return garbage.

@pytest.fixture
def kernel():
    return cpu_kernel.load()


def small_stack(layers=2, batch=3, steps=4, inputs=5, hidden=20):
    """x (batch, steps, inputs) and the kernel's weights list, w_ih, w_hh and bias of each layer."""
    gen = torch.Generator().manual_seed(0)
    weights = []
    for layer in range(layers):
        weights += [torch.randn(4 * hidden, inputs if layer == 0 else hidden, generator=gen),
                    torch.randn(4 * hidden, hidden, generator=gen), torch.randn(4 * hidden, generator=gen)]
    return torch.randn(batch, steps, inputs, generator=gen), weights


def replaced(items, i, value):
    return [value if j == i else item for j, item in enumerate(items)]


@pytest.mark.parametrize("spoil, match", [
    (lambda x, w: (x.to("meta"), w), r"forward: x must be a CPU tensor, got meta"),
    (lambda x, w: (x.half(), w), r"forward: x must be Float, got Half"),
    (lambda x, w: (x[0], w), r"forward: x must have shape \(B, T, F\)"),
    (lambda x, w: (x[:, :0], w), r"forward: x must have at least one step"),
    (lambda x, w: (x, replaced(w, 4, w[4].to("meta"))), r"forward: weights\[4\] must be a CPU tensor, got meta"),
    (lambda x, w: (x, replaced(w, 3, w[3].double())), r"forward: weights\[3\] must be Float, got Double"),
    (lambda x, w: (x[..., :4], w), r"forward: weights\[0\] must have shape \(4H, F\) = \[80, 4\], got \[80, 5\]"),
    (lambda x, w: (x, replaced(w, 5, w[5][:-1])), r"forward: weights\[5\] must have shape \(4H\) = \[80\]"),
    (lambda x, w: (x, w[:4]), r"forward: weights must be .* a multiple of 3"),
], ids=["x-meta", "x-half", "x-2d", "x-no-steps", "weight-meta", "weight-double", "w_ih-columns", "bias-size",
        "weight-count"])
def test_forward_rejects_bad_tensors_by_name(kernel, spoil, match):
    x, weights = small_stack()
    kernel.forward(x, weights, True)
    with pytest.raises(RuntimeError, match=match):
        kernel.forward(*spoil(x, weights), True)


@pytest.mark.parametrize("arg, spoil, match", [
    ("d_hs", lambda t: t.to("meta"), r"backward: d_hs must be a CPU tensor, got meta"),
    ("d_h_n", lambda t: t.to("meta"), r"backward: d_h_n must be a CPU tensor, got meta"),
    ("d_c_n", lambda t: t.double(), r"backward: d_c_n must be Float, got Double"),
    ("d_c_n", lambda t: t[:1], r"backward: d_c_n must have shape \(L, B, H\) = \[2, 3, 20\], got \[1, 3, 20\]"),
    ("layout", lambda t: t.to("meta"), r"backward: layout must be a CPU tensor, got meta"),
    ("layout", lambda t: t.int(), r"backward: layout must be Long, got Int"),
    ("kept", lambda k: replaced(k, 6, k[6].to("meta")), r"backward: kept\[6\] must be a CPU tensor, got meta"),
    ("kept", lambda k: replaced(k, 2, k[2].t().contiguous().t()), r"backward: kept\[2\] must be contiguous"),
    ("kept", lambda k: replaced(k, 5, k[5][:-1]), r"backward: kept\[5\] must have shape \(B \* T, P\)"),
    ("kept", lambda k: k[:4], r"backward: kept must hold 4 tensors per layer"),
    ("weights", lambda w: replaced(w, 2, w[2].to("meta")), r"backward: weights\[2\] must be a CPU tensor, got meta"),
    ("weights", lambda w: replaced(w, 4, w[4].half()), r"backward: weights\[4\] must be Float, got Half"),
], ids=["d_hs-meta", "d_h_n-meta", "d_c_n-double", "d_c_n-layers", "layout-meta", "layout-int", "kept-meta",
        "kept-strided", "kept-rows", "kept-count", "bias-meta", "weight-half"])
def test_backward_rejects_bad_tensors_by_name(kernel, arg, spoil, match):
    x, weights = small_stack()
    hs, c_n, h_n, layout, *kept = kernel.forward(x, weights, True)
    args = dict(d_hs=torch.ones_like(hs), d_c_n=torch.ones_like(c_n), d_h_n=torch.ones_like(h_n), layout=layout,
                kept=kept, weights=weights)
    kernel.backward(**args, need_dx=True)
    args[arg] = spoil(args[arg])
    with pytest.raises(RuntimeError, match=match):
        kernel.backward(**args, need_dx=True)


@pytest.mark.parametrize("arg, spoil, match", [
    ("images", lambda t: t.to("meta"), r"batch_images: images must be a CPU tensor, got meta"),
    ("images", lambda t: t.float(), r"batch_images: images must be Byte, got Float"),
    ("images", lambda t: t[:, :, :27], r"batch_images: images must have shape \(N, 28, 28\)"),
    ("idx", lambda t: t.to("meta"), r"batch_images: idx must be a CPU tensor, got meta"),
    ("idx", lambda t: t.int(), r"batch_images: idx must be Long, got Int"),
    ("idx", lambda t: t.view(2, 3), r"batch_images: idx must have shape \(B\)"),
    ("u", lambda t: t.to("meta"), r"batch_images: u must be a CPU tensor, got meta"),
    ("u", lambda t: t[:, :4], r"batch_images: u must have shape \(B, 5\) = \[6, 5\], got \[6, 4\]"),
    ("spans", lambda s: s[:3], r"batch_images: spans must hold 5 values"),
], ids=["images-meta", "images-float", "images-size", "idx-meta", "idx-int", "idx-2d", "u-meta", "u-columns",
        "spans"])
def test_batch_images_rejects_bad_tensors_by_name(kernel, arg, spoil, match):
    args = dict(images=torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8), idx=torch.arange(6),
                u=torch.rand(6, 5) * 2 - 1, spans=[0.5, 0.2, 0.3, 0.4, 0.4])
    kernel.batch_images(*args.values(), 0.1, 0.3)
    args[arg] = spoil(args[arg])
    with pytest.raises(RuntimeError, match=match):
        kernel.batch_images(*args.values(), 0.1, 0.3)


def test_gemm_seconds_rejects_an_empty_shape(kernel):
    with pytest.raises(RuntimeError, match=r"gemm_seconds: B, T, F, H and repeats must be positive"):
        kernel.gemm_seconds(0, 4, 5, 20, True, 1)


def test_entry_points_still_take_strided_tensors_they_copy(kernel):
    """x, the weights, the gradients, images, idx and u may have any strides (the kernel copies what it
    must) and u any floating dtype: the same results as contiguous ones."""
    x, weights = small_stack()
    strided_weights = [w.t().contiguous().t() if w.dim() == 2 else w for w in weights]
    hs, c_n, h_n, layout, *kept = kernel.forward(x, weights, True)
    for strided_x in (x.transpose(0, 1).contiguous().transpose(0, 1), x.transpose(1, 2).contiguous().transpose(1, 2)):
        for a, b in zip(kernel.forward(strided_x, strided_weights, True), (hs, c_n, h_n, layout, *kept)):
            assert torch.equal(a, b)
    d_hs = torch.ones(()).expand(hs.shape)                     # what hs.sum().backward() sends
    strided_h_n = h_n.transpose(0, 1).contiguous().transpose(0, 1)
    ref = kernel.backward(d_hs.contiguous(), None, h_n, layout, kept, weights, True)
    for a, b in zip(kernel.backward(d_hs, None, strided_h_n, layout, kept, strided_weights, True), ref):
        assert torch.equal(a, b)
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)
    idx, u, spans = torch.arange(12)[::2], torch.rand(6, 5) * 2 - 1, [0.5, 0.2, 0.3, 0.4, 0.4]
    ref = kernel.batch_images(images, idx.contiguous(), u, spans, 0.1, 0.3)
    strided_images = images.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(kernel.batch_images(strided_images, idx, u.double(), spans, 0.1, 0.3), ref)


def test_two_checkouts_of_different_versions_keep_a_kernel_build_each():
    """torch's extension cache keys a build by its name: a name without the source would have two clones of
    different versions rebuild over each other at every start."""
    source = cpu_kernel.SOURCE.read_bytes()
    assert cpu_kernel.build_name() == cpu_kernel.build_name(source)
    assert cpu_kernel.build_name(source + b"\n// another version\n") != cpu_kernel.build_name(source)
