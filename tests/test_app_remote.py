"""The pages over another machine's study (AppTest): its worker uploaded each trial's results to an artifact
store and left, so only the study's storage and the store are shared with this machine, whose saves root is
empty. The Tuning page's trial inspector and the Evaluate and Draw pages' "Open a trial of a study" download
a trial into SAVES/cache/ and show it; a trial whose upload failed, a store that does not hold the study and
a storage that cannot be opened each say why in one line."""
import errno
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore
from streamlit.testing.v1 import AppTest

from conftest import REPO, tiny_config
from lstm_core import artifacts
from lstm_core.artifacts import FILES_ATTR, MISSING_ATTR
from lstm_core.runs import Run
from lstm_core.tune import run_worker
from test_app_draw import png, shown_prediction, upload
from test_app_tuning import charts, trial_heatmap

ENTRY = str(REPO / "streamlit_app.py")
PAGES = {name: str(REPO / "pages" / f"{name}.py") for name in ("tuning", "evaluate", "draw")}
SPACE = {"hidden_size": {"type": "int", "low": 8, "high": 32}}
STUDY = "far"


@dataclass
class Remote:
    """The shared parts of a study whose worker's machine left: its storage `url` and its store."""
    url: str
    store: Path

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=STUDY, storage=self.url)

    def stored(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.study().trials if t.user_attrs.get(FILES_ATTR)]

    def best(self) -> optuna.trial.FrozenTrial:
        """The best trial whose results reached the store: the one the pages open first."""
        return max(self.stored(), key=lambda t: t.value)

    def missing(self) -> optuna.trial.FrozenTrial:
        (trial,) = [t for t in self.study().trials if t.user_attrs.get(MISSING_ATTR)]
        return trial


def refused_write(self, artifact_id, content_body):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def remote(tmp_path_factory, mnist) -> Remote:
    """Two trials uploaded to a folder store, then a third whose upload failed (the store's disk full), run
    by a worker whose saves root is then renamed away."""
    base = tmp_path_factory.mktemp("remote")
    url, store, worker = f"sqlite:///{base / 'db.sqlite'}", base / "store", base / "worker" / "saves"
    config = tiny_config(limit_train=1000, val_size=500, batch_size=100)
    run_worker(STUDY, 2, config, url, SPACE, pruner="none", root=worker, seed=0, artifacts=str(store))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FileSystemArtifactStore, "write", refused_write)
        mp.setattr(artifacts, "RETRIES", {"max_retries": 1, "min_delay": 0.01, "max_delay": 0.02})
        run_worker(STUDY, 3, config, url, SPACE, pruner="none", root=worker, seed=1, artifacts=str(store))
    (base / "worker").rename(base / "gone")         # the worker's machine left: its folders are not here
    remote = Remote(url, store)
    assert len(remote.stored()) == 2 and "No space left on device" in remote.missing().user_attrs[MISSING_ATTR]
    return remote


def check(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def one_error(at: AppTest) -> str:
    """The page's only error, which must be one line."""
    (error,) = at.error
    assert len(error.value.splitlines()) == 1 and "Traceback" not in error.value, error.value
    return error.value


def tuning(remote: Remote, store: str = "") -> AppTest:
    """The Tuning page (of the whole app, so that its buttons can switch pages) on the remote study."""
    at = check(AppTest.from_file(ENTRY, default_timeout=120).run())
    at.switch_page("pages/tuning.py").run()
    at.text_input(key="tune_storage").set_value(remote.url)
    at.text_input(key="tune_artifacts").set_value(store).run()
    assert check(at).selectbox(key="tune_study").value == STUDY
    return at


def open_trial(at: AppTest, prefix: str, remote: Remote, number: int, store: str = "") -> AppTest:
    """Open trial `number` through the page's "Open a trial of a study" expander."""
    at.session_state[f"{prefix}_opener"] = True          # the expander, opened
    at.run()
    at.text_input(key=f"{prefix}_open_storage").set_value(remote.url).run()
    at.selectbox(key=f"{prefix}_open_study").set_value(STUDY)
    at.selectbox(key=f"{prefix}_open_trial").set_value(number)
    at.text_input(key=f"{prefix}_open_store").set_value(store).run()
    (button,) = [b for b in check(at).button if b.label == "Open"]
    return check(button.click().run())


def cached(saves: Path, number: int) -> Run:
    return Run(saves / "cache" / STUDY / f"trial_{number}")


# -- the Tuning page ---------------------------------------------------------------------------------
def test_the_tuning_page_shows_the_best_trial_downloaded_from_the_store(remote, saves):
    at = tuning(remote)
    best = remote.best()
    picker = at.selectbox(key="tune_trial")
    assert picker.value == best.number and len(picker.options) == 3       # the missing one too, saying so
    assert any(o.endswith("· in the artifact store") for o in picker.options)
    assert any(o.endswith("· results missing") for o in picker.options)
    assert cached(saves, best.number).eval_path.is_file()                # downloaded once, into the cache
    evaluation = cached(saves, best.number).eval()
    assert trial_heatmap(at) == evaluation["confusion_matrix"] and not at.error
    assert f"{best.user_attrs['test_accuracy']:.2%}" in [m.value for m in at.metric]
    figures = {c.proto.id.rsplit("-", 1)[-1]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    epochs = cached(saves, best.number).epochs()
    assert [len(d["x"]) for d in figures["tune_trial_curves"]["data"][:2]] == [len(epochs)] * 2
    recorded = [r for r in cached(saves, best.number).metrics() if r.get("event") == "batch" and "grad_norm" in r]
    assert figures["tune_trial_gradients"]["data"][0]["y"] == [r["grad_norm"] for r in recorded]
    assert "tune_trial_steps" in figures


def test_open_in_evaluate_shows_the_trial_there(remote, saves):
    at = tuning(remote)
    best = remote.best()
    (button,) = [b for b in at.button if b.label == "Open in Evaluate page"]
    check(button.click().run())
    assert [t.value for t in at.title] == ["Evaluate"]
    assert at.selectbox(key="eval_run").value == f"{STUDY}/trial_{best.number}"
    assert at.session_state["eval_values"]["eval_run"] == f"{STUDY}/trial_{best.number}"   # kept on page switches
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["test accuracy"] == f"{best.user_attrs['test_accuracy']:.2%}"


def test_a_trial_whose_upload_failed_says_why_and_the_page_goes_on(remote, saves):
    at = tuning(remote)
    missing = remote.missing()
    at.selectbox(key="tune_trial").set_value(missing.number).run()
    error = one_error(check(at))
    assert error.startswith(f"trial {missing.number} of study {STUDY} is not in the artifact store: ")
    assert "No space left on device" in error
    assert "Optimization History Plot" in charts(at)                     # the study's view stays
    assert not (saves / "cache" / STUDY / f"trial_{missing.number}").exists()


def test_a_store_field_naming_an_empty_folder_says_the_trial_is_not_there(remote, saves, tmp_path):
    empty = tmp_path / "empty-store"
    empty.mkdir()
    at = tuning(remote, store=str(empty))
    error = one_error(at)
    assert f"trial {remote.best().number} of study {STUDY}" in error and str(empty) in error
    assert not (saves / "cache" / STUDY / f"trial_{remote.best().number}").exists()
    assert at.session_state["tune_values"]["tune_artifacts"] == str(empty)   # remembered across page switches


# -- the Evaluate and Draw pages' opener --------------------------------------------------------------
def test_the_evaluate_page_opens_a_trial_of_a_study(remote, saves):
    at = check(AppTest.from_file(PAGES["evaluate"], default_timeout=120).run())
    assert "No evaluated run yet" in at.info[0].value and not at.text_input     # opener closed: nothing read
    other = min(remote.stored(), key=lambda t: t.value)
    open_trial(at, "eval", remote, other.number)
    assert at.selectbox(key="eval_run").value == f"{STUDY}/trial_{other.number}" and not at.error
    figures = {c.proto.id.rsplit("-", 1)[-1]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    assert figures["eval_cm"]["data"][0]["z"] == cached(saves, other.number).eval()["confusion_matrix"]
    assert f"{other.user_attrs['test_accuracy']:.2%}" in [m.value for m in at.metric]


def test_the_evaluate_opener_says_what_is_wrong_in_one_line(remote, saves, tmp_path):
    at = check(AppTest.from_file(PAGES["evaluate"], default_timeout=120).run())
    at.session_state["eval_opener"] = True
    at.run()
    assert at.text_input(key="eval_open_storage").value == f"sqlite:///{saves / 'optuna.db'}"   # the default
    assert "No studies in this storage." in [i.value for i in at.info]
    at.text_input(key="eval_open_storage").set_value("nonsense://nowhere").run()
    assert "cannot open the study storage 'nonsense://nowhere'" in one_error(check(at))
    missing = remote.missing()
    open_trial(at, "eval", remote, missing.number)
    assert "is not in the artifact store" in one_error(at) and "eval_run" not in at.session_state
    open_trial(at, "eval", remote, remote.best().number, store=str(tmp_path / "nowhere"))
    assert "no such folder" in one_error(at)


def test_the_draw_page_opens_a_trial_and_predicts_with_its_model(remote, saves, mnist):
    at = check(AppTest.from_file(PAGES["draw"], default_timeout=120).run())
    assert any("No trained model yet" in i.value for i in at.info)
    best = remote.best()
    open_trial(at, "draw", remote, best.number)
    trial = f"{STUDY}/trial_{best.number}"
    assert at.selectbox(key="draw_model").value == trial and not at.error
    upload(at, "seven.png", png(mnist.test_images[0]))
    digit, probabilities = shown_prediction(at)
    assert int(np.argmax(probabilities)) == digit and sum(probabilities) == pytest.approx(1, abs=1e-4)
