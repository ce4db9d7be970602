"""What the pages show of runs, as data, and what they do to several at once: a model's label, a training
run's progress line and numbers, the run to show first, the table of runs, their curves and weights files,
deleting a selection.

    model_label(row)                    # 'LSTM 1x128, rows · test 98.9% · 20261123-153412-a1b2c3'
    state, line = run_progress(run_id)  # ('running', 'Training run `...`: epoch 2/15 done, ...')
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from lstm_core.config import ConfigError
from lstm_core.jobs import delete_run
from lstm_core.plots import epoch_at
from lstm_core.runs import (LIVE_STATES, Run, RunError, cell_name, describe_model, format_seconds, open_run,
                            run_at)


def model_label(row: dict) -> str:
    """What a model picker calls a run or trial (a row of runs.list_models): its model, accuracy and id."""
    # a run stopped before its test evaluation has only its validation accuracy
    if row["test_accuracy"] is not None:
        accuracy = f"test {row['test_accuracy']:.1%}"
    else:
        accuracy = f"val {row['best_val_accuracy'] or 0:.1%}"
    return f"{describe_model(row)} · {accuracy} · {row['id']}"


def evaluated_label(row: dict) -> str:
    """What a picker of evaluated runs and trials calls one (a row of runs.list_runs or list_trials); a
    damaged one says so, and why."""
    if row.get("damaged"):
        return f"{row['id']} · {describe_model(row)}"
    if row["test_accuracy"] is None:
        return row["id"]
    return f"{row['id']} · {'trial' if row.get('kind') == 'trial' else 'run'} · test {row['test_accuracy']:.2%}"


def run_progress(run_id: str) -> tuple[str, str]:
    """A training run's state, and a line saying how far it is (for a page waiting for its model);
    ("unknown", why) for a run that cannot be read."""
    try:
        run = open_run(run_id)
        status, epochs = run.status(), run.epochs()
        state = status.get("state", "unknown")
        total = run.config().epochs if state == "running" and epochs else None
    except (RunError, ConfigError, OSError) as exc:
        return "unknown", f"Cannot read run `{run_id}`: {exc}"
    if state == "queued":
        return state, f"Run `{run_id}` is queued: loading the data, or waiting for the CPU to be free."
    if state == "running":
        done = (f": epoch {epochs[-1]['epoch']}/{total} done, validation accuracy "
                f"{epochs[-1]['val_accuracy']:.1%}") if epochs else ": first epoch"
        return state, f"Training run `{run_id}`{done}. This page switches to it when it completes."
    return state, f"Run `{run_id}` ended {state}: {status.get('error') or 'see train.log in its folder'}."


def batch_progress(status: dict, batch: dict | None, epochs: list[dict], total: int) -> tuple[float, str]:
    """A live run's progress bar: the fraction done and its line, from status.json, the last batch
    record (None before the first) and the epoch records of metrics.jsonl; `total`: config.epochs."""
    if status.get("state") == "queued":
        waiting = status.get("waiting_for")
        return 0.0, f"queued{' behind run ' + waiting if waiting else ''}: loading data and waiting for the device"
    if batch is None:
        return 0.0, "starting: loading data"
    fraction = batch["step"] / batch["steps"]
    if epochs and epochs[-1]["time"] > batch["time"]:      # an epoch just ended: show its end
        fraction = len(epochs) / total
    return min(fraction, 1.0), (f"epoch {batch['epoch']}/{total} · batch {batch['batch']}/{batch['batches']}"
                                f" · ETA {format_seconds(batch['eta'])} · {batch['samples_per_s']:,.0f} samples/s"
                                f" · lr {batch['lr']:.2e}")


def ended_note(status: dict) -> tuple[str, str] | None:
    """(level, line) saying how a run that did not complete ended: "error" for a failure, "warning" for a
    process that died; None for any other state."""
    if status.get("state") == "failed":
        return "error", f"Training failed: {status.get('error')}"
    if status.get("state") == "interrupted":
        return "warning", ("The training process ended without finishing: "
                           f"{status.get('error') or 'killed or crashed'}. Its last checkpoint is kept.")
    return None


def default_run(runs: list[dict], chosen: str | None) -> str | None:
    """The run to show (runs: list_runs()): `chosen` while it exists, else the newest live run, else the
    newest run."""
    ids = [r["id"] for r in runs]
    if chosen in ids:
        return chosen
    live = [r["id"] for r in runs if r["state"] in LIVE_STATES]
    return (live or ids or [None])[0]


def runs_table(runs: list[dict]) -> pd.DataFrame:
    """The rows of list_runs() as a table: with each run's model in words, its creation time as a date,
    and its accuracies in percent (what the tables print with a % sign); a damaged run's model says it is
    damaged, and why."""
    table = pd.DataFrame([{**r, "model": describe_model(r)} for r in runs])
    table["created_at"] = pd.to_datetime(table["created_at"], unit="s", errors="coerce")
    for column in ("best_val_accuracy", "test_accuracy"):
        table[column] = pd.to_numeric(table[column], errors="coerce") * 100
    return table


def epoch_metrics(epochs: list[dict], total: int) -> list[tuple[str, str]]:
    """(label, value) of a run's last epoch record and its best validation accuracy; `total`: config.epochs."""
    last = epochs[-1]
    return [("epoch", f"{last['epoch']}/{total}"), ("val accuracy", f"{last['val_accuracy']:.2%}"),
            ("val loss", f"{last['val_loss']:.4f}"),
            ("best val accuracy", f"{max(r['val_accuracy'] for r in epochs):.2%}")]


# (label, eval.json key, format) of the test set's summary numbers
MACROS = (("test accuracy", "test_accuracy", "{:.2%}"), ("test loss", "test_loss", "{:.4f}"),
          ("macro precision", "macro_precision", "{:.4f}"), ("macro recall", "macro_recall", "{:.4f}"),
          ("macro F1", "macro_f1", "{:.4f}"))


def eval_metrics(evaluation: dict, *keys: str) -> list[tuple[str, str]]:
    """(label, value) of an eval.json's summary numbers (MACROS) named by `keys`, all of them without;
    "–" for a missing one."""
    return [(label, fmt.format(evaluation[key]) if evaluation.get(key) is not None else "–")
            for label, key, fmt in MACROS if not keys or key in keys]


def delete_runs(run_ids: list[str]) -> tuple[list[str], list[str]]:
    """Delete each run (jobs.delete_run refuses a queued or running one): the ids deleted, and a message
    for each that could not be."""
    deleted, errors = [], []
    for run_id in run_ids:
        try:
            delete_run(open_run(run_id))
        except (RunError, OSError) as exc:
            errors.append(f"Could not delete `{run_id}`: {exc}")
        else:
            deleted.append(run_id)
    return deleted, errors


def run_curves(run_ids: list[str]) -> tuple[dict[str, list[dict]], list[tuple[str, str]]]:
    """The epoch records of each run that has finished an epoch, and a note on each of the others:
    (level, line), the level "error" for a run that cannot be read, else "caption"."""
    curves, notes = {}, []
    for run_id in run_ids:
        try:
            epochs = open_run(run_id).epochs()
        except (RunError, OSError) as exc:
            notes.append(("error", f"Could not read the metrics of `{run_id}`: {exc}"))
            continue
        if epochs:
            curves[run_id] = epochs
        else:
            notes.append(("caption", f"`{run_id}` has not finished an epoch yet."))
    return curves, notes


def run_step_gradients(run_ids: list[str]) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """The gradient over time each run last recorded (train.step_gradient_norms), under a label naming the
    run, its cell and the accuracy it reached ("r3 · GRU · 98.9%"): {"norms", "steps" (its sequence length),
    "epoch" (when it was measured)}; and notes (level, line) naming the runs that have none: a CNN, a run
    from before it was recorded or not yet at its first progress record, a run that cannot be read."""
    series, notes, without = {}, [], []
    for run_id in run_ids:
        try:
            run = open_run(run_id)
            config, metrics, evaluation = run.config(), run.metrics(), run.eval() or {}
        except (RunError, ConfigError, OSError) as exc:
            notes.append(("error", f"Could not read the gradients of `{run_id}`: {exc}"))
            continue
        records = [r for r in metrics if r.get("event") == "batch" and r.get("step_grad_norms")]
        if config.arch == "cnn" or not records:
            without.append(run_id)
            continue
        if evaluation.get("test_accuracy") is not None:
            reached = f"{evaluation['test_accuracy']:.1%}"
        else:
            epochs = [r["val_accuracy"] for r in metrics if r.get("event") == "epoch"]
            reached = f"val {max(epochs):.1%}" if epochs else "no epoch yet"
        latest = records[-1]
        series[f"{run.id} · {cell_name(config.to_dict())} · {reached}"] = {
            "norms": latest["step_grad_norms"], "steps": config.seq_shape[0], "epoch": epoch_at(latest)}
    if without:
        notes.append(("caption", f"No gradient over time for {', '.join(f'`{i}`' for i in without)}: a CNN reads no "
                                 "sequence; a run from before it was recorded, or before its first progress "
                                 "record, has none."))
    return series, notes


def live_runs(run_ids: list[str]) -> list[str]:
    """The runs among `run_ids` still queued or running (runs that cannot be read are not)."""
    live = []
    for run_id in run_ids:
        try:
            if open_run(run_id).status().get("state") in LIVE_STATES:
                live.append(run_id)
        except (RunError, OSError):
            continue
    return live


# (file name in the run directory, Run attribute holding its path): the weights a run offers
WEIGHTS = (("final_state_dict.pth", "final_path"), ("best.pt", "best_path"))


def weight_files(run: Run) -> list[tuple[str, Path]]:
    """The weights files the run has saved so far (WEIGHTS), by name."""
    return [(name, getattr(run, attr)) for name, attr in WEIGHTS if getattr(run, attr).is_file()]


def selection_key(prefix: str, ids: list[str]) -> str:
    """A table's widget key that changes with its rows. A selection is a list of row positions: once a
    row goes or comes, the same positions name other rows; a table keyed by its ids starts with an empty
    selection instead."""
    return f"{prefix}-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]


def environment_text(env: dict) -> str:
    """A run's recorded environment (runs.Run.environment) in one line for a person."""
    if not env:
        return "Environment not recorded (the run predates it)."
    parts = [f"Python {env.get('python')}", f"torch {env.get('torch')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}, cuDNN {env.get('cudnn')}")
    if env.get("optuna"):
        parts.append(f"Optuna {env['optuna']}")
    parts.append(f"GPU {env['gpu']} (compute capability {env.get('gpu_capability')})" if env.get("gpu")
                 else f"CPU {env.get('cpu')}, {env.get('threads')} threads")
    parts.append(f"commit {env['git_commit'][:12]}{' (uncommitted changes)' if env['git_commit'].endswith('-dirty') else ''}"
                 if env.get("git_commit") else "no git commit")
    return " · ".join(parts)


def gradient_records(path: str | Path) -> list[dict]:
    """The progress records of the run folder at `path` that carry gradient health; [] for a run without
    them or a folder that cannot be read."""
    try:
        return [r for r in run_at(path).metrics() if r.get("event") == "batch" and "grad_norm" in r]
    except (RunError, OSError):
        return []


def run_environment(path: str | Path) -> dict:
    """The environment the run folder at `path` recorded; {} where there is none or it cannot be read."""
    try:
        return run_at(path).environment()
    except (RunError, OSError):
        return {}
