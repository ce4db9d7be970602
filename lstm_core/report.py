"""One-file HTML reports of a run or a study, for people: a single self-contained file that opens offline in
any browser, with plotly.js inlined once (not per figure) and no server.

    html = run_report(run_at("saves/runs/20261123-153412-a1b2c3"))   # config, curves, gradients, results
    html = study_report(optuna.load_study(...))                      # every Optuna plot, trials, best trial
    path = write_report(html, output_file(None, run.path / "report.html"))
"""
from __future__ import annotations

import base64
import html
import io
import time
import warnings
from typing import Any, Callable

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .config import sequence_length
from .plots import (STUDY_PLOTS, confusion_figure, curves_figure, gradient_figure, per_class_figure,
                    step_gradient_figure, study_figure)
from .runs import Run, RunError, atomic_write_bytes

MISTAKES = 12       # the most confident mistakes a run's report shows: what says most about the model
SCALE = 3           # 28 px digits drawn at 84 px, pixel for pixel
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}table{border-collapse:collapse;
font-size:.85em}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}.grid{display:flex;
flex-wrap:wrap;gap:1em}.grid>div{flex:1 1 480px}.note{color:#666}figure{display:inline-block;margin:4px;
text-align:center;font-size:.8em}img{image-rendering:pixelated}"""


class Report:
    """The sections of a report as HTML, in order; figures as plotly divs that share one copy of plotly.js."""

    def __init__(self, title: str):
        self.title, self.parts = title, []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{html.escape(text)}</p>')

    def table(self, rows: list[dict], empty: str = "Nothing to list.") -> None:
        if not rows:
            return self.note(empty)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(row.get(c)))}</td>" for c in columns) + "</tr>"
                       for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figures(self, *figures: go.Figure | None) -> None:
        """Figures side by side (each at least 480 px wide, wrapping below that)."""
        divs = [fig.to_html(full_html=False, include_plotlyjs=False, config={"displayModeBar": False})
                for fig in figures if fig is not None]
        self.parts.append('<div class="grid">' + "".join(f"<div>{d}</div>" for d in divs) + "</div>")

    def images(self, pictures: list[tuple[bytes, str]]) -> None:
        """PNG images inline (data: URLs), each with its caption."""
        self.parts.append("".join(
            f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(text)}">'
            f"<figcaption>{html.escape(text)}</figcaption></figure>" for png, text in pictures))

    def html(self) -> str:
        made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
                f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
                f"<h1>{html.escape(self.title)}</h1><p class=\"note\">LSTM Studio report, written {made}</p>"
                + "".join(self.parts) + "</body></html>")


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def attempt(make: Callable[[], go.Figure]) -> tuple[go.Figure | None, str | None]:
    """A figure, or None and why it cannot be drawn (Optuna raises for a study it cannot plot yet)."""
    try:
        with warnings.catch_warnings():     # Optuna's notes on a young study (too few trials): the report says them
            warnings.simplefilter("ignore")
            return make(), None
    except Exception as exc:  # noqa: BLE001 - a figure that cannot be drawn is a note, not a failed report
        return None, f"{type(exc).__name__}: {exc}"


# -- a run ---------------------------------------------------------------------------------------
def run_sections(report: Report, run: Run, mistakes_from: Callable[[], Any] | None = None) -> None:
    """A run's config, environment, curves, gradient health and gradient over time, test results and its
    most confident mistakes (their images from `mistakes_from()`: the test images, (N, 28, 28) uint8)."""
    config = run.config()                   # RunError, naming the damage, for a damaged run
    records = run.metrics()
    epochs = [r for r in records if r.get("event") == "epoch"]
    batches = [r for r in records if r.get("event") == "batch" and "grad_norm" in r]
    report.heading("Config")
    report.table([{"field": key, "value": value} for key, value in config.to_dict().items()])
    report.heading("Environment")
    report.table([{"what": key, "value": value} for key, value in run.environment().items()],
                 "Not recorded (the run predates it).")
    report.heading("Training curves")
    if epochs:
        report.figures(curves_figure(epochs))
    else:
        report.note("No epoch finished.")
    if batches:
        report.heading("Gradient health, and the gradient reaching each time step")
        steps = (step_gradient_figure(batches, sequence_length(config.seq_mode))
                 if any(b.get("step_grad_norms") for b in batches) else None)
        report.figures(gradient_figure(batches), steps)
    evaluation = run.eval() or {}
    report.heading("Test set")
    if evaluation.get("confusion_matrix") is None:
        report.note("No test evaluation (a run is evaluated when it ends).")
        return
    report.table([{key: evaluation.get(key) for key in ("test_accuracy", "test_loss", "macro_precision",
                                                        "macro_recall", "macro_f1", "best_epoch", "n_test")}])
    report.figures(confusion_figure(evaluation["confusion_matrix"]), per_class_figure(evaluation["per_class"]))
    wrong = sorted(evaluation.get("misclassified") or [], key=lambda m: -m["confidence"])[:MISTAKES]
    if wrong and mistakes_from is not None:
        report.heading("Most confident mistakes: true → predicted (confidence)")
        try:
            images = mistakes_from()
        except Exception as exc:  # noqa: BLE001 - no data here: the report says so and goes on
            report.note(f"The test images are not available here: {str(exc).splitlines()[0]}")
        else:
            report.images([(png(images[m["index"]]), f"{m['true']} → {m['pred']} ({m['confidence']:.0%})")
                           for m in wrong])


def png(image) -> bytes:
    from PIL import Image       # the images of mistakes only
    pixels = Image.fromarray(image).resize((28 * SCALE, 28 * SCALE), Image.Resampling.NEAREST)
    out = io.BytesIO()
    pixels.save(out, format="PNG")
    return out.getvalue()


def run_report(run: Run, mistakes_from: Callable[[], Any] | None = None) -> str:
    report = Report(f"Run {run.id}")
    run_sections(report, run, mistakes_from)
    return report.html()


# -- a study -------------------------------------------------------------------------------------
def study_report(study, mistakes_from: Callable[[], Any] | None = None, store: str | None = None,
                 root=None) -> str:
    """Every Optuna plot the Tuning page shows, the trial table, and the best trial's results: from its folder
    where this machine has it, else from the study's artifact store (`store` overrides the one it records)."""
    from .artifacts import trial_run
    from .tune import TARGET, trial_rows

    report = Report(f"Study {study.study_name}")
    report.heading("Optuna's plots")
    drawn, notes = [], []
    for kind in STUDY_PLOTS:
        fig, why = attempt(lambda: study_figure(study, kind, TARGET))
        drawn.append(fig)
        if why:
            notes.append(f"{kind}: not drawn ({why})")
    report.figures(*drawn)
    for line in notes:
        report.note(line)
    report.heading("Trials")
    report.table([{k: v for k, v in row.items() if k != "run_dir"} for row in trial_rows(study)], "No trials yet.")
    try:
        best = study.best_trial
    except ValueError:          # no trial has completed
        report.note("No trial has completed yet.")
        return report.html()
    report.heading(f"Best trial: {best.number} ({TARGET} {best.value:.2%})")
    try:
        run = trial_run(study, best.number, store, root)
    except RunError as exc:
        report.note(f"Its results cannot be opened here: {exc}")
    else:
        run_sections(report, run, mistakes_from)
    return report.html()


def write_report(text: str, path) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
