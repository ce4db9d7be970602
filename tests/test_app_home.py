"""The home page under AppTest: devices, the no-runs message, the runs table, and a broken saves root."""
import json

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO

ENTRY = str(REPO / "streamlit_app.py")


def run_page(path: str = ENTRY) -> AppTest:
    """Home through the entrypoint (its default page), so its links to other pages resolve."""
    at = AppTest.from_file(path, default_timeout=60)
    at.run(timeout=60)
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_empty_saves_shows_the_no_runs_message(saves):
    at = run_page()
    assert [t.value for t in at.title] == ["LSTM Studio"]
    assert len(at.info) == 1 and "python -m lstm_core train --preset default" in at.info[0].value
    assert not at.dataframe and not at.error
    assert any(str(saves / "runs") in c.value for c in at.caption)


def test_devices_list_the_cpu(saves):
    at = run_page()
    assert any("`cpu`" in m.value for m in at.markdown)


def test_each_gpu_is_listed_with_the_precision_it_really_runs_fast(saves, monkeypatch):
    """The devices as torch would report a T4 and an H100: bf16 is called native only where it is."""
    import lstm_core.devices as devices

    gpus = [devices.DeviceInfo("cuda:0", "Tesla T4 (15.0 GiB, compute capability 7.5)", False,
                               devices.amp_summary((7, 5))),
            devices.DeviceInfo("cuda:1", "NVIDIA H100 (79.6 GiB, compute capability 9.0)", True,
                               devices.amp_summary((9, 0)))]
    monkeypatch.setattr(devices, "available_devices", lambda: gpus)
    at = run_page()
    (listing,) = [m.value for m in at.markdown if "`cuda:0`" in m.value]
    t4, h100 = listing.splitlines()
    assert "native bf16" not in t4 and "fp16 autocast with loss scaling" in t4
    assert "native bf16" in h100 and "CNN: bf16 autocast" in h100


def test_runs_table_holds_the_trained_run(trained_saves, monkeypatch):
    monkeypatch.setenv("LSTM_SAVES", str(trained_saves))
    (run_id,) = [p.name for p in (trained_saves / "runs").iterdir()]
    at = run_page()
    assert not at.info and not at.error
    table = at.dataframe[0].value
    assert list(table["id"]) == [run_id]
    assert list(table["state"]) == ["completed"]
    evaluation = json.loads((trained_saves / "runs" / run_id / "eval.json").read_text())
    assert table["test_accuracy"][0] == pytest.approx(100 * evaluation["test_accuracy"])  # shown in percent
    assert table["duration_s"][0] > 0


def test_a_broken_run_folder_is_listed_as_unknown_not_a_traceback(saves):
    run = saves / "runs" / "20260101-000000-abcdef"
    run.mkdir(parents=True)
    (run / "config.json").write_text("[1, 2]")   # JSON, but not a config
    (run / "status.json").mkdir()                # unreadable as a file
    (run / "metrics.jsonl").write_text('{"event": "epoch", "val_accuracy": "high"}\n{"tor')
    at = run_page()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["id"]) == [run.name] and list(table["state"]) == ["unknown"]


def test_entrypoint_routes_to_home(saves):
    at = run_page(ENTRY)
    assert [t.value for t in at.title] == ["LSTM Studio"]
    assert len(at.info) == 1
