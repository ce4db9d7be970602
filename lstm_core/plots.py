"""Plotly figures of runs, shared by the pages (no Streamlit here): curves, running loss, confusion matrix,
overlays of several runs."""
from __future__ import annotations

# Plotly uses numpy and pandas only if they are in sys.modules, without importing them: while another
# thread is importing one (a second session's first page on a fresh server), it finds it half-initialized
# and a figure fails with "partially initialized module". Imported here, they are whole before any figure.
import numpy  # noqa: F401
import pandas  # noqa: F401
import plotly.graph_objects as go
from plotly.subplots import make_subplots

TRAIN, VAL = "#1f77b4", "#ff7f0e"
DIGITS = [str(d) for d in range(10)]


def curves_figure(epochs: list[dict], height: int = 340) -> go.Figure:
    """Train and validation loss (left) and accuracy (right) per epoch, sharing the epoch axis."""
    fig = make_subplots(rows=1, cols=2, shared_xaxes=True, subplot_titles=("loss", "accuracy"),
                        horizontal_spacing=0.1)
    x = [r["epoch"] for r in epochs]
    for col, key, fmt in ((1, "loss", ".4f"), (2, "accuracy", ".2%")):
        for split, color, name in (("train", TRAIN, "train"), ("val", VAL, "validation")):
            fig.add_trace(go.Scatter(x=x, y=[r.get(f"{split}_{key}") for r in epochs], mode="lines+markers",
                                     name=name, legendgroup=name, showlegend=col == 1, line={"color": color},
                                     hovertemplate=f"epoch %{{x}}<br>{name} {key} %{{y:{fmt}}}<extra></extra>"),
                          row=1, col=col)
    fig.update_xaxes(title_text="epoch", dtick=max(1, len(x) // 10) if x else 1, matches="x")
    fig.update_yaxes(tickformat=".1%", row=1, col=2)
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 40, "b": 10}, hovermode="x unified",
                      legend={"orientation": "h", "y": -0.25})
    return fig


def running_loss_figure(batches: list[dict], height: int = 260) -> go.Figure:
    """Training loss and accuracy of each `log_every`-batch window, against epochs (fractional)."""
    x = [(r["epoch"] - 1) + r["batch"] / r["batches"] for r in batches]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=x, y=[r["loss"] for r in batches], name="running loss", line={"color": TRAIN},
                             hovertemplate="epoch %{x:.2f}<br>loss %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=[r["accuracy"] for r in batches], name="running accuracy",
                             line={"color": "#2ca02c", "dash": "dot"},
                             hovertemplate="epoch %{x:.2f}<br>accuracy %{y:.2%}<extra></extra>"), secondary_y=True)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="loss", secondary_y=False)
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", secondary_y=True)
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "y": -0.3})
    return fig


def confusion_figure(cm: list[list[int]], normalize: bool = False, title: str = "", height: int = 430) -> go.Figure:
    """The 10x10 confusion matrix, true digits down, predictions across; counts or row-normalized."""
    if normalize:
        z = [[c / max(sum(row), 1) for c in row] for row in cm]
        text = [[f"{v:.1%}" if v else "" for v in row] for row in z]
    else:
        z = cm
        text = [[str(v) if v else "" for v in row] for row in cm]
    fig = go.Figure(go.Heatmap(
        z=z, x=DIGITS, y=DIGITS, text=text, texttemplate="%{text}", colorscale="Blues", showscale=False,
        hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    fig.update_yaxes(title_text="true digit", autorange="reversed", type="category")
    fig.update_xaxes(title_text="predicted digit", type="category", side="top")
    fig.update_layout(title=title or None, height=height, margin={"l": 10, "r": 10, "t": 60 if title else 40, "b": 10})
    return fig


def overlay_figure(runs: dict[str, list[dict]], metric: str = "val_accuracy", height: int = 380) -> go.Figure:
    """One line per run of an epoch metric (val_accuracy, val_loss, train_loss, ...)."""
    fig = go.Figure()
    for name, epochs in runs.items():
        fig.add_trace(go.Scatter(x=[r["epoch"] for r in epochs], y=[r.get(metric) for r in epochs],
                                 mode="lines+markers", name=name))
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text=metric.replace("_", " "), tickformat=".2%" if "accuracy" in metric or "error" in metric
                     else None)
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, hovermode="x unified")
    return fig


def per_class_figure(per_class: list[dict], height: int = 320) -> go.Figure:
    """Precision, recall and F1 of each digit, grouped bars."""
    fig = go.Figure()
    for key, color in (("precision", "#1f77b4"), ("recall", "#ff7f0e"), ("f1", "#2ca02c")):
        fig.add_trace(go.Bar(x=[str(c["digit"]) for c in per_class], y=[c[key] for c in per_class], name=key,
                             marker_color=color, hovertemplate=f"digit %{{x}}<br>{key} %{{y:.2%}}<extra></extra>"))
    low = min((c[k] for c in per_class for k in ("precision", "recall", "f1")), default=0.0)
    fig.update_yaxes(range=[max(0.0, low - 0.02), 1.0], tickformat=".0%")
    fig.update_xaxes(title_text="digit", type="category")
    fig.update_layout(barmode="group", height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def confusion_difference_figure(cm_a: list[list[int]], cm_b: list[list[int]], title: str = "",
                                height: int = 430) -> go.Figure:
    """B minus A, cell by cell: red where B makes more of that (mis)classification, blue where fewer."""
    diff = [[b - a for a, b in zip(row_a, row_b)] for row_a, row_b in zip(cm_a, cm_b)]
    bound = max((abs(v) for row in diff for v in row), default=1) or 1
    fig = go.Figure(go.Heatmap(
        z=diff, x=DIGITS, y=DIGITS, text=[[f"{v:+d}" if v else "" for v in row] for row in diff],
        texttemplate="%{text}", colorscale="RdBu_r", zmin=-bound, zmax=bound, showscale=False,
        hovertemplate="true %{y}, predicted %{x}: %{z:+d}<extra></extra>"))
    fig.update_yaxes(title_text="true digit", autorange="reversed", type="category")
    fig.update_xaxes(title_text="predicted digit", type="category", side="top")
    fig.update_layout(title=title or None, height=height, margin={"l": 10, "r": 10, "t": 60 if title else 40, "b": 10})
    return fig
