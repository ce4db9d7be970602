"""benchmarks/store.py (`make bench-store`) on a tiny trial, in seconds: every figure is measured and written
where the other benchmarks write theirs. The numbers are the benchmark's to report; here only that they are
there and make sense."""
import importlib.util
import json

from benchmarks import store as bench_store
from conftest import tiny_config
from lstm_core.artifacts import RESULTS

HAS_S3 = importlib.util.find_spec("moto") is not None and importlib.util.find_spec("boto3") is not None


def test_the_benchmark_writes_every_figure_of_each_store_and_report(saves, monkeypatch, capsys):
    # the tiny config stands for the preset, and as its own full length the budget is judged
    monkeypatch.setattr(bench_store, "preset", lambda name: tiny_config())
    assert bench_store.main(["--repeats", "2"]) == 0
    out = capsys.readouterr().out
    [written] = (saves / "bench").glob("store-*.json")
    result = json.loads(written.read_text())
    assert f"written to {written}" in out and "first open" in out and "run report:" in out

    assert result["preset"] == "default" and result["epochs"] == tiny_config().epochs and result["full_default"]
    assert result["budget_percent"] == bench_store.BUDGET_PERCENT and isinstance(result["within_budget"], bool)
    assert 0 < result["trial_seconds"] <= result["worker_seconds"]
    assert {"config.json", "eval.json", "best.pt", "metrics.jsonl"} <= set(result["result_files"]) <= \
        set(RESULTS) | {name for name in result["result_files"] if name.startswith("events.out.tfevents.")}
    assert result["result_bytes"] == sum(result["result_files"].values()) > 0

    assert set(result["stores"]) == {"folder", "s3"}
    kinds = ("folder", "s3") if HAS_S3 else ("folder",)
    for kind in kinds:
        row = result["stores"][kind]
        for figure in ("upload", "upload_store_only", "first_open"):
            assert len(row[figure]["seconds"]) == 2 and row[figure]["median_s"] > 0
        assert row["upload_percent_of_trial"] == \
            100 * row["upload"]["median_s"] / result["trial_seconds"]
    assert result["stores"]["s3"]["spec"].startswith("s3://") if HAS_S3 else "skipped" in result["stores"]["s3"]

    for kind in ("run", "study"):
        report = result["reports"][kind]
        assert report["bytes"] > 1_000_000           # plotly.js inlined: a report opens offline
        assert len(report["seconds"]) == 2 and report["median_s"] > 0


def test_a_shorter_trial_is_not_judged_against_the_default_budget(saves, monkeypatch, capsys):
    monkeypatch.setattr(bench_store, "preset", lambda name: tiny_config(epochs=3))
    monkeypatch.setattr(bench_store, "measure", lambda base, workdir, repeats, mistakes_from: {
        "epochs": base.epochs, "trial_seconds": 1.0, "worker_seconds": 1.0, "repeats": repeats,
        "result_files": {}, "result_bytes": 0, "stores": {}, "reports": {}})
    assert bench_store.main(["--epochs", "1", "--repeats", "1"]) == 0
    [written] = (saves / "bench").glob("store-*.json")
    result = json.loads(written.read_text())
    assert result["full_default"] is False and result["within_budget"] is None and result["epochs"] == 1
    assert "not the full `default` (3 epochs)" in capsys.readouterr().out
