"""Run directories: create, find, list, read status and metrics, write atomically. No torch here:
reading a saves folder must not need the training stack.

    run = create_run(config)                 # saves/runs/20261123-153412-a1b2c3/ with config.json
    rows = list_runs()                       # one summary per run, newest first

A run directory holds config.json, metrics.jsonl (one JSON event per line), status.json, best.pt,
last.pt, final_state_dict.pth, eval.json and curves.svg; recorder.RunRecorder writes them during `fit`,
and checkpoints.py reads the .pt files back.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, from_dict

LIVE_STATES = ("queued", "running")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunError(ValueError):
    """A run id, path or checkpoint that cannot be used; the message says why."""


# -- paths -------------------------------------------------------------------------------------
def saves_root(root: str | Path | None = None) -> Path:
    """The saves root: `root` if given, else $LSTM_SAVES, else saves/ beside the lstm_core package."""
    chosen = root or os.environ.get("LSTM_SAVES") or Path(__file__).resolve().parent.parent / "saves"
    return Path(chosen).expanduser().resolve()


SAVES_FOLDERS = ("runs", "studies", "locks")   # what the saves root keeps: runs, tuning studies, device locks


def check_saves(root: str | Path | None = None, write: bool = True, below: tuple[str, ...] = SAVES_FOLDERS) -> Path:
    """The saves root, refused with one RunError naming the folder and the problem when it, or one of the
    folders `below` it that a command uses, is a file, or (`write`) when this process cannot create files
    in it. Commands call it before anything starts."""
    path = saves_root(root)
    if path.exists() and not path.is_dir():
        raise RunError(f"the saves folder {path} is a file, not a folder: point --saves (or $LSTM_SAVES) at a folder")
    for folder in (path / name for name in below):
        if folder.exists() and not folder.is_dir():
            raise RunError(f"{folder} is a file, not a folder: the saves folder {path} keeps its {folder.name} "
                           "there; move the file away, or choose another saves folder with --saves")
    if not write:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot write to the saves folder {path}: {exc.strerror or type(exc).__name__}"
                       ": choose another with --saves (or $LSTM_SAVES)") from None
    check_writable(path, "choose another with --saves (or $LSTM_SAVES)", "the saves folder ")
    for folder in (path / name for name in below):
        if folder.is_dir():        # a missing one is made in the saves root, which was just tried
            check_writable(folder, "make it writable, or choose another saves folder with --saves")
    return path


def check_writable(folder: Path, remedy: str, what: str = "") -> None:
    """Refuse, with one RunError naming `folder`, the cause and the `remedy`, a folder this process cannot
    create files in (read-only, full, or not a folder)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RunError(f"cannot write to {what}{folder}: {reason}: {remedy}") from None


def safe_name(name: str, what: str = "run id") -> str:
    """A user-given run id or study name, refused when it could reach outside its folder."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise RunError(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' only "
                       "(no '/', no '..', at most 128 characters)")
    return name


def runs_dir(root: str | Path | None = None) -> Path:
    return saves_root(root) / "runs"


def study_dir(study: str, root: str | Path | None = None) -> Path:
    """A tuning study's folder: its trials' run directories, workers.json, tune.log, space.json."""
    return saves_root(root) / "studies" / safe_name(study, "study name")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


# -- writing files -----------------------------------------------------------------------------
class WriteError(OSError):
    """A file the project writes could not be written (a full disk, a read-only folder); str() is one line
    naming the file and the cause: "no space left on device writing saves/runs/<id>/last.pt"."""

    def __str__(self) -> str:
        reason = self.strerror or "cannot write"
        return f"{reason[:1].lower()}{reason[1:]} writing {self.filename}"


def os_error_text(exc: OSError) -> str:
    """An OSError in one line for a person: a WriteError's words, else the cause and the path."""
    if isinstance(exc, WriteError):
        return str(exc)
    reason = exc.strerror or str(exc) or type(exc).__name__
    reason = reason[:1].lower() + reason[1:]
    return f"{reason}: {exc.filename}" if exc.filename else reason


def write_error(exc: OSError, path: Path) -> WriteError:
    """`exc` as a WriteError naming `path`: the OS names no file when a write() on an open file fails."""
    return WriteError(exc.errno, exc.strerror or str(exc), str(path))


def output_file(output: str | Path | None, default: Path) -> Path:
    """Where to write a file a person asked for with --output: `default` without one (its folder made when
    missing); a folder (one that exists, or any path ending in a separator, made when missing) gets default's
    name inside it. RunError for a file given as a folder, a missing folder, or a folder that cannot be made."""
    # Path() drops a trailing separator, which is how a person says "a folder" (`--output exports/`)
    folder = output is None or str(output).endswith(tuple(filter(None, (os.sep, os.altsep))))
    output = Path(default.parent if output is None else output)
    if output.exists() and not output.is_dir() and folder:
        raise RunError(f"cannot write into {output}: it is a file, not a folder")
    if output.is_dir() or folder:
        output = output / default.name
    if not output.parent.is_dir() and not folder:
        raise RunError(f"cannot write {output}: there is no folder {output.parent}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot make the folder {output.parent}: {exc.strerror or type(exc).__name__}") from None
    return output


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: readers see the
    old file or the new one, never a torn one. WriteError when it cannot be written."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise write_error(exc, path) from None
        raise


def strict_json(value: Any) -> Any:
    """`value` as strict JSON holds it: a non-finite float (a loss before any epoch: inf) as None, since
    JSON has no NaN or Infinity and strict parsers (JavaScript's, jq's) refuse the file; numpy and torch
    scalars as floats."""
    if isinstance(value, dict):
        return {key: strict_json(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    return strict_json(float(value))


def to_json(data: Any, **options: Any) -> str:
    """json.dumps of strict_json(data): what every JSON file and line the project writes holds."""
    return json.dumps(strict_json(data), allow_nan=False, **options)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (to_json(data, indent=2) + "\n").encode())


def append_jsonl(path: Path, *records: dict) -> None:
    """Append one JSON line per record. A failed write (a full disk) is cut off again, so that the file never
    ends in a torn line; WriteError says which file and why."""
    data = memoryview("".join(to_json(record) + "\n" for record in records).encode())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise write_error(exc, path) from None
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            os.ftruncate(fd, size)      # what a short write left of the line goes, and gives its space back
            raise
    except OSError as exc:
        raise write_error(exc, path) from None
    finally:
        os.close(fd)


def overwrite(path: Path, data: bytes) -> None:
    """Rewrite a small existing file in place, within the disk blocks it already has: what still works on a
    full disk, where atomic_write_bytes needs room for a second copy. A reader may see it half-written."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_error(exc, path) from None


def repair_jsonl(path: Path) -> None:
    """Cut a torn last line (a writer killed mid-line) off a JSON-lines file, so that the next append starts
    a line of its own instead of gluing onto it."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(max(0, size - 2**20))
            tail = f.read()
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
    except FileNotFoundError:
        pass


def read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON line; a torn or corrupt line (a killed writer) is skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file's value, or `default` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def read_json_object(path: Path) -> dict:
    value = read_json(path, {})
    return value if isinstance(value, dict) else {}


def json_problem(path: Path) -> tuple[Any, str | None]:
    """A JSON file's value and None, or None and why it cannot be read, in a few words that start with the
    file's name: "config.json: not JSON (line 1 column 7)"."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes()), None
    except FileNotFoundError:
        return None, f"{path.name}: missing"
    except OSError as exc:
        return None, f"{path.name}: {exc.strerror or type(exc).__name__}"
    except UnicodeDecodeError:
        return None, f"{path.name}: not text"
    except json.JSONDecodeError as exc:
        return None, f"{path.name}: not JSON (line {exc.lineno} column {exc.colno})"
    except RecursionError:
        return None, f"{path.name}: nested too deeply"


def read_config(path: Path) -> tuple[TrainConfig | None, str | None]:
    """A run's config.json as a TrainConfig and None, or None and why it is not one (json_problem's words)."""
    path = Path(path)
    data, problem = json_problem(path)
    if problem:
        return None, problem
    try:
        return from_dict(data), None
    except ConfigError as exc:
        return None, f"{path.name}: {exc}"


# -- processes ---------------------------------------------------------------------------------
try:
    import fcntl
except ImportError:  # Windows: no advisory locks; try_lock always succeeds and held_lock holds nothing
    fcntl = None


def try_lock(handle, shared: bool = False) -> bool:
    """Take an advisory lock on an open file without waiting; whether it was taken. Released by unlock or
    when the file is closed (the process dying included)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unlock(handle) -> None:
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def held_lock(path: Path):
    """An exclusive lock on the file `path` (created if missing) for the block, waited for."""
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            unlock(handle)


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a live run from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def process_alive(pid: int | None, start_time: str | None = None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user: the start time below still tells a reused pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "Z":  # exited, waiting for its parent to reap it
            return False
    except OSError:
        return True  # no /proc (macOS): os.kill said it exists
    return start_time is None or process_start_time(pid) == start_time


# -- the run directory -------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.json")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    eval_path = property(lambda self: self.path / "eval.json")
    best_path = property(lambda self: self.path / "best.pt")
    last_path = property(lambda self: self.path / "last.pt")
    final_path = property(lambda self: self.path / "final_state_dict.pth")
    plot_path = property(lambda self: self.path / "curves.svg")
    environment_path = property(lambda self: self.path / "environment.json")

    def config(self) -> TrainConfig:
        config, problem = read_config(self.config_path)
        if problem:
            raise RunError(f"run {self.id} is damaged: {problem}")
        return config

    def damage(self) -> str | None:
        """Why this run folder cannot be used as a run, for a person ("config.json: not JSON (line 1 column
        7)"), or None when its config and status read back."""
        problem = read_config(self.config_path)[1]
        if problem is None and self.status_path.exists():
            status, problem = json_problem(self.status_path)
            if problem is None and not isinstance(status, dict):
                problem = "status.json: not a JSON object"
        return problem

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def epochs(self) -> list[dict]:
        return [r for r in self.metrics() if r.get("event") == "epoch"]

    def eval(self) -> dict | None:
        return read_json(self.eval_path)

    def environment(self) -> dict:
        """Where and with what the run trained (devices.environment); {} for a run from before it was recorded."""
        return read_json_object(self.environment_path)

    def status(self) -> dict:
        """status.json, with a live state whose process is gone turned into `interrupted` (and saved)."""
        status = read_json_object(self.status_path)
        if status.get("state") in LIVE_STATES and status.get("host", socket.gethostname()) == socket.gethostname():
            if status.get("pid") and not process_alive(status["pid"], status.get("pid_start")):
                status = {**status, "state": "interrupted", "ended_at": status.get("heartbeat_at"),
                          "error": "the training process ended without finishing (killed or crashed)"}
                try:
                    atomic_write_json(self.status_path, status)
                except OSError:
                    pass  # a read-only saves root: still report it as interrupted
        return status

    def write_status(self, **changes: Any) -> dict:
        status = {**read_json_object(self.status_path), **changes}
        try:
            atomic_write_json(self.status_path, status)
        except WriteError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.status_path.is_file():
                raise
            # a full disk: the state must still say what happened to the run (failed, and why), and the old
            # file's blocks hold the new one
            overwrite(self.status_path, (to_json(status, indent=2) + "\n").encode())
        return status


def create_run(config: TrainConfig, root: str | Path | None = None, path: str | Path | None = None,
               state: str = "queued") -> Run:
    """A new run directory with config.json and status.json (state `queued`, this process's pid)."""
    if path is None:
        base = runs_dir(root)
        base.mkdir(parents=True, exist_ok=True)
        path = base / new_run_id()
    run = Run(Path(path))
    run.path.mkdir(parents=True, exist_ok=False)
    try:
        atomic_write_json(run.config_path, config.to_dict())
        pid = os.getpid()
        run.write_status(state=state, pid=pid, pid_start=process_start_time(pid), host=socket.gethostname(),
                         created_at=time.time(), started_at=None, ended_at=None, heartbeat_at=time.time(),
                         device=None, error=None)
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)     # not a half-made run for the lists to show
        raise
    return run


def open_run(run_id: str, root: str | Path | None = None) -> Run:
    """A run by id, inside the saves root's runs/ (an id with '/' or '..' is refused)."""
    run = Run(runs_dir(root) / safe_name(str(run_id)))
    if run.path.exists() and not run.path.is_dir():
        raise RunError(f"{run.path} is a file, not a run folder")
    if not run.config_path.exists():
        raise RunError(f"no run {str(run_id)!r} in {runs_dir(root)}")
    return run


def run_at(path: str | Path) -> Run:
    """A run directory named by the operator (the CLI), wherever it is."""
    run = Run(Path(path).resolve())
    if not run.config_path.exists():
        raise RunError(f"{run.path} is not a run directory (no config.json)")
    return run


def list_runs(root: str | Path | None = None) -> list[dict]:
    """One summary per run directory, newest first: id, state, arch and key hyperparameters,
    best validation accuracy, test accuracy, duration and device."""
    base = runs_dir(root)
    if not base.is_dir():
        return []
    out = []
    for path in base.iterdir():
        if path.is_dir() and (path / "config.json").exists():
            out.append(summarize(Run(path)))
    when = lambda r: r["created_at"] if isinstance(r["created_at"], (int, float)) else 0.0  # noqa: E731
    return sorted(out, key=lambda r: (when(r), r["id"]), reverse=True)


TRIAL_FOLDERS = ("studies", "cache")   # trials run here, and trials of other machines downloaded from a store


def list_trials(root: str | Path | None = None) -> list[dict]:
    """The run directories of every tuning trial, as run summaries whose id is "<study>/trial_<n>": those run
    here (SAVES/studies/<study>/trial_<n>/), then those downloaded from an artifact store
    (SAVES/cache/<study>/trial_<n>/, artifacts.trial_run) that did not run here."""
    rows, seen = [], set()
    for folder in TRIAL_FOLDERS:
        base = saves_root(root) / folder
        for path in sorted(base.glob("*/trial_*")) if base.is_dir() else []:
            trial_id = f"{path.parent.name}/{path.name}"
            if trial_id not in seen and (path / "config.json").exists():
                seen.add(trial_id)
                rows.append({**summarize(Run(path)), "id": trial_id, "kind": "trial"})
    return rows


def list_models(root: str | Path | None = None) -> list[dict]:
    """Every run and tuning trial with a usable best.pt (finished, or stopped by the user), best
    validation accuracy first: what the Draw page can predict with."""
    rows = [{**r, "kind": "run"} for r in list_runs(root)] + list_trials(root)
    # a cancelled run counts once it has finished an epoch (before that its weights are barely trained); a
    # damaged run's weights may load, but nothing it shows about them can be trusted
    usable = [r for r in rows if (r["state"] == "completed" or (r["state"] == "cancelled" and r["epochs_done"]))
              and not r["damaged"] and (Path(r["path"]) / "best.pt").exists()]
    return sorted(usable, key=lambda r: -(r["best_val_accuracy"] or 0.0))


def format_seconds(s: float) -> str:
    """A duration as m:ss, or h:mm:ss from an hour on."""
    s = max(int(s), 0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def cell_name(row: dict) -> str:
    """A recurrent run's cell as people write it: "LSTM", "BiGRU", "IRNN" (a config without a cell is an
    LSTM's, the field's default)."""
    return ("Bi" if row.get("bidirectional") else "") + (row.get("cell") or "lstm").upper()


def describe_model(row: dict) -> str:
    """A run's model in a few words: "LSTM 1x128, rows", "BiGRU 2x128, rows", "CNN"; for a damaged run, why
    there is none to describe: "damaged: config.json: not JSON (line 1 column 7)"."""
    if row.get("damaged"):
        return f"damaged: {row['damaged']}"
    if row.get("arch") == "cnn":
        return "CNN"
    return f"{cell_name(row)} {row.get('num_layers')}x{row.get('hidden_size')}, {row.get('seq_mode')}"


def summarize(run: Run) -> dict:
    """A run's row in list_runs; `damaged` says why its folder cannot be used (Run.damage), its config's
    columns then None rather than whatever the broken file holds."""
    status = run.status()
    damaged = run.damage()
    cfg = {} if damaged else read_json_object(run.config_path)
    epochs = run.epochs()
    evaluation = read_json_object(run.eval_path)
    started, ended = status.get("started_at"), status.get("ended_at") or status.get("heartbeat_at")
    return {
        "id": run.id, "path": str(run.path), "state": status.get("state", "unknown"),
        "arch": cfg.get("arch"), "cell": cfg.get("cell", "lstm") if cfg else None, "seq_mode": cfg.get("seq_mode"),
        "hidden_size": cfg.get("hidden_size"),
        "num_layers": cfg.get("num_layers"), "bidirectional": cfg.get("bidirectional"),
        "optimizer": cfg.get("optimizer"), "lr": cfg.get("lr"), "batch_size": cfg.get("batch_size"),
        "epochs_done": len(epochs), "epochs": cfg.get("epochs"),
        "best_val_accuracy": max((e["val_accuracy"] for e in epochs if isinstance(e.get("val_accuracy"), (int, float))),
                                 default=None),
        "test_accuracy": evaluation.get("test_accuracy"), "macro_f1": evaluation.get("macro_f1"),
        "duration_s": (ended - started) if started and ended else None,
        "device": status.get("device"), "created_at": status.get("created_at"), "damaged": damaged,
    }
