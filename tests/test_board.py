"""TensorBoard's event files in a run folder, read back with TensorBoard's own reader and held to the run's
metrics.jsonl."""
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util.tensor_util import make_ndarray

from conftest import tiny_config
from lstm_core import board
from lstm_core.recorder import RunRecorder
from lstm_core.runs import create_run, open_run
from lstm_core.train import fit


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, mnist):
    root = tmp_path_factory.mktemp("board") / "saves"
    run = create_run(tiny_config(num_layers=2, grad_clip=0.5), root)
    fit(run.config(), [RunRecorder(run)], data=mnist)
    events = EventAccumulator(str(run.path), size_guidance={"scalars": 0})
    events.Reload()
    return run, events


def values(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_progress_records_are_scalars_at_their_step(recorded):
    run, events = recorded
    batches = [r for r in run.metrics() if r["event"] == "batch"]
    assert values(events, "train/running_loss") == [(r["step"], pytest.approx(r["loss"])) for r in batches]
    assert values(events, "gradients/norm") == [(r["step"], pytest.approx(r["grad_norm"])) for r in batches]
    assert values(events, "gradients/clipped_fraction") == [(r["step"], pytest.approx(r["clip_fraction"]))
                                                            for r in batches]
    for layer in ("lstm 1", "lstm 2", "head"):
        assert [v for _, v in values(events, f"gradients/layer/{layer}")] == pytest.approx(
            [r["layer_grad_norms"][layer] for r in batches])
    assert [v for _, v in values(events, "train/lr")] == pytest.approx([r["lr"] for r in batches])
    # the gradient over time as one number: the first step's share of the last step's
    assert [v for _, v in values(events, "gradients/first_to_last_step")] == pytest.approx(
        [r["step_grad_norms"][0] / r["step_grad_norms"][-1] for r in batches])


def test_epochs_are_scalars_at_the_step_that_ends_them(recorded):
    run, events = recorded
    epochs = run.epochs()
    per_epoch = next(r["steps_per_epoch"] for r in run.metrics() if r["event"] == "start")
    assert values(events, "loss/validation") == [(r["epoch"] * per_epoch, pytest.approx(r["val_loss"])) for r in epochs]
    assert [v for _, v in values(events, "accuracy/train")] == pytest.approx([r["train_accuracy"] for r in epochs])


def test_the_config_and_final_metrics_are_hparams(recorded):
    run, _ = recorded
    hparams, metrics = {}, {}
    for path in sorted(run.path.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                                   for k, v in data.session_start_info.hparams.items()}
                if value.tag.startswith("hparam/"):
                    metrics[value.tag] = (value.simple_value if value.WhichOneof("value") == "simple_value"
                                          else make_ndarray(value.tensor).item())
    config = run.config()
    assert hparams["hidden_size"] == config.hidden_size and hparams["optimizer"] == config.optimizer
    assert set(hparams) == set(config.to_dict())
    assert metrics["hparam/test_accuracy"] == pytest.approx(run.eval()["test_accuracy"])


def test_event_files_stay_small(recorded):
    """A few hundred bytes per progress record: a `default` run (15 epochs, ~5 records each) stays far
    under a megabyte."""
    run, _ = recorded
    size = sum(p.stat().st_size for p in run.path.glob("events.out.tfevents.*"))
    records = len(run.metrics())
    assert size / records < 2000


def test_without_tensorboard_a_run_records_as_before(saves, mnist, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert board.writer_for(saves) is None
    run = create_run(tiny_config(epochs=1), saves)
    fit(run.config(), [RunRecorder(run)], data=mnist)
    assert open_run(run.id).status()["state"] == "completed"
    assert not list(run.path.glob("events.out.tfevents.*"))
