import json
import math
import threading

import pytest
import torch

from conftest import tiny_config
from lstm_core.config import OPTIMIZERS, SCHEDULERS, TrainConfig
from lstm_core.train import Callback, fit, layer_name


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_run_start(self, state):
        self.events.append(("start", None))

    def on_batch(self, state, record):
        self.events.append(("batch", record))

    def on_epoch_end(self, state, record):
        self.events.append(("epoch", record))

    def on_train_end(self, state):
        self.events.append(("train_end", None))

    def on_run_end(self, state, history):
        self.events.append(("end", history))

    def on_exception(self, state, exc):
        self.events.append(("exception", exc))

    def of(self, kind):
        return [r for k, r in self.events if k == kind]


def test_fit_learns_and_reports_every_event_in_order(mnist):
    rec = Recorder()
    history = fit(tiny_config(), [rec], data=mnist)
    kinds = [k for k, _ in rec.events]
    assert kinds[0] == "start" and kinds[-2:] == ["train_end", "end"]
    assert len(rec.of("epoch")) == 2 and len(rec.of("batch")) == 2 * 40 // 10
    batch = rec.of("batch")[-1]
    assert {"loss", "accuracy", "samples_per_s", "lr", "eta", "epoch", "batch", "step", "steps"} <= set(batch)
    assert batch["samples_per_s"] > 0 and batch["step"] == batch["steps"] == 80
    epoch = rec.of("epoch")[-1]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_error", "lr", "epoch_seconds",
                "elapsed", "eta"):
        assert math.isfinite(epoch[key]), key
    assert epoch["val_error"] == pytest.approx(1 - epoch["val_accuracy"])
    assert history.epochs[1]["val_loss"] < history.epochs[0]["val_loss"]
    assert history.best_val_accuracy > 0.4 and history.test["accuracy"] > 0.4      # chance is 0.1
    assert history.test["n"] == 10000 and history.stopped == "completed"


def test_same_seed_same_result_other_seed_other_result(mnist):
    a, b = fit(tiny_config(epochs=1), data=mnist), fit(tiny_config(epochs=1), data=mnist)
    c = fit(tiny_config(epochs=1, seed=1), data=mnist)
    assert a.epochs[0]["val_loss"] == b.epochs[0]["val_loss"] and a.test == b.test
    assert c.epochs[0]["val_loss"] != a.epochs[0]["val_loss"]


class Sabotage(Callback):
    """After `after` epochs, scramble the weights in place: validation loss must get worse."""

    def __init__(self, after):
        self.after = after
        self.snapshots = {}

    def on_epoch_end(self, state, record):
        self.snapshots[state.epoch] = {k: v.clone() for k, v in state.model.state_dict().items()}
        if state.epoch >= self.after:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.add_(torch.randn_like(p) * 3)


def test_best_weights_are_a_copy_and_are_restored_before_testing(mnist):
    sabotage = Sabotage(after=2)
    history = fit(tiny_config(epochs=4, patience=0), [sabotage], data=mnist)
    assert history.best_epoch == 2 and len(history.epochs) == 4
    state_after = {}

    class Grab(Callback):
        def on_run_end(self, state, history):
            state_after.update({k: v.clone() for k, v in state.model.state_dict().items()})

    fit(tiny_config(epochs=4, patience=0), [Sabotage(after=2), Grab()], data=mnist)
    snap = sabotage.snapshots[2]
    assert all(torch.equal(state_after[k], snap[k]) for k in snap)
    assert history.test["accuracy"] > 0.4


def test_early_stopping_on_validation_loss(mnist):
    history = fit(tiny_config(epochs=10, patience=2), [Sabotage(after=2)], data=mnist)
    assert history.stopped == "early_stopped"
    assert len(history.epochs) == 4 and history.best_epoch == 2


def test_stop_event_ends_the_run_between_batches_as_cancelled(mnist):
    stop = threading.Event()

    class StopAfterThree(Recorder):
        def on_batch(self, state, record):
            super().on_batch(state, record)
            if len(self.of("batch")) == 3:
                stop.set()

    rec = StopAfterThree()
    history = fit(tiny_config(epochs=3, log_every=1), [rec], stop=stop, data=mnist)
    assert history.stopped == "cancelled" and history.epochs == []
    assert len(rec.of("batch")) == 3 and rec.of("end")            # the run still ends cleanly
    assert history.test is not None


def test_callback_can_request_a_stop_and_a_callable_stop_works(mnist):
    class StopAtEpochOne(Callback):
        def on_epoch_end(self, state, record):
            state.should_stop = True

    assert len(fit(tiny_config(epochs=3), [StopAtEpochOne()], data=mnist).epochs) == 1
    calls = []
    history = fit(tiny_config(epochs=3), stop=lambda: calls.append(1) or len(calls) > 50, data=mnist)
    assert history.stopped == "cancelled" and len(history.epochs) == 1


def test_exceptions_reach_callbacks_and_propagate(mnist):
    class Boom(Recorder):
        def on_batch(self, state, record):
            raise RuntimeError("disk full")

    rec = Boom()
    with pytest.raises(RuntimeError, match="disk full"):
        fit(tiny_config(), [rec], data=mnist)
    assert isinstance(rec.of("exception")[0], RuntimeError)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains(mnist, optimizer):
    lr = {"sgd": 0.1, "rmsprop": 2e-3}.get(optimizer, 1e-2)
    history = fit(tiny_config(optimizer=optimizer, lr=lr, epochs=2), data=mnist)
    assert history.epochs[-1]["val_loss"] < math.log(10) - 0.1    # better than uniform guessing


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_sets_the_learning_rate(mnist, scheduler):
    rec = Recorder()
    fit(tiny_config(scheduler=scheduler, epochs=2, lr=5e-3), [rec], data=mnist)
    lrs = [r["lr"] for r in rec.of("batch")]
    if scheduler in ("onecycle", "cosine"):
        assert lrs[-1] < 5e-3 * 0.05                                   # annealed to ~0 by the last batch
        assert max(lrs) <= 5e-3 + 1e-12
    else:
        assert lrs[0] == pytest.approx(5e-3)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8])
def test_onecycle_trains_runs_of_a_few_steps(mnist, steps):
    """OneCycleLR divides by zero with fewer than two steps per phase (a tuning trial on 1,000 images in
    batches of 256 has four): short runs warm up over at least two steps, or keep a constant lr."""
    history = fit(tiny_config(scheduler="onecycle", epochs=1, batch_size=100, limit_train=100 * steps,
                              log_every=1), data=mnist)
    assert len(history.epochs) == 1 and math.isfinite(history.epochs[0]["train_loss"])


def test_bf16_autocast_on_cpu_trains(mnist):
    history = fit(tiny_config(amp="bf16"), data=mnist)
    assert history.test["accuracy"] > 0.3


@pytest.mark.parametrize("changes", [dict(seq_mode="pixels", hidden_size=16, limit_train=100, batch_size=50),
                                     dict(seq_mode="permuted", hidden_size=16, limit_train=100, batch_size=50),
                                     dict(bidirectional=True, num_layers=2, dropout=0.2),
                                     dict(cell="gru", bidirectional=True, num_layers=2, dropout=0.2),
                                     dict(cell="rnn", num_layers=2, dropout=0.2),
                                     dict(cell="irnn", seq_mode="pixels", hidden_size=16, limit_train=100,
                                          batch_size=50, lr=1e-3),
                                     pytest.param(dict(arch="cnn", aug_rotate=10, aug_translate=0.1),
                                                  marks=pytest.mark.slow)])
def test_other_architectures_and_modes_train(mnist, changes):
    batches = Batches()
    history = fit(tiny_config(epochs=1, **changes), [batches], data=mnist)
    assert math.isfinite(history.epochs[0]["val_loss"]) and history.test["n"] == 10000
    # the gradient over time along an LSTM's sequence; a CNN has no time steps to measure
    steps = [len(r.get("step_grad_norms") or []) for r in batches.records]
    assert steps == [0 if changes.get("arch") == "cnn" else 28] * len(batches.records) and batches.records


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_optimizers_are_torchs_own_with_its_fused_step(kind):
    """Checkpoints hold torch's optimizer state_dicts: the optimizer is torch's class, fused on a CPU."""
    from lstm_core.train import make_optimizer
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    optimizer = make_optimizer(TrainConfig(optimizer=kind), params)
    assert type(optimizer) is {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
    assert optimizer.param_groups[0]["fused"]


# -- gradient health -----------------------------------------------------------------------------------
class Batches(Callback):
    """The progress records of a fit."""

    def __init__(self):
        self.records = []

    def on_batch(self, state, record):
        self.records.append(record)


def progress(mnist, **changes) -> list[dict]:
    batches = Batches()
    fit(tiny_config(epochs=1, **changes), [batches], data=mnist)
    return batches.records


def test_every_progress_record_carries_the_gradient_norms_per_layer(mnist):
    records = progress(mnist, num_layers=2, bidirectional=True, grad_clip=0.5, limit_train=500)
    assert records
    for r in records:
        assert 0 < r["grad_norm"] <= r["grad_norm_max"] and r["nonfinite_steps"] == 0
        assert list(r["layer_grad_norms"]) == ["lstm 1", "lstm 1 backward", "lstm 2", "lstm 2 backward", "head"]
        assert all(v > 0 for v in r["layer_grad_norms"].values())
        assert 0 <= r["clip_fraction"] <= 1
        assert len(r["step_grad_norms"]) == 28 and all(v > 0 for v in r["step_grad_norms"])
    assert json.loads(json.dumps(records)) == records                  # metrics.jsonl takes them as they are


@pytest.mark.parametrize("cell, name", [("gru", "gru"), ("rnn", "rnn"), ("irnn", "rnn")])
def test_gradient_health_names_the_cells_layers(mnist, cell, name):
    [record, *_] = progress(mnist, cell=cell, num_layers=2, limit_train=500)
    assert list(record["layer_grad_norms"]) == [f"{name} 1", f"{name} 2", "head"]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "irnn"])
def test_every_cell_learns_rows(mnist, cell):
    """Two epochs on 2,000 digits: far above chance (10%) for every cell, so the comparison compares cells
    that all train."""
    history = fit(tiny_config(cell=cell, **({"lr": 2e-3} if cell == "irnn" else {})), data=mnist)
    assert history.test["accuracy"] > 0.5, history.test["accuracy"]


def test_layer_names_follow_the_parameters():
    assert layer_name("lstm.weight_ih_l0") == layer_name("lstm.bias_hh_l0") == "lstm 1"
    assert layer_name("lstm.weight_hh_l2_reverse") == "lstm 3 backward"
    assert layer_name("head.weight") == "head" and layer_name("features.3.bias") == "features.3"


@pytest.mark.parametrize("clip, fraction", [(1e-6, 1.0), (100.0, 0.0), (0.0, None)])
def test_the_clipped_share_counts_the_steps_clipping_cut(mnist, clip, fraction):
    records = progress(mnist, grad_clip=clip, limit_train=500)
    assert [r["clip_fraction"] for r in records] == [fraction] * len(records)


@pytest.mark.slow
def test_pixels_without_an_open_forget_gate_show_vanishing_gradients(mnist):
    """Sequential MNIST from PyTorch's own gate biases: the gradient reaching the first pixels is many orders of
    magnitude below the last one's (or underflows to 0); from the chrono initialisation it stays within a
    few. The same records the Train and Evaluate pages plot."""
    def first_to_last(forget_init):
        records = progress(mnist, seq_mode="pixels", hidden_size=32, limit_train=200, forget_init=forget_init,
                           grad_clip=0.0, log_every=2)
        assert all(len(r["step_grad_norms"]) == 28 for r in records)
        return max(r["step_grad_norms"][0] / r["step_grad_norms"][-1] for r in records)
    assert first_to_last("chrono") > 1e-2
    assert first_to_last("torch") < 1e-8


@pytest.mark.slow
def test_on_pixels_the_plain_rnns_gradient_vanishes_where_the_gated_cells_keep_theirs(mnist):
    """What Compare LSTM, GRU and RNN shows on pixels: through 784 tanh steps the gradient reaching the first
    pixels is orders of magnitude below the last one's; the LSTM's and the GRU's open memory gates carry it."""
    def first_to_last(cell):
        records = progress(mnist, cell=cell, seq_mode="pixels", hidden_size=32, limit_train=200, log_every=2)
        ratios = [r["step_grad_norms"][0] / r["step_grad_norms"][-1] for r in records]
        print(cell, [f"{v:.1e}" for v in ratios])
        return max(ratios)
    assert first_to_last("rnn") < 1e-6
    assert first_to_last("lstm") > 1e-2 and first_to_last("gru") > 1e-2


def test_a_learning_rate_far_too_high_shows_as_exploding_gradients(mnist):
    """Without clipping, RMSprop at a rate far too high drives the norms up by orders of magnitude (or to
    non-finite values) within one epoch; the same model under SGD at a sane rate stays flat."""
    sane = progress(mnist, optimizer="sgd", lr=0.05, momentum=0.0, grad_clip=0.0, scheduler="none")
    wild = progress(mnist, optimizer="rmsprop", lr=1.0, momentum=0.9, grad_clip=0.0, scheduler="none")
    sane_max = max(r["grad_norm_max"] for r in sane)
    assert max(r["grad_norm"] for r in sane) / min(r["grad_norm"] for r in sane) < 30
    exploded = [r for r in wild if r["nonfinite_steps"] or (r["grad_norm_max"] or 0) > 100 * sane_max]
    assert exploded, [(r["grad_norm"], r["grad_norm_max"], r["nonfinite_steps"]) for r in wild]
