"""The Tuning page's launch form without Streamlit: its first values, the widget that picks each searched
parameter's range, the search space and `tune` command the form makes, and the launch.

    ask = range_input("lr", (1e-5, 1e-1))                  # FieldInput("select_slider", "lr", {...})
    space = {"lr": picked_range("lr", (1e-4, 1e-2))}
    plan = plan_study("wide", LAUNCH, space, storage_url, "s3://bucket/studies")   # RunError or ConfigError
    launch(plan, storage)                                   # at the click: checks, space.json, workers
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lstm_core.artifacts import check_store, store_spec
from lstm_core.config import BOUNDS, CHOICES, FIELD_TYPES, PRESETS, flag, preset
from lstm_core.jobs import launch_study, study_running
from lstm_core.runs import RunError, atomic_write_json, check_saves, safe_name, study_dir
from lstm_core.storage import check_writable
from lstm_core.tune import PRUNERS, SAMPLERS, SEARCH_RANGES, check_space
from app.trainform import LABELS, STEPS, UI_RANGE, FieldInput

# The form's first values, under the names of the `tune` command's flags.
LAUNCH = {"trials": 20, "timeout": 0, "workers": 1, "sampler": "tpe", "pruner": "median", "preset": "default",
          "epochs": 3, "limit_train": 10000, "val_size": 5000}
# the values that set up the study itself; the others fix the config of its trials
STUDY_KEYS = ("trials", "timeout", "workers", "sampler", "pruner")
# the widget of each value
LAUNCH_INPUTS = {
    "trials": FieldInput("number_input", "Trials", {
        "min_value": 1, "max_value": 10000,
        "help": "run until the study has this many finished trials (complete or pruned)"}),
    "timeout": FieldInput("number_input", "Timeout (s, 0 = none)", {
        "min_value": 0, "step": 60, "help": "start no trial after this many seconds"}),
    "workers": FieldInput("number_input", "Workers", {
        "min_value": 1, "max_value": max(1, os.cpu_count() or 1),
        "help": "processes sharing the study; they share the CPU cores too"}),
    "sampler": FieldInput("selectbox", "Sampler", {"options": SAMPLERS}),
    "pruner": FieldInput("selectbox", "Pruner", {"options": PRUNERS, "help": "stops hopeless trials after an epoch"}),
    "preset": FieldInput("selectbox", "Preset", {
        "options": list(PRESETS), "help": "the values of every parameter not searched"}),
    "epochs": FieldInput("number_input", "epochs", {"min_value": 1, "max_value": 1000}),
    "limit_train": FieldInput("number_input", LABELS["limit_train"], {
        "min_value": 0, "max_value": 60000, "step": 1000}),
    "val_size": FieldInput("number_input", LABELS["val_size"], {"min_value": 1, "max_value": 30000, "step": 500}),
}
# Slider extents of the searched ranges: wider than the first ranges, narrower than what a config accepts
# (BOUNDS), so that a slider can still aim. Fields not listed take the Train page's slider's, else BOUNDS.
SPACE_LIMITS = {"lr": (1e-6, 1.0), "weight_decay": (1e-8, 1e-1), "hidden_size": (8, 512), "num_layers": (1, 4),
                "dropout": (0.0, 0.8), "batch_size": (64, 1024)}
FLOAT_STEP = 0.05
SPACE_FILE = "space.json"     # in the study's folder: the search space its `tune` command reads


def first_pick(name: str):
    """A searched parameter's range before anyone moves it (tune.SEARCH_RANGES), as its widget holds it."""
    spec = SEARCH_RANGES[name]
    return list(spec["choices"]) if spec["type"] == "categorical" else (spec["low"], spec["high"])


def log_scaled(name: str) -> bool:
    spec = SEARCH_RANGES[name]
    return spec["type"] == "float" and bool(spec.get("log"))


def log_grid(low: float, high: float) -> list[float]:
    """1-2-5 steps per decade: the values a log-scaled range is picked from."""
    grid = {float(f"{m}e{e}") for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for m in (1, 2, 5)}
    return sorted(v for v in grid if low <= v <= high)


def range_input(name: str, remembered) -> FieldInput:
    """The widget that picks the searched range of `name` ("pills", "select_slider" or "slider"; labelled
    with the name). `remembered`: its last pick, which a log range's grid always offers."""
    spec = SEARCH_RANGES[name]
    if spec["type"] == "categorical":
        options = list(CHOICES.get(name) or ([False, True] if FIELD_TYPES[name] is bool else spec["choices"]))
        return FieldInput("pills", name, {"options": options, "selection_mode": "multi", "format_func": str})
    low, high = SPACE_LIMITS.get(name) or UI_RANGE.get(name) or BOUNDS[name]
    if log_scaled(name):
        # a range select_slider learns that it is a range from its `value` only, not from Session State
        return FieldInput("select_slider", name, {"options": sorted({*log_grid(low, high), *remembered}),
                                                  "value": tuple(remembered), "format_func": lambda v: f"{v:g}"})
    if spec["type"] == "int":
        return FieldInput("slider", name, {"min_value": int(low), "max_value": int(high),
                                           "step": int(spec.get("step", 1))})
    return FieldInput("slider", name, {"min_value": float(low), "max_value": float(high),
                                       "step": STEPS.get(name, FLOAT_STEP)})


def picked_range(name: str, picked) -> dict:
    """What range_input's widget returned, as a range of the search-space format (lstm_core.tune)."""
    spec = SEARCH_RANGES[name]
    if spec["type"] == "categorical":
        return {"type": "categorical", "choices": picked}
    if log_scaled(name):
        return {"type": "float", "low": picked[0], "high": picked[1], "log": True}
    if spec["type"] == "int":
        step = int(spec.get("step", 1))
        return {"type": "int", "low": picked[0], "high": picked[1], **({"step": step} if step > 1 else {})}
    return {"type": "float", "low": round(picked[0], 4), "high": round(picked[1], 4)}


@dataclass(frozen=True)
class StudyPlan:
    """A study the form describes, checked: what `launch` starts."""
    name: str
    storage: str            # the Optuna storage URL
    space: dict             # the search space, written to the study's SPACE_FILE at the launch
    args: list[str]         # the arguments of `python -m lstm_core tune`
    artifacts: str | None = None    # the artifact store every trial's results go to (artifacts.store_spec)


def plan_study(name: str, values: dict, space: dict, storage: str, artifacts: str = "") -> StudyPlan:
    """The study named `name` with the form's `values` (LAUNCH's keys) searching `space` in `storage`, its
    trials' results uploaded to the artifact store `artifacts` too ("" for none), checked up front: RunError
    or ConfigError (a SpaceError or a StoreError among them) says the first problem."""
    safe_name(name, "study name")
    store = store_spec(artifacts) if artifacts.strip() else None
    base = preset(values["preset"]).replace(epochs=values["epochs"], limit_train=values["limit_train"],
                                            val_size=values["val_size"])
    check_space(space, base)
    if study_running(name):
        raise RunError(f"Study {name} is running: stop it first, or pick another name.")
    args = ["--study", name, "--storage", storage, "--space", str(study_dir(name) / SPACE_FILE)]
    for key, value in values.items():
        if key != "timeout" or value:           # a timeout of 0 is none: the flag's default
            args += [flag(key), str(value)]
    if store:
        args += ["--artifacts", store]
    return StudyPlan(name, storage, space, args, store)


def launch(plan: StudyPlan, storage) -> None:
    """Start the planned study in the background. The saves root, the storage (the opened `storage` of
    plan.storage) and the artifact store are checked here, at the click, not every time the form is drawn:
    each probe writes (a store's may wait on a network), and running workers write too."""
    check_saves()
    check_writable(storage, plan.storage)
    if plan.artifacts:
        check_store(plan.artifacts)
    folder = study_dir(plan.name)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / SPACE_FILE, plan.space)
    launch_study(plan.args, plan.name, plan.storage)
