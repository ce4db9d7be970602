"""Optuna storages, without torch: the URLs a study can live at, opening one, and checking it can be written.
The tuning code (tune.py), the Tuning page and `make dashboard` (dashboard.py, which then starts in a
moment rather than after importing torch) all open storages here.

    url = default_storage()                      # sqlite:///SAVES/optuna.db
    storage = make_storage("journal:/shared/studies/lstm.log")
    check_writable(storage, url)                 # ConfigError: one line naming the file or URL
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

import optuna

from .config import ConfigError
from .runs import held_lock, saves_root

HEARTBEAT_SECONDS = 10        # a worker killed mid-trial has that trial failed by the others after ~2x this
JOURNAL = "journal:"          # journal:PATH, Optuna's journal file: shared by machines on one filesystem


def default_storage(root: str | Path | None = None) -> str:
    return f"sqlite:///{saves_root(root) / 'optuna.db'}"


def journal_path(url: str) -> Path | None:
    """The file of a journal:PATH storage URL, else None."""
    return Path(url[len(JOURNAL):]).expanduser() if url.startswith(JOURNAL) else None


def make_storage(url: str, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """The storage a URL names: journal:PATH is Optuna's journal file (no database server; machines share
    it on one filesystem), anything else a database URL for an RDB storage with heartbeats: a trial whose
    worker died is marked FAIL and retried once. Several commands may open a fresh database at the same
    moment: each one's first use creates the tables, so the creation takes turns (a file lock for SQLite,
    a few tries for a database server)."""
    journal = journal_path(url)
    if journal is not None:
        if not journal.parent.is_dir():
            raise ConfigError(f"cannot open the study storage {url!r}: the folder {journal.parent} does not exist")
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if url.startswith("sqlite:") else {}
    try:
        with warnings.catch_warnings():       # heartbeats are "experimental" in Optuna since 2.x: not news
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat:
                kwargs.update(heartbeat_interval=HEARTBEAT_SECONDS, grace_period=2 * HEARTBEAT_SECONDS)
                if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):   # Optuna >= 4.9's names
                    kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(1)
                else:
                    kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=1)
            with setup_lock(url):
                for attempt in range(5):
                    try:
                        return optuna.storages.RDBStorage(url, **kwargs)
                    except Exception as exc:  # noqa: BLE001 - another process created the tables first
                        if attempt == 4 or not any(s in str(exc) for s in CREATION_RACES):
                            raise
                        time.sleep(0.2 * (attempt + 1))
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds for a bad or unreachable URL
        if isinstance(exc, ImportError) and isinstance(exc.__cause__, ImportError):   # optuna hides which one
            reason = f"the URL's database driver is not installed ({exc.__cause__})"
        else:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        raise ConfigError(f"cannot open the study storage {url!r}: {reason}") from None


CREATION_RACES = ("already exists", "UNIQUE constraint failed", "duplicate key", "database is locked")


@contextlib.contextmanager
def setup_lock(url: str):
    """Hold a file lock beside a SQLite file while its tables are made (nothing for other URLs)."""
    path = sqlite_path(url)
    if path is None or not path.parent.is_dir():
        yield
        return
    with held_lock(path.with_name(path.name + ".lock")):
        yield


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (also a file: URI's), else None."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?")[0]
    return Path(path[len("file:"):] if path.startswith("file:") else path) if path else None


def check_writable(storage: optuna.storages.BaseStorage, url: str) -> None:
    """Refuse, with one line naming the file or URL, a storage this process can read but not write: a study
    there would fail in its first trial with a misleading error."""
    journal = journal_path(url)
    if journal is not None:
        if not os.access(journal if journal.exists() else journal.parent, os.W_OK):
            raise ConfigError(f"cannot write the study storage file {journal}: permission denied (check the "
                              "permissions of the file and its folder)")
        return
    engine = getattr(storage, "engine", None)
    if engine is None:
        return
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS lstm_studio_write_probe (x INTEGER)")
            connection.exec_driver_sql("DROP TABLE lstm_studio_write_probe")
    except Exception as exc:  # noqa: BLE001 - each driver words a refused write its own way
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
        path = sqlite_path(url)
        where = f"file {path}" if path else repr(url)
        raise ConfigError(f"cannot write the study storage {where}: {reason} (check the permissions of the "
                          f"{'file and its folder' if path else 'database user'})") from None
