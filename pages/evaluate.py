"""Evaluate: the test-set results of any run or tuning trial (confusion matrix, per-class metrics, the
digits it got wrong), and two of them side by side. A trial of another machine's study is opened from the
study's artifact store first."""
from __future__ import annotations

import numpy as np
import streamlit as st

from lstm_core.data import DataUnavailable, load_mnist
from lstm_core.plots import confusion_difference_figure, confusion_figure, per_class_figure
from lstm_core.report import run_report
from lstm_core.runs import list_runs, list_trials, run_at
from app.pagekit import (confusion, gradient_health, leave_legacy_navigation, metric_row, pick_on_evaluate, remember,
                         report_button, restore, run_eval, saved)
from app.runview import environment_text, eval_metrics, evaluated_label, run_environment
from app.trialopen import trial_opener

leave_legacy_navigation()     # a fresh server's first request named this page: see app/pagekit.py

GALLERY = 40        # the most confident mistakes: the ones that say most about what the model gets wrong
SCALE = 3           # 28 px digits drawn at 84 px, pixel for pixel (the browser would blur a small image)
PICKS = ("eval_run", "eval_a", "eval_b")


@st.cache_resource(show_spinner="Loading the MNIST test images…")
def test_images() -> np.ndarray:
    return load_mnist().test_images.numpy()     # (10000, 28, 28) uint8


def evaluated() -> dict[str, dict]:
    """Every run and trial with a test evaluation, by id: runs newest first, then trials."""
    rows = list_runs() + list_trials()
    return {r["id"]: r for r in rows if (run_eval(r["path"]) or {}).get("confusion_matrix") is not None}


def pick(label: str, key: str, rows: dict[str, dict], default: int = 0, where=st) -> str:
    ids = list(rows)
    if st.session_state.get(key) not in ids:
        st.session_state[key] = ids[min(default, len(ids) - 1)]
    return where.selectbox(label, ids, key=key, format_func=lambda i: evaluated_label(rows[i]))


def gallery(mistakes: list[dict]) -> None:
    shown = sorted(mistakes, key=lambda m: -m["confidence"])[:GALLERY]
    st.subheader("Most confident mistakes")
    if not shown:
        st.info("No test digit was misclassified.")
        return
    try:
        images = test_images()
    except DataUnavailable as exc:
        st.warning(f"The test images are not available here: {exc}")
        return
    st.caption(f"{len(shown)} of {len(mistakes)} misclassified test digits, most confident first: "
               "true → predicted (confidence).")
    st.image([images[m["index"]].repeat(SCALE, 0).repeat(SCALE, 1) for m in shown],
             caption=[f"{m['true']} → {m['pred']} ({m['confidence']:.0%})" for m in shown], output_format="PNG")


def one_run(rows: dict[str, dict]) -> None:
    run_id = pick("Run or trial", "eval_run", rows)
    result = run_eval(rows[run_id]["path"])
    metric_row(eval_metrics(result))
    report_button(run_report, run_at(rows[run_id]["path"]), f"{run_id}.html", "eval_report")
    left, right = st.columns(2, gap="medium")
    with left:
        confusion(result["confusion_matrix"], "eval_normalize", "eval_cm", help="each true digit's row sums to 100%")
    with right:
        st.markdown("**Per-class precision, recall and F1**")
        st.plotly_chart(per_class_figure(result["per_class"]), key="eval_per_class")
    gradient_health(rows[run_id]["path"], rows[run_id]["seq_mode"], "eval")   # the run list's row has its config
    st.caption(environment_text(run_environment(rows[run_id]["path"])))
    gallery(result.get("misclassified") or [])


def side_by_side(rows: dict[str, dict]) -> None:
    if len(rows) < 2:
        st.info("Side by side needs two evaluated runs: train another one on the Train page.")
        return
    left, right = st.columns(2)
    a, b = pick("Run A", "eval_a", rows, 0, left), pick("Run B", "eval_b", rows, 1, right)
    cm_a, cm_b = (run_eval(rows[i]["path"]) for i in (a, b))
    acc = st.columns(2)
    acc[0].metric("A: test accuracy", f"{cm_a['test_accuracy']:.2%}")
    acc[1].metric("B: test accuracy", f"{cm_b['test_accuracy']:.2%}",
                  delta=f"{cm_b['test_accuracy'] - cm_a['test_accuracy']:+.2%} vs A")
    # headings above the figures, not figure titles: those collide with the predicted-digit axis on top
    figures = st.columns(3, gap="small")
    for column, (side, run_id, result) in zip(figures, (("A", a, cm_a), ("B", b, cm_b))):
        column.markdown(f"**{side}** · `{run_id}`")
        column.plotly_chart(confusion_figure(result["confusion_matrix"]), key=f"eval_cm_{side.lower()}")
    figures[2].markdown("**B − A** · red: B more often, blue: less",
                        help="cell by cell: how many more test digits B puts there than A")
    figures[2].plotly_chart(confusion_difference_figure(cm_a["confusion_matrix"], cm_b["confusion_matrix"]),
                            key="eval_cm_diff")


def evaluate_page() -> None:
    restore("eval_values", {})      # the picks, across page switches
    st.title("Evaluate")
    trial_opener("eval", pick_on_evaluate)
    rows = saved(evaluated)
    if rows is None:
        return
    if not rows:
        st.info("No evaluated run yet: a run is evaluated on the test set when it ends. Train one on the Train "
                "page, or from a terminal with `python -m lstm_core train --preset default`.")
        return
    one, two = st.tabs(["One run", "Side by side"])
    with one:
        one_run(rows)
    with two:
        side_by_side(rows)
    remember("eval_values", PICKS)


evaluate_page()
