"""Opening a tuning trial on this machine: from its own folder where it ran here, else downloaded once from
the study's artifact store into SAVES/cache/ (lstm_core.artifacts.trial_run), where the Evaluate and Draw
pages list it beside the runs.

    run = open_trial(study, 3, store)            # a Run, or None after saying in one line why not
    trial_opener("eval", pick_on_evaluate)       # the pages' "Open a trial of a study" expander
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import streamlit as st

from lstm_core.artifacts import trial_run
from lstm_core.config import ConfigError
from lstm_core.runs import Run, RunError, saves_root
from lstm_core.storage import default_storage
from app.pagekit import storage_at
from app.studyview import (evaluated_trials, first_trial, load_study, storage_studies, study_labels, trial_id,
                           trial_label)

if TYPE_CHECKING:
    import optuna

STORAGE_HELP = "any Optuna storage URL, e.g. sqlite:///path/optuna.db or postgresql+psycopg2://user@host/db"
STORE_HELP = ("A folder, or s3://BUCKET[/PREFIX] with the endpoint and credentials of boto3's configuration "
              "(AWS_ENDPOINT_URL, AWS_PROFILE, ...). Left empty, trials open from the store their study records: "
              "name one here where this machine reaches that store another way.")


def open_trial(study: optuna.Study, number: int, store: str = "") -> Run | None:
    """Trial `number`'s run folder (artifacts.trial_run; `store` "" for the one the study records), or None
    after saying in one line why it cannot be opened. Its first opening on this machine downloads it."""
    try:
        with st.spinner(f"Opening trial {number} of study {study.study_name}…"):
            return trial_run(study, number, store.strip() or None)
    except RunError as exc:
        st.error(str(exc))
        return None


def trial_opener(prefix: str, pick: Callable[[str], str | None]) -> None:
    """"Open a trial of a study": an expander, closed at first, whose storage, study, trial and artifact store
    fields open a trial here (open_trial) and hand its list id ("<study>/trial_<n>") to `pick`, which selects
    it on the page (or returns why it cannot); the page then reruns, listing it. Widget keys start with
    `prefix`. The storage is read only while the expander is open: a remote database answers slowly."""
    box = st.expander("Open a trial of a study", key=f"{prefix}_opener", on_change="rerun",
                      icon=":material/cloud_download:")
    if box.open:
        with box:
            opener_fields(prefix, pick)


def opener_fields(prefix: str, pick: Callable[[str], str | None]) -> None:
    # the Tuning page's storage first: the one whose studies this user looked at last
    st.session_state.setdefault(f"{prefix}_open_storage",
                                st.session_state.get("tune_values", {}).get("tune_storage") or default_storage())
    where, store_field = st.columns([3, 2])
    url = where.text_input("Study storage", key=f"{prefix}_open_storage", help=STORAGE_HELP)
    store = store_field.text_input("Artifact store", key=f"{prefix}_open_store",
                                   help=f"Where a trial that did not run here is downloaded from. {STORE_HELP}")
    try:
        labels = study_labels(storage_studies(url), [])
    except ConfigError as exc:
        st.error(str(exc))
        return
    if not labels:
        st.info("No studies in this storage.")
        return
    which, trial_field = st.columns(2)
    name = which.selectbox("Study", list(labels), key=f"{prefix}_open_study", format_func=labels.get)
    try:
        study, _ = load_study(storage_at(url), name)
    except Exception as exc:  # noqa: BLE001 - a storage that went away since it listed its studies
        st.error(f"Cannot read study {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return
    trials = evaluated_trials(study) if study is not None else {}
    if not trials:
        st.info(f"Study {name} has no trial with a test evaluation to open yet.")
        return
    key = f"{prefix}_open_trial"
    if st.session_state.get(key) not in trials:          # none yet, or another study's
        st.session_state[key] = first_trial(trials)
    number = trial_field.selectbox("Trial", list(trials), key=key, format_func=lambda n: trial_label(trials[n]))
    if not st.button("Open", key=f"{prefix}_open", icon=":material/download:",
                     help="downloads the trial from the artifact store the first time, unless it ran here"):
        return
    run = open_trial(study, number, store)
    if run is None:
        return
    listed = trial_id(run.path)
    refused = pick(listed) if listed else (
        f"Trial {number} of study {name} is in {run.path}, outside this app's saves folder {saves_root()}: "
        "only the trials under it are listed here")
    if refused:
        st.error(refused)
        return
    st.rerun()
