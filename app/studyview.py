"""What the Tuning page shows of a study, as data: the study picker's labels, whether a study runs, what
each of Optuna's plots still needs, the contour's axes, and the trials that can be inspected (from their
folder here, or from the study's artifact store).

    study, live = load_study(storage, "lstm")         # None before a just-launched study exists
    ready = plottable(study)                           # ready.notes["history"]: None, or what it needs
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from lstm_core.artifacts import MISSING_ATTR, has_results, results_at
from lstm_core.jobs import study_running
from lstm_core.runs import TRIAL_FOLDERS, RunError, saves_root, study_dir
from lstm_core.storage import default_storage
from lstm_core.tune import TARGET, state_counts, study_summaries, trial_rows


def storage_studies(url: str) -> list[dict]:
    """tune.study_summaries of the storage at `url` (ConfigError: it cannot be opened). The default
    storage of a fresh install has no folder yet: it is made, for an empty storage rather than an error."""
    if url == default_storage():
        saves_root().mkdir(parents=True, exist_ok=True)
    return study_summaries(url)


def study_labels(summaries: list[dict], running: list[str]) -> dict[str, str]:
    """The picker's label of each study (tune.study_summaries), newest first, then those launched that
    have not created their study yet (`running`: jobs.running_studies)."""
    labels = {s["name"]: f"{s['name']} · {s['trials']} trial{'' if s['trials'] == 1 else 's'}"
              + (f" · best {s['best_value']:.2%}" if s["best_value"] is not None else "")
              for s in sorted(summaries, key=lambda s: s["started"] or "", reverse=True)}
    labels.update({n: f"{n} · starting" for n in running if n not in labels})
    return labels


def load_study(storage: optuna.storages.BaseStorage, name: str) -> tuple[optuna.Study | None, bool]:
    """The study (None before a just-launched one exists) and whether it is running."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None, study_running(name)
    return study, state_counts(study)["RUNNING"] > 0 or study_running(name)


def absent_study(name: str, live: bool) -> tuple[str, str]:
    """(level, line) for a study its storage does not hold (`live`: its launch is running): one starting,
    one whose process ended before creating it (with the end of its log), or none at all."""
    if live:
        return "info", f"Study {name} is starting: loading the data."
    tail = log_tail(name)
    if tail:
        return "error", f"The study process ended before creating study {name}:\n\n```\n{tail}\n```"
    return "warning", f"There is no study {name} in this storage."


def log_tail(name: str, lines: int = 5) -> str:
    """The end of the study's tune.log (only a study launched from the app has one), "" without one."""
    try:
        return "\n".join((study_dir(name) / "tune.log").read_text(errors="replace").splitlines()[-lines:])
    except (OSError, RunError):
        return ""


@dataclass(frozen=True)
class Plottable:
    """What a study can plot now."""
    params: list[str]                   # the parameters of its complete trials, sorted
    varying: list[str]                  # those that take more than one value there
    notes: dict[str, str | None]        # per plots.STUDY_PLOTS name: None to draw it, else what it still needs

    @property
    def contour(self) -> bool:
        """Whether a contour pair can be picked (its note then depends on the pair: contour_note)."""
        return self.notes["contour"] is None


def plottable(study: optuna.Study) -> Plottable:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    params = sorted({p for t in complete for p in t.params})
    varying = [p for p in params if len({repr(t.params.get(p)) for t in complete}) > 1]
    none = "No complete trial yet." if not complete else None
    curves = any(t.intermediate_values for t in trials)
    return Plottable(params, varying, {
        "history": none, "parallel": none, "slice": none,
        "intermediate": None if curves else "No trial has finished an epoch yet.",
        "contour": None if len(params) >= 2 and len(complete) >= 2
        else "The contour plot needs two searched parameters and two complete trials.",
        "importances": None if len(complete) >= 2 and varying
        else "Parameter importances need two complete trials whose parameters differ."})


def contour_pair(study: optuna.Study, ready: Plottable, current: list[str] | None) -> list[str]:
    """The contour's axes: the current pick while it names this study's parameters, else the two most
    important ones (as the importances plot ranks them), then others that vary, then the rest."""
    if current is not None and set(current) <= set(ready.params):
        return current
    ranked = [p for p in most_important(study, ready) if p in ready.varying]
    return list(dict.fromkeys([*ranked, *ready.varying, *ready.params]))[:2]


def most_important(study: optuna.Study, ready: Plottable) -> list[str]:
    """The study's parameters, most important first, by Optuna's default evaluator: the one its importances
    plot uses, so the contour opens on the two bars at its top. [] while it cannot rank them yet."""
    if ready.notes["importances"] is not None:
        return []
    try:
        return list(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):      # e.g. no parameter common to every complete trial
        return []


def contour_note(ready: Plottable, pair: list[str]) -> str | None:
    """None when the contour of `pair` can be drawn, else why not (a contour over one value is empty)."""
    if not ready.contour:
        return ready.notes["contour"]
    flat = [p for p in pair if p not in ready.varying]
    return ("Pick two parameters for the contour plot." if len(pair) < 2 else
            f"{flat[0]} has the same value in every complete trial: pick one that varies." if flat else None)


def evaluated_trials(study: optuna.Study) -> dict[int, dict]:
    """The trials whose test evaluation can be opened (from their folder here, or from the artifact store),
    and those whose upload to the store failed, whose opening says why: by number, rows of tune.trial_rows
    with `results` ("here", "in the store" or "missing": artifacts.results_at)."""
    shown = {t.number: results_at(t) for t in study.get_trials(deepcopy=False)
             if has_results(t) or t.user_attrs.get(MISSING_ATTR)}
    return {r["number"]: {**r, "results": shown[r["number"]]} for r in trial_rows(study) if r["number"] in shown}


def first_trial(trials: dict[int, dict]) -> int:
    """The trial to inspect first: the best complete one that can be opened, else the last."""
    scored = [r for r in trials.values()
              if r["state"] == "COMPLETE" and r["value"] is not None and r.get("results") != "missing"]
    return max(scored, key=lambda r: r["value"])["number"] if scored else list(trials)[-1]


# what a trial's label adds for one whose folder is not here (artifacts.results_at)
WHERE = {"in the store": " · in the artifact store", "missing": " · results missing"}


def trial_label(row: dict) -> str:
    return (f"trial {row['number']} · {row['state'].lower()}"
            + (f" · {TARGET} {row['value']:.2%}" if row["value"] is not None else "")
            + WHERE.get(row.get("results"), ""))


def trial_id(run_dir: str | Path) -> str | None:
    """The id the Evaluate page lists a trial's folder by (runs.list_trials: "<study>/trial_<n>", run here or
    downloaded into the cache), None for a folder outside this saves root, which it does not list."""
    path = Path(run_dir)
    listed = path.parent.parent in [saves_root() / f for f in TRIAL_FOLDERS]
    return f"{path.parent.name}/{path.name}" if listed else None


def draw_id(run_dir: str | Path) -> str | None:
    """The id the Draw page knows a trial's model by, None for one it cannot load (outside this saves root,
    or without its best.pt)."""
    listed = trial_id(run_dir)
    return listed if listed and (Path(run_dir) / "best.pt").is_file() else None


def study_metrics(study: optuna.Study) -> list[tuple]:
    """(label, value[, help]) of the study's trials by state and of its best trial."""
    counts = state_counts(study)
    best = study.best_trial if counts["COMPLETE"] else None
    return [("complete", counts["COMPLETE"]), ("pruned", counts["PRUNED"]), ("failed", counts["FAIL"]),
            ("running", counts["RUNNING"]),
            (f"best {TARGET}", f"{best.value:.2%}" if best else "–", f"trial {best.number}" if best else None)]
