"""Every trial's results in an artifact store (lstm_core/artifacts.py, `tune --artifacts`, `--study --trial`):
real two-trial studies uploading to a folder and to S3 (moto's server, with and without a key prefix), opened
from another machine's empty saves root once the worker's own folder is gone; uploads that fail keep their
trial; stores that cannot work refused before anything trains; two readers downloading one trial at once."""
import json
import logging
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import Backoff, get_all_artifact_meta

from conftest import S3_BUCKET, S3Server, free_port, serving_s3, tiny_config, wait_until
from test_report import figures as count_figures, self_contained
from lstm_core import artifacts
from lstm_core.artifacts import FILES_ATTR, MISSING_ATTR, SOURCE_FILE, STORE_ATTR, cache_dir, trial_run
from lstm_core.checkpoints import load_model
from lstm_core.runs import Run, RunError
from lstm_core.tune import run_worker

SPACE = {"hidden_size": {"type": "int", "low": 8, "high": 32}}
FAST = dict(limit_train=1000, val_size=500, batch_size=100)
# What each kind of store is given as, and what the study must record: any machine's name for the same store
KINDS = {"folder": "store/", "s3": f"s3://{S3_BUCKET}", "s3-prefix": f"s3://{S3_BUCKET}/some/prefix/"}
ONE_OF = "name a run (its id, folder or checkpoint file) or a trial (--study NAME --trial N), one of them"


@dataclass
class Stored:
    """A study whose worker uploaded to a store and then left: its saves root is renamed away, so only the
    shared storage (`url`) and the store (`spec`, as the study recorded it) remain for a reader."""
    name: str
    url: str
    spec: str
    base: Path
    s3: S3Server | None = None

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.url)

    def local(self, trial) -> Path:
        """Where the trial's own folder went when its worker's machine left."""
        return Path(trial.user_attrs["run_dir"].replace(str(self.base / "worker"), str(self.base / "gone")))

    def prefix(self) -> str:
        """An S3 store's key prefix, with its slash ("" for none)."""
        rest = self.spec[len(f"s3://{S3_BUCKET}"):].strip("/")
        return f"{rest}/" if self.s3 and rest else ""

    def object(self, artifact_id: str) -> bytes:
        """An object as the store holds it, read without lstm_core."""
        if self.s3 is None:
            return (Path(self.spec) / artifact_id).read_bytes()
        return self.s3.client().get_object(Bucket=S3_BUCKET, Key=self.prefix() + artifact_id)["Body"].read()


def build_study(base: Path, name: str, given: str | None, trials: int = 2, s3: S3Server | None = None,
                **config) -> optuna.Study:
    """A real study of `trials` tiny trials in base/db.sqlite, its worker's saves root base/worker/saves, the
    relative store `given` resolved from `base`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        return run_worker(name, trials, tiny_config(**{**FAST, **config}), f"sqlite:///{base / 'db.sqlite'}", SPACE,
                          pruner="none", root=base / "worker" / "saves", seed=0, artifacts=given)


@pytest.fixture(autouse=True, scope="module")
def quiet_s3_server():
    """moto's server logs every request it answers: stderr here is what lstm_core says, checked line by line."""
    logger = logging.getLogger("werkzeug")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def shared_s3():
    """One S3 server for this module's stored studies, reached through boto3's environment as a worker is."""
    with pytest.MonkeyPatch.context() as mp, serving_s3(mp) as server:
        yield server


@pytest.fixture(scope="module", params=list(KINDS))
def stored(request, tmp_path_factory) -> Stored:
    kind = request.param
    base = tmp_path_factory.mktemp(f"stored-{kind}")
    s3 = request.getfixturevalue("shared_s3") if kind.startswith("s3") else None
    study = build_study(base, f"st-{kind}", KINDS[kind], s3=s3)
    (base / "worker").rename(base / "gone")         # the worker's machine left: its folders are not here
    return Stored(study.study_name, f"sqlite:///{base / 'db.sqlite'}", study.user_attrs[STORE_ATTR], base, s3)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Stored:
    """A study run without a store, whose worker's folder is gone too."""
    base = tmp_path_factory.mktemp("plain")
    study = build_study(base, "plain", None)
    (base / "worker").rename(base / "gone")
    return Stored(study.study_name, f"sqlite:///{base / 'db.sqlite'}", "", base)


def one_line_error(call) -> str:
    with pytest.raises(RunError) as caught:
        call()
    text = str(caught.value)
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    return text


# -- the upload ---------------------------------------------------------------------------------------
def test_every_result_file_is_in_the_store_byte_identical_and_listed_for_optuna_tools(stored):
    study = stored.study()
    given = KINDS[stored.name.removeprefix("st-")]
    expected = str(stored.base / "store") if stored.s3 is None else given.rstrip("/")
    assert stored.spec == expected and study.user_attrs[STORE_ATTR] == expected
    uploaded = set()
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs[STORE_ATTR] == expected
        folder = stored.local(trial)
        files = trial.user_attrs[FILES_ATTR]
        # everything a reader needs, TensorBoard's events included; not what only resumes or repeats best.pt
        assert set(files) == {p.name for p in folder.iterdir()} - {"last.pt", "final_state_dict.pth"}
        assert {"eval.json", "best.pt", "config.json", "metrics.jsonl", "curves.svg"} <= set(files)
        assert any(name.startswith("events.out.tfevents.") for name in files)
        for name, (artifact_id, size) in files.items():
            local = (folder / name).read_bytes()
            assert stored.object(artifact_id) == local and size == len(local), name
        # optuna-dashboard lists a trial's artifacts from Optuna's own records
        listed = {meta.artifact_id: meta.filename for meta in get_all_artifact_meta(trial, storage=study._storage)}
        assert listed == {artifact_id: name for name, (artifact_id, _) in files.items()}
        assert MISSING_ATTR not in trial.user_attrs
        uploaded |= {artifact_id for artifact_id, _ in files.values()}
    if stored.s3 is not None:       # every object under the store's prefix, none beside it
        keys = set(stored.s3.keys())
        assert {stored.prefix() + artifact_id for artifact_id in uploaded} <= keys
        assert not stored.prefix() or not uploaded & keys
    else:
        assert {p.name for p in Path(stored.spec).iterdir()} == uploaded


def test_a_study_without_a_store_records_none_of_it(plain):
    study = plain.study()
    assert STORE_ATTR not in study.user_attrs
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value > 0
        assert not {STORE_ATTR, FILES_ATTR, MISSING_ATTR, artifacts.SECONDS_ATTR} & set(trial.user_attrs)
        assert get_all_artifact_meta(trial, storage=study._storage) == []
        assert (plain.local(trial) / "eval.json").is_file()


# -- opening a trial on another machine ----------------------------------------------------------------
def test_another_machine_downloads_a_trial_once_into_its_cache(stored, tmp_path, monkeypatch):
    study, reader = stored.study(), tmp_path / "reader"
    best = study.best_trial
    assert artifacts.results_at(best) == "in the store" and artifacts.has_results(best)
    run = trial_run(study, best.number, root=reader)
    assert run.path == reader / "cache" / stored.name / f"trial_{best.number}"
    worker = stored.local(best)
    assert run.config() == Run(worker).config()
    assert run.eval()["test_accuracy"] == best.user_attrs["test_accuracy"]
    model, config = load_model(run.path)
    mine, theirs = model.state_dict(), load_model(worker)[0].state_dict()
    assert config.hidden_size == best.params["hidden_size"] and all(mine[k].equal(theirs[k]) for k in theirs)
    written = {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()}

    # The store out of reach: the cached copy still opens, untouched
    with unreachable(stored, monkeypatch):
        assert trial_run(study, best.number, root=reader).path == run.path
    assert {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()} == written

    # A cached file cut short is downloaded again (and with the store out of reach, that is one line)
    whole = (run.path / "best.pt").read_bytes()
    (run.path / "best.pt").write_bytes(whole[: len(whole) // 2])
    if stored.s3 is None:
        with unreachable(stored, monkeypatch):
            assert "no such folder" in one_line_error(lambda: trial_run(study, best.number, root=reader))
    assert trial_run(study, best.number, root=reader).path == run.path
    assert (run.path / "best.pt").read_bytes() == whole and load_model(run.path)[1] == config
    assert not [p for p in run.path.parent.iterdir() if p.name.endswith(".partial")]


class unreachable:
    """The store out of this machine's reach for a while: a folder store moved away, an S3 endpoint that
    answers nothing."""

    def __init__(self, stored: Stored, monkeypatch):
        self.stored, self.monkeypatch = stored, monkeypatch

    def __enter__(self):
        if self.stored.s3 is None:
            Path(self.stored.spec).rename(self.stored.spec + ".away")
        else:
            self.monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")

    def __exit__(self, *exc):
        if self.stored.s3 is None:
            Path(self.stored.spec + ".away").rename(self.stored.spec)
        else:
            self.monkeypatch.setenv("AWS_ENDPOINT_URL", self.stored.s3.endpoint)


def copy_of_store(stored: Stored, where: Path, change: dict[str, bytes]) -> str:
    """Another store holding the study's objects, with those in `change` replaced: what a reader names with
    --artifacts. A folder `where`, or on S3 the prefix of that name."""
    ids = [artifact_id for trial in stored.study().trials for artifact_id, _ in trial.user_attrs[FILES_ATTR].values()]
    if stored.s3 is None:
        folder = where
        folder.mkdir()
        for artifact_id in ids:
            (folder / artifact_id).write_bytes(change.get(artifact_id, stored.object(artifact_id)))
        return str(folder)
    client = stored.s3.client()
    for artifact_id in ids:
        client.put_object(Bucket=S3_BUCKET, Key=f"{where.name}/{artifact_id}",
                          Body=change.get(artifact_id, stored.object(artifact_id)))
    return f"s3://{S3_BUCKET}/{where.name}"


def test_a_store_object_whose_size_differs_from_the_trials_record_is_refused(stored, tmp_path):
    study, reader = stored.study(), tmp_path / "reader"
    trial = study.trials[0]
    artifact_id, size = trial.user_attrs[FILES_ATTR]["eval.json"]
    other = copy_of_store(stored, tmp_path / "tampered", {artifact_id: b"{}"})
    error = one_line_error(lambda: trial_run(study, 0, other, reader))
    assert error == (f"cannot open trial 0 of study {stored.name}: eval.json came from the artifact store {other} "
                     f"as 2 bytes, but the trial recorded {size}")
    assert not (reader / "cache" / stored.name).exists() or not any((reader / "cache" / stored.name).iterdir())
    # the same store, whole: the override is what a reader that reaches the store another way names
    whole = copy_of_store(stored, tmp_path / "whole", {})
    assert trial_run(study, 0, whole, reader).eval()["test_accuracy"] == trial.user_attrs["test_accuracy"]


def test_an_override_store_without_the_trials_objects_is_one_line(stored, tmp_path):
    study, reader = stored.study(), tmp_path / "reader"
    empty = str(tmp_path / "empty") if stored.s3 is None else f"s3://{S3_BUCKET}/empty"
    (tmp_path / "empty").mkdir()
    error = one_line_error(lambda: trial_run(study, 1, empty, reader))
    assert error.startswith(f"cannot download trial 1 of study {stored.name} from the artifact store {empty}")
    assert not (cache_dir(stored.name, 1, reader)).exists()
    error = one_line_error(lambda: trial_run(study, 1, str(tmp_path / "absent"), reader))
    assert error == f"cannot open trial 1 of study {stored.name}: artifact store {tmp_path / 'absent'}: no such folder"


def test_trials_that_cannot_be_opened_say_why_in_one_line(plain, tmp_path):
    study, reader = plain.study(), tmp_path / "reader"
    error = one_line_error(lambda: trial_run(study, 0, root=reader))
    assert error.startswith(f"trial 0 of study plain: its results are in {study.trials[0].user_attrs['run_dir']} on "
                            "the machine that ran it, and the study has no artifact store")
    assert one_line_error(lambda: trial_run(study, 7, root=reader)) == \
        "study plain has no trial 7 (its trials are 0 to 1)"
    # trials that never finished (another worker's, still running; one that failed) have nothing to open
    states = optuna.create_study(study_name="states", storage=f"sqlite:///{tmp_path / 'states.db'}")
    running, failed = states.ask(), states.ask()
    states.tell(failed, state=optuna.trial.TrialState.FAIL)
    assert one_line_error(lambda: trial_run(states, running.number, root=reader)) == \
        "trial 0 of study states is running: it has no results to open"
    assert one_line_error(lambda: trial_run(states, failed.number, root=reader)) == \
        "trial 1 of study states is failed: it has no results to open"
    assert not (reader / "cache").exists()


def test_two_readers_downloading_one_trial_at_once_both_end_with_the_whole_trial(stored, tmp_path):
    study, reader = stored.study(), tmp_path / "reader"
    trial = study.trials[1]
    start, opened, errors = threading.Barrier(4), [], []

    def read() -> None:
        try:
            start.wait()
            run = trial_run(stored.study(), 1, root=reader)
            opened.append((run.path, run.eval()["test_accuracy"], load_model(run.path)[1]))  # usable as returned
        except Exception as exc:  # noqa: BLE001 - said by the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(opened) == 4 and len(set(opened)) == 1
    folder = cache_dir(stored.name, 1, reader)
    local = stored.local(trial)
    assert {p.name for p in folder.iterdir()} == {*trial.user_attrs[FILES_ATTR], SOURCE_FILE}
    assert all((folder / name).read_bytes() == (local / name).read_bytes() for name in trial.user_attrs[FILES_ATTR])
    assert not [p.name for p in folder.parent.iterdir() if p.name.endswith(".partial")]
    # the readers silenced Backoff's retry logging each for its own download only
    assert logging.getLogger(Backoff.__module__).isEnabledFor(logging.ERROR)
    assert not logging.getLogger(Backoff.__module__).filters


# -- uploads that fail -----------------------------------------------------------------------------------
def when_the_first_trial_starts(study_folder: Path, then) -> threading.Thread:
    """Call `then()` once the study's first trial has made its folder: the store fails while trials run."""
    def watch() -> None:
        wait_until(lambda: study_folder.is_dir() and any(study_folder.glob("trial_*")), 120, "the first trial",
                   poll=0.01)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def optuna_log() -> list[str]:
    """What Optuna's own handler prints on stderr at warning level and above: it writes to the stderr of
    whoever imported optuna first, which capfd does not see."""
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(f"{record.name}: {record.getMessage()}")
    logging.getLogger("optuna").addHandler(handler)
    yield said
    logging.getLogger("optuna").removeHandler(handler)


def check_failed_uploads(study: optuna.Study, spec: str, err: str, said: list[str], reader: Path) -> None:
    """Every trial kept its value, recorded why its results are not in the store, and said so in one line."""
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "Traceback" not in err and said == [], (err, said)      # Backoff's logged retries are silenced
    assert len(warnings) == len(study.trials), err
    for trial, line in zip(study.trials, warnings):
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value > 0
        assert FILES_ATTR not in trial.user_attrs and spec in trial.user_attrs[MISSING_ATTR]
        assert line == (f"warning: study {study.study_name}, trial {trial.number}: its value is kept, but only "
                        f"{trial.user_attrs[MISSING_ATTR]}")
        assert re.match(r"0 of \d+ files reached the artifact store", trial.user_attrs[MISSING_ATTR])
        # the upload gave up quickly: from the end of training (eval.json) to the trial's end
        trained = Path(trial.user_attrs["run_dir"], "eval.json").stat().st_mtime
        assert trial.datetime_complete.timestamp() - trained < 12
    assert artifacts.results_at(study.trials[0]) == "here"
    shutil.rmtree(study.trials[0].user_attrs["run_dir"])    # another machine, then: the record says why
    error = one_line_error(lambda: trial_run(study, 0, root=reader))
    assert error == f"trial 0 of study {study.study_name} is not in the artifact store: " \
                    f"{study.trials[0].user_attrs[MISSING_ATTR]}"


def test_a_folder_store_that_fails_mid_study_keeps_every_trial(tmp_path, capfd, optuna_log):
    store = tmp_path / "store"

    def break_store() -> None:      # the shared folder replaced by a file: every write now fails
        shutil.rmtree(store)
        store.write_text("not a folder")

    watcher = when_the_first_trial_starts(tmp_path / "worker" / "saves" / "studies" / "fails", break_store)
    study = build_study(tmp_path, "fails", str(store))
    watcher.join(1)
    check_failed_uploads(study, str(store), capfd.readouterr().err, optuna_log, tmp_path / "reader")
    assert "Not a directory" in study.trials[0].user_attrs[MISSING_ATTR]


def test_an_s3_store_that_stops_mid_study_keeps_every_trial(tmp_path, s3, capfd, optuna_log):
    watcher = when_the_first_trial_starts(tmp_path / "worker" / "saves" / "studies" / "gone", s3.stop)
    study = build_study(tmp_path, "gone", f"s3://{S3_BUCKET}/p", trials=1, s3=s3)
    watcher.join(1)
    check_failed_uploads(study, f"s3://{S3_BUCKET}/p", capfd.readouterr().err, optuna_log, tmp_path / "reader")
    assert f"at {s3.endpoint}" in study.trials[0].user_attrs[MISSING_ATTR]


# -- tune --artifacts ------------------------------------------------------------------------------------
TINY = ["--epochs", "1", "--limit-train", "500", "--val-size", "500", "--batch-size", "100"]


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(SPACE))
    return path


def test_tune_refuses_a_store_it_cannot_write_before_anything_trains(cli, saves, tmp_path, s3, space):
    (tmp_path / "a-file").write_text("")
    cases = {"s3://no-such-bucket": "cannot write to the artifact store s3://no-such-bucket at "
                                    f"{s3.endpoint}: NoSuchBucket",
             str(tmp_path / "a-file"): f"cannot make the artifact store folder {tmp_path / 'a-file'}: File exists",
             "": "an artifact store is a folder or s3://BUCKET[/PREFIX], got an empty name",
             " ": "an artifact store is a folder or s3://BUCKET[/PREFIX], got an empty name",
             "ftp://x": "artifact store 'ftp://x': a store is a folder or s3://BUCKET[/PREFIX]",
             "s3://": "artifact store 's3://': name a bucket, s3://BUCKET[/PREFIX]"}
    for spec, message in cases.items():
        code, err, out = cli("tune", "--study", "refused", "--trials", 1, "--artifacts", spec, "--space", space, *TINY)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (spec, err)
        assert err.startswith(f"error: {message}"), (spec, err)
        assert not (saves / "studies").exists()
    assert not [key for key in s3.keys() if ".write-probe" in key]


def test_tune_artifacts_uploads_and_leaves_no_probe(cli, saves, s3, space):
    code, err, out = cli("tune", "--study", "cli", "--trials", "1", "--artifacts", f"s3://{S3_BUCKET}/cli/",
                         "--space", space, "--pruner", "none", *TINY, "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["artifacts"] == f"s3://{S3_BUCKET}/cli"
    trial = optuna.load_study(study_name="cli", storage=summary["storage"]).trials[0]
    ids = {f"cli/{artifact_id}" for artifact_id, _ in trial.user_attrs[FILES_ATTR].values()}
    # (moto's servers in one process share their buckets: this module's other studies are there too)
    assert {key for key in s3.keys() if key.startswith("cli/")} == ids
    assert not [key for key in s3.keys() if ".write-probe" in key]     # the start's write probe is removed


# -- the CLI on another machine ------------------------------------------------------------------------
def figures(text: str) -> int:
    """The report's figures, counted after its one copy of plotly.js (whose source names newPlot too)."""
    return count_figures(self_contained(text))


@pytest.mark.parametrize("stored", ["s3-prefix"], indirect=True)     # the commands share trial_run
def test_evaluate_export_and_report_open_a_trial_from_the_store(stored, cli, saves, tmp_path):
    study = stored.study()
    best = study.best_trial
    trial = ["--study", stored.name, "--trial", best.number, "--storage", stored.url]
    code, err, out = cli("evaluate", *trial)
    assert code == 0, err
    assert json.loads(out)["test_accuracy"] == best.user_attrs["test_accuracy"]
    folder = cache_dir(stored.name, best.number, saves)
    code, err, out = cli("export", *trial, "--format", "torchscript")
    assert (code, out.strip()) == (0, str(folder / "model.ts.pt")), err
    code, err, out = cli("report", *trial, "-o", tmp_path / "trial.html")
    assert code == 0, err
    text = (tmp_path / "trial.html").read_text()
    assert figures(text) == 5 and f"Run trial_{best.number}" in text
    shutil.rmtree(saves / "cache")          # the study's report downloads its best trial itself
    code, err, out = cli("report", "--study", stored.name, "--storage", stored.url)
    assert (code, out.strip()) == (0, str(saves / "studies" / stored.name / "report.html")), err
    text = Path(out.strip()).read_text()
    assert figures(text) == 6 + 5 and "cannot be opened here" not in text
    assert (folder / "eval.json").is_file()


def test_a_study_report_says_why_its_best_trial_cannot_be_opened(plain, cli, saves):
    code, err, out = cli("report", "--study", "plain", "--storage", plain.url)
    assert code == 0, err
    text = Path(out.strip()).read_text()
    assert figures(text) == 6 and "has no artifact store" in text


@pytest.mark.parametrize("command", ["evaluate", "export", "report"])
def test_a_run_and_a_trial_at_once_or_half_a_trial_is_one_line(command, cli, tmp_path):
    export = ["--format", "onnx"] if command == "export" else []
    cases = [(tmp_path, "--study", "s", "--trial", "0"), ("--trial", "0")]
    if command != "report":                 # a report of a whole study takes --study alone
        cases += [("--study", "s"), (tmp_path, "--study", "s")]
    for args in cases:
        code, err, out = cli(command, *args, *export)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (args, err)
        assert err.startswith("error: " + (ONE_OF if command != "report" else "name a run (its id or folder)")), err
