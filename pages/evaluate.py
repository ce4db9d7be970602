"""Evaluate: the test-set results of any run or tuning trial (confusion matrix, per-class metrics, the
digits it got wrong), and two of them side by side."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from lstm_core.data import DataUnavailable, load_mnist
from lstm_core.plots import confusion_difference_figure, confusion_figure, per_class_figure
from lstm_core.runs import list_runs, list_trials, read_json
from pagekit import leave_legacy_navigation

leave_legacy_navigation()     # a fresh server's first request named this page: see pagekit.py

GALLERY = 40        # the most confident mistakes: the ones that say most about what the model gets wrong
SCALE = 3           # 28 px digits drawn at 84 px, pixel for pixel (the browser would blur a small image)
MACROS = (("test accuracy", "test_accuracy", "{:.2%}"), ("test loss", "test_loss", "{:.4f}"),
          ("macro precision", "macro_precision", "{:.4f}"), ("macro recall", "macro_recall", "{:.4f}"),
          ("macro F1", "macro_f1", "{:.4f}"))
PICKS = ("eval_run", "eval_a", "eval_b")


def init_state() -> None:
    """The picks live under widget keys; `eval_values` keeps them across page switches (Streamlit
    forgets the state of widgets that were not drawn)."""
    if "eval_values" not in st.session_state:
        st.session_state.eval_values = {}
    for key, value in st.session_state.eval_values.items():
        if key not in st.session_state:
            st.session_state[key] = value


@st.cache_resource(show_spinner="Loading the MNIST test images…")
def test_images() -> np.ndarray:
    return load_mnist().test_images.numpy()     # (10000, 28, 28) uint8


@st.cache_data(max_entries=64, show_spinner=False)
def read_eval(path: str, mtime: float) -> dict | None:
    """eval.json of a run directory; the mtime in the key reads a re-evaluated run again."""
    return read_json(Path(path) / "eval.json")


def evaluation(path: str) -> dict | None:
    try:
        return read_eval(path, (Path(path) / "eval.json").stat().st_mtime)
    except OSError:
        return None


def evaluated() -> dict[str, dict]:
    """Every run and trial with a test evaluation, by id: runs newest first, then trials."""
    rows = list_runs() + list_trials()
    return {r["id"]: r for r in rows if (evaluation(r["path"]) or {}).get("confusion_matrix") is not None}


def pick(label: str, key: str, rows: dict[str, dict], default: int = 0) -> str:
    ids = list(rows)
    if st.session_state.get(key) not in ids:
        st.session_state[key] = ids[min(default, len(ids) - 1)]
    return st.selectbox(label, ids, key=key, format_func=lambda i: (
        f"{i} · {'trial' if rows[i].get('kind') == 'trial' else 'run'} · test {rows[i]['test_accuracy']:.2%}"
        if rows[i]["test_accuracy"] is not None else i))


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
    result = evaluation(rows[run_id]["path"])
    for col, (label, key, fmt) in zip(st.columns(len(MACROS)), MACROS):
        col.metric(label, fmt.format(result[key]) if result.get(key) is not None else "–")
    left, right = st.columns(2, gap="medium")
    with left:
        normalize = st.toggle("Row-normalized", key="eval_normalize", help="each true digit's row sums to 100%")
        st.plotly_chart(confusion_figure(result["confusion_matrix"], normalize=normalize), key="eval_cm")
    with right:
        st.markdown("**Per-class precision, recall and F1**")
        st.plotly_chart(per_class_figure(result["per_class"]), key="eval_per_class")
    gallery(result.get("misclassified") or [])


def side_by_side(rows: dict[str, dict]) -> None:
    if len(rows) < 2:
        st.info("Side by side needs two evaluated runs: train another one on the Train page.")
        return
    picks = st.columns(2)
    with picks[0]:
        a = pick("Run A", "eval_a", rows, 0)
    with picks[1]:
        b = pick("Run B", "eval_b", rows, 1)
    cm_a, cm_b = (evaluation(rows[i]["path"]) for i in (a, b))
    acc = st.columns(2)
    acc[0].metric("A: test accuracy", f"{cm_a['test_accuracy']:.2%}")
    acc[1].metric("B: test accuracy", f"{cm_b['test_accuracy']:.2%}",
                  delta=f"{cm_b['test_accuracy'] - cm_a['test_accuracy']:+.2%} vs A")
    # headings above the figures, not figure titles: those collide with the predicted-digit axis on top
    figures = st.columns(3, gap="small")
    figures[0].markdown(f"**A** · `{a}`")
    figures[0].plotly_chart(confusion_figure(cm_a["confusion_matrix"]), key="eval_cm_a")
    figures[1].markdown(f"**B** · `{b}`")
    figures[1].plotly_chart(confusion_figure(cm_b["confusion_matrix"]), key="eval_cm_b")
    figures[2].markdown("**B − A** · red: B more often, blue: less", help="cell by cell: how many more test digits B puts there than A")
    figures[2].plotly_chart(confusion_difference_figure(cm_a["confusion_matrix"], cm_b["confusion_matrix"]),
                            key="eval_cm_diff")

def evaluate_page() -> None:
    init_state()
    st.title("Evaluate")
    try:
        rows = evaluated()
    except OSError as exc:
        st.error(f"Cannot read the saved runs: {exc}")
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
    st.session_state.eval_values = {k: st.session_state[k] for k in PICKS if k in st.session_state}


evaluate_page()
