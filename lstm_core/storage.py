"""Optuna storages, without torch: the URLs a study can live at, opening one, and checking it can be written.
The tuning code (tune.py), the Tuning page and `make dashboard` (dashboard.py, which then starts in a
moment rather than after importing torch) all open storages here.

    url = default_storage()                      # sqlite:///SAVES/optuna.db
    storage = make_storage("journal:/shared/studies/lstm.log")   # ConfigError: a damaged journal, ...
    check_writable(storage, url)                 # ConfigError: one line naming the file or URL
    backup = repair_journal(url)                 # a journal's torn last line cut, the file kept in backup
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
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
        check_journal(journal, url)
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
        # What a write does, tried rather than asked of os.access (which says yes to root whatever the
        # permissions): open the file to append, and make its lock, a symlink, beside it.
        try:
            with open(journal, "ab"):
                pass
            probe = journal.with_name(f"{journal.name}.{os.getpid()}.probe")
            os.symlink(journal.name, probe)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"cannot write the study storage file {journal}: {exc.strerror or exc} (check "
                              "the permissions of the file and its folder)") from None
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


# -- journal files ---------------------------------------------------------------------------------
# Optuna's journal is one JSON object per line, each opening with its op_code. Optuna reads a damaged file
# wrongly rather than refusing it: a line of garbage at the end is skipped and the next write appended
# after it, and a torn last line (a writer killed, or a disk full, mid-write) is glued to the next record
# written, which then breaks the whole file. So every opener checks the file first and leaves it as it is.
RECORD_START = b'{"op_code":'
TORN_RECHECK_SECONDS = 0.2      # a record being appended can look torn for a moment: look once more


def check_journal(path: Path, url: str) -> None:
    """Refuse, with one line saying what to do, a journal:PATH file that is a folder, holds something other
    than Optuna's journal records, or ends in a torn line (repair_journal cuts that one)."""
    if path.is_dir():
        raise ConfigError(f"cannot open the study storage {url!r}: {path} is a folder, not a journal file (name a "
                          f"file in it, e.g. {JOURNAL}{path / 'studies.log'})")
    number, offset, damage = scan_journal(path)
    if damage == "torn":
        time.sleep(TORN_RECHECK_SECONDS)
        number, offset, damage = scan_journal(path, offset, number)
    if damage:
        raise journal_refusal(url, path, number, damage)


def journal_refusal(url: str, path: Path, number: int, damage: str) -> ConfigError:
    if damage == "torn":
        return ConfigError(f"cannot open the study storage {url!r}: its last line (line {number}) is cut short, as "
                           "a writer killed mid-write leaves it: add --repair-journal to `python -m lstm_core tune` "
                           "or to the dashboard to cut that line (the file is copied to a .bak beside it first)")
    return ConfigError(f"cannot open the study storage {url!r}: line {number} of {path} is not an Optuna journal "
                       "record, so the file is not a study journal or is damaged beyond a torn last line; it was "
                       "left as it is: name another file, or restore this one from a backup")


def scan_journal(path: Path, offset: int = 0, number: int = 1) -> tuple[int, int, str | None]:
    """Read a journal file from byte `offset` (line `number`): (the number and offset of its first bad line,
    or of its end, and None, "torn" or "garbage"). A missing file is an empty journal."""
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            for line in file:
                if not line.endswith(b"\n"):
                    fragment = line.strip()   # torn: the start of a record, or a record's first bytes
                    torn = fragment and fragment[:len(RECORD_START)] == RECORD_START[:len(fragment)]
                    return number, offset, "torn" if torn else "garbage"
                if not journal_record(line):
                    return number, offset, "garbage"
                number, offset = number + 1, offset + len(line)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read the study storage file {path}: {exc.strerror or exc}") from None
    return number, offset, None


def journal_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:          # not JSON, or not UTF-8
        return False
    return isinstance(record, dict) and isinstance(record.get("op_code"), int)


REPAIRED = "cut the torn last line of {journal}; the file as it was is kept in {backup}"   # what the CLIs say


def repair_journal(url: str) -> Path | None:
    """Cut the torn last line of a journal:PATH storage's file, after copying the whole file to PATH.bak
    (PATH.bak.1, ... when taken); the copy's path, or None when there is nothing to cut. A file that is not a
    journal is refused (ConfigError), never cut. Holds Optuna's own lock on the file meanwhile, so that no
    worker appends while it is cut (a lock a killed writer left is broken after Optuna's grace period)."""
    from optuna.storages.journal import JournalFileSymlinkLock

    path = journal_path(url)
    if path is None:
        raise ConfigError(f"--repair-journal repairs journal:PATH storages, not {url!r}")
    if not path.is_file():
        return None                 # nothing to cut: opening it says what is wrong, if anything
    lock = JournalFileSymlinkLock(str(path))
    try:
        lock.acquire()
    except OSError as exc:
        raise ConfigError(f"cannot repair the study storage file {path}: cannot lock it: "
                          f"{exc.strerror or exc}") from None
    try:
        number, offset, damage = scan_journal(path)
        if damage is None:
            return None
        if damage == "garbage":
            raise journal_refusal(url, path, number, damage)
        backup = free_name(path.with_name(path.name + ".bak"))
        try:
            shutil.copyfile(path, backup)
            with open(backup, "rb+") as copy:
                os.fsync(copy.fileno())     # the copy is on disk before anything is cut from the original
        except OSError as exc:
            backup.unlink(missing_ok=True)
            raise ConfigError(f"cannot repair the study storage file {path}: cannot write its copy {backup}: "
                              f"{exc.strerror or exc}; the file was left as it is") from None
        os.truncate(path, offset)
        return backup
    finally:
        lock.release()


def free_name(path: Path) -> Path:
    """`path`, or the first of path.1, path.2, ... that does not exist: a backup never replaces another."""
    number = 0
    while (candidate := path if number == 0 else path.with_name(f"{path.name}.{number}")).exists():
        number += 1
    return candidate
