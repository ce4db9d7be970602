"""The one full-data check of the core: the default preset, one epoch on all 55,000 training samples."""
import pytest

from lstm_core.config import preset
from lstm_core.recorder import RunRecorder
from lstm_core.runs import create_run
from lstm_core.train import fit


@pytest.mark.full
def test_default_preset_one_epoch_on_the_full_data_reaches_97_percent(mnist, saves):
    config = preset("default").replace(epochs=1)
    run = create_run(config, saves)
    history = fit(config, [RunRecorder(run)], data=mnist)
    assert history.epochs[0]["val_accuracy"] > 0.96
    assert history.test["n"] == 10000 and history.test["accuracy"] >= 0.97
    assert run.eval()["test_accuracy"] == history.test["accuracy"]
