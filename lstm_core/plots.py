"""Every plotly figure the pages draw (no Streamlit here): a run's curves and running loss, confusion
matrices, per-class metrics, overlays of several runs, the Draw page's reading of a digit, and a study's
Optuna plots."""
from __future__ import annotations

import math
import re

import numpy
import plotly
import plotly.graph_objects as go
from plotly.colors import get_colorscale, sample_colorscale
from plotly.subplots import make_subplots

TRAIN, VAL = "#1f77b4", "#ff7f0e"
DIGITS = [str(d) for d in range(10)]


def epoch_at(record: dict) -> float:
    """Where a progress record falls on an epoch axis: 1.5 is halfway through the second epoch."""
    return (record["epoch"] - 1) + record["batch"] / record["batches"]


# -- axes that read at a glance ----------------------------------------------------------------------
# Plotly's own log ticks write 0.5 as "5" and 2e-5 as "20µ", and its automatic ticks on a second y axis
# can land on 19% and 81%. These give every log and percent axis its ticks: each label the whole value,
# at round steps, with the axis running from a tick to a tick so that at least two are always named.
LOG_MANTISSAS = ((1, (1, 2, 3, 5, 7)), (3, (1, 2, 5)))    # (most decades spanned, ticks in each decade)
MOST_LOG_TICKS = 7
PERCENT_STEPS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def number_text(value: float) -> str:
    """A tick value written whole: 0.5, 20, 0.001, 2e-5, 1e6 (never "5" for 0.5, nor SI prefixes)."""
    if 1e-3 <= value < 1e4:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def log_axis(values) -> dict:
    """The settings of a log axis over the positive `values`: ticks at 1, 2, 3, 5 and 7 of a decade when
    they span one, at 1, 2 and 5 when they span up to three, else at every decade (or every few), each
    labelled with its whole value; the axis runs from the tick at or below the least value to the one at or
    above the greatest."""
    values = [v for v in finite(values) if v > 0]
    if not values:
        return {"type": "log"}
    low, high = min(values), max(values)
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    decades = max(last - first, 1)
    mantissas, every = next(((m, 1) for most, m in LOG_MANTISSAS if decades <= most),
                            ((1,), math.ceil(decades / (MOST_LOG_TICKS - 1))))
    first, last = every * math.floor(first / every), every * math.ceil(last / every)
    # through the decimal text, so that a tick is exactly the number its label reads
    ticks = [float(f"{m}e{k}") for k in range(first, last + 1, every) for m in mantissas]
    below, above = max(t for t in ticks if t <= low), min(t for t in ticks if t >= high)
    if below == above:                                      # a single value on a tick: the next tick up too
        above = min(t for t in ticks if t > below)
    ticks = [t for t in ticks if below <= t <= above]
    pad = 0.02 * (math.log10(above) - math.log10(below))   # lines on the edge ticks are not cut in half
    return {"type": "log", "tickmode": "array", "tickvals": ticks, "ticktext": [number_text(t) for t in ticks],
            "range": [math.log10(below) - pad, math.log10(above) + pad]}


def percent_axis(values, most: int = 6) -> dict:
    """The settings of a percent axis over the fractions `values`: ticks at multiples of the smallest round
    step (0.1%, 0.2%, 0.5%, 1%, ... 50%) that needs at most `most` of them, written with as many decimals
    as the step needs; the axis runs from the tick at or below the least value to the one at or above the
    greatest, a little wider so that markers on the edge are not cut."""
    values = finite(values)
    if not values:
        return {"tickformat": ".0%"}
    low, high = min(values), max(values)
    for step in PERCENT_STEPS:
        # the tiny slack keeps 0.3 (0.30000000000000004 / 0.1) on its own tick
        first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
        if last - first < most:
            break
    last = max(last, first + 1)
    ticks = [round(i * step, 6) for i in range(first, last + 1)]
    decimals = 0 if step >= 0.01 else 1
    pad = 0.03 * (ticks[-1] - ticks[0])
    return {"tickmode": "array", "tickvals": ticks, "ticktext": [f"{t:.{decimals}%}" for t in ticks],
            "range": [ticks[0] - pad, ticks[-1] + pad]}


def legend_below() -> dict:
    """A horizontal legend at the foot of the figure, placed against the whole figure rather than the plot
    area: the plot area is then fitted above it, and a legend that wraps to several lines in a narrow column
    pushes the plot up instead of covering the x axis's labels."""
    return {"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0, "xanchor": "left"}


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
    accuracies = [r.get(f"{split}_accuracy") for r in epochs for split in ("train", "val")]
    fig.update_yaxes(**percent_axis(accuracies), row=1, col=2)
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 40, "b": 10}, hovermode="x unified",
                      legend=legend_below())
    return fig


def running_loss_figure(batches: list[dict], height: int = 260) -> go.Figure:
    """Training loss and accuracy of each `log_every`-batch window, against epochs (fractional)."""
    x = [epoch_at(r) for r in batches]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=x, y=[r["loss"] for r in batches], name="running loss", line={"color": TRAIN},
                             hovertemplate="epoch %{x:.2f}<br>loss %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=[r["accuracy"] for r in batches], name="running accuracy",
                             line={"color": "#2ca02c", "dash": "dot"},
                             hovertemplate="epoch %{x:.2f}<br>accuracy %{y:.2%}<extra></extra>"), secondary_y=True)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="loss", secondary_y=False)
    fig.update_yaxes(title_text="accuracy", secondary_y=True, showgrid=False,
                     **percent_axis([r["accuracy"] for r in batches]))
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend=legend_below())
    return fig


def gradient_figure(batches: list[dict], height: int = 360) -> go.Figure:
    """Gradient health per `log_every`-batch window (train.GradientHealth): the total gradient norm before
    clipping (mean and max of the window) and each layer's, on a log axis, so a norm that falls by orders of
    magnitude (vanishing) or jumps (exploding) shows; under it, on its own axis, the share of steps that
    clipping cut (bars laid over the norms would hide them and crowd the axes)."""
    rows = [r for r in batches if "grad_norm" in r]
    x = [epoch_at(r) for r in rows]
    clipped = any(r.get("clip_fraction") is not None for r in rows)
    fig = make_subplots(rows=2 if clipped else 1, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        row_heights=[0.7, 0.3] if clipped else None)
    fig.add_trace(go.Scatter(x=x, y=[r["grad_norm"] for r in rows], name="total (mean)", line={"color": "#111111"},
                             hovertemplate="epoch %{x:.2f}<br>gradient norm %{y:.3g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=[r["grad_norm_max"] for r in rows], name="total (max)",
                             line={"color": "#111111", "dash": "dot", "width": 1},
                             hovertemplate="epoch %{x:.2f}<br>largest norm %{y:.3g}<extra></extra>"))
    layers = list(dict.fromkeys(name for r in rows for name in r.get("layer_grad_norms") or {}))
    for name in layers:
        fig.add_trace(go.Scatter(x=x, y=[(r.get("layer_grad_norms") or {}).get(name) for r in rows], name=name,
                                 line={"width": 1.5},
                                 hovertemplate=f"epoch %{{x:.2f}}<br>{name} %{{y:.3g}}<extra></extra>"))
    norms = [trace.y for trace in fig.data]
    if clipped:
        fig.add_trace(go.Bar(x=x, y=[r.get("clip_fraction") for r in rows], name="clipped steps", opacity=0.6,
                             marker={"color": VAL},
                             hovertemplate="epoch %{x:.2f}<br>clipped %{y:.0%} of steps<extra></extra>"),
                      row=2, col=1)
        fig.update_yaxes(title_text="clipped", row=2, col=1, **percent_axis([0, 1], most=3))
    bad = [(xi, r["nonfinite_steps"]) for xi, r in zip(x, rows) if r.get("nonfinite_steps")]
    if bad:
        fig.add_trace(go.Scatter(x=[b[0] for b in bad], y=[None] * len(bad), mode="markers", name="non-finite",
                                 marker={"color": "red", "symbol": "x", "size": 10}, showlegend=True))
        for xi, _ in bad:
            fig.add_vline(x=xi, line={"color": "red", "width": 1, "dash": "dot"})
    fig.update_yaxes(title_text="gradient norm", row=1, col=1, **log_axis(v for y in norms for v in y))
    fig.update_xaxes(title_text="epoch", row=2 if clipped else 1, col=1)
    # taller than the others: in a narrow column its five or six legend entries take a line each
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend=legend_below())
    return fig


def step_gradient_figure(batches: list[dict], sequence_steps: int, lines: int = 6, height: int = 300) -> go.Figure:
    """The gradient reaching each time step (train.step_gradient_norms) at up to `lines` moments of training,
    first faint, latest dark, on a log axis: flat lines mean every step is learned from; lines falling by
    orders of magnitude towards step 1 are vanishing gradients. Steps no gradient reached at all (it
    underflowed to 0) cannot sit on a log axis: they are left out, and a note says so."""
    rows = [r for r in batches if r.get("step_grad_norms")]
    picked = sorted({round(i * (len(rows) - 1) / max(lines - 1, 1)) for i in range(lines)}) if rows else []
    fig = go.Figure()
    blues = get_colorscale("Blues")
    underflow = False
    for n, i in enumerate(picked):
        r = rows[i]
        norms = r["step_grad_norms"]
        span = sequence_steps / len(norms)
        x = [(k + 0.5) * span + 0.5 for k in range(len(norms))]
        underflow |= any(v == 0 for v in norms)
        shade = 0.35 + 0.65 * n / max(len(picked) - 1, 1)
        when = epoch_at(r)
        fig.add_trace(go.Scatter(
            x=x, y=[v if v else None for v in norms], name=f"epoch {when:.2f}", mode="lines",
            line={"color": sample_colorscale(blues, shade)[0], "width": 1 + 1.5 * (i == picked[-1])},
            hovertemplate=f"epoch {when:.2f}<br>step %{{x:.0f}}<br>gradient %{{y:.3g}}<extra></extra>"))
    if underflow:
        fig.add_annotation(text="no gradient at all reaches the missing steps (it underflows to 0)", showarrow=False,
                           xref="paper", yref="paper", x=0, y=1.08, xanchor="left", font={"size": 11, "color": "red"})
    fig.update_xaxes(title_text="time step", range=[0.5, sequence_steps + 0.5])
    fig.update_yaxes(title_text="gradient at the step", **log_axis(v for trace in fig.data for v in trace.y))
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend=legend_below())
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
    longest = max((len(epochs) for epochs in runs.values()), default=1)
    fig.update_xaxes(title_text="epoch", tick0=1, dtick=max(1, longest // 10))     # whole epochs only
    percent = "accuracy" in metric or "error" in metric
    values = [r.get(metric) for epochs in runs.values() for r in epochs]
    fig.update_yaxes(title_text=metric.replace("_", " "), **(percent_axis(values) if percent else {}))
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, hovermode="x unified")
    return fig


def step_gradient_overlay_figure(runs: dict[str, dict], height: int = 380) -> go.Figure:
    """The gradient reaching each time step (train.step_gradient_norms) of several runs, one line each, on a
    log axis: flat lines mean every step is learned from; lines falling by orders of magnitude towards step 1
    are vanishing gradients. `runs`: label -> {"norms": one per equal span of the sequence, first step first,
    "steps": the sequence's length, "epoch": when they were measured}. The time axis is the share of each
    run's sequence, so runs on rows (28 steps) and on pixels (784) line up; the hover names the steps. A span
    no gradient reached (it underflowed to 0) cannot sit on a log axis: it is left out, and a note says so."""
    fig = go.Figure()
    underflow = False
    for label, run in runs.items():
        norms, steps = run["norms"], run["steps"]
        spans = len(norms)
        first = [round(k * steps / spans) + 1 for k in range(spans)]
        last = [round((k + 1) * steps / spans) for k in range(spans)]
        underflow |= any(v == 0 for v in norms)
        fig.add_trace(go.Scatter(
            x=[(k + 0.5) / spans for k in range(spans)], y=[v if v else None for v in norms], name=label,
            mode="lines", customdata=[f"step {a}" if a == b else f"steps {a}–{b}" for a, b in zip(first, last)],
            hovertemplate=f"{label}<br>%{{customdata}} of {steps} (epoch {run['epoch']:.2f})"
                          "<br>gradient %{y:.3g}<extra></extra>"))
    if underflow:
        fig.add_annotation(text="no gradient at all reaches the missing steps (it underflows to 0)", showarrow=False,
                           xref="paper", yref="paper", x=0, y=1.08, xanchor="left", font={"size": 11, "color": "red"})
    fig.update_xaxes(title_text="time step, as a share of each run's sequence (rows: 28 steps, pixels: 784)",
                     range=[0, 1], tickformat=".0%")
    fig.update_yaxes(title_text="gradient at the step", **log_axis(v for trace in fig.data for v in trace.y))
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend=legend_below())
    return fig


def per_class_figure(per_class: list[dict], height: int = 320) -> go.Figure:
    """Precision, recall and F1 of each digit, grouped bars."""
    fig = go.Figure()
    for key, color in (("precision", "#1f77b4"), ("recall", "#ff7f0e"), ("f1", "#2ca02c")):
        fig.add_trace(go.Bar(x=[str(c["digit"]) for c in per_class], y=[c[key] for c in per_class], name=key,
                             marker_color=color, hovertemplate=f"digit %{{x}}<br>{key} %{{y:.2%}}<extra></extra>"))
    low = min((c[k] for c in per_class for k in ("precision", "recall", "f1")), default=0.0)
    # the lowest bar a little above the axis's foot, so that it shows
    fig.update_yaxes(**percent_axis([max(0.0, low - 0.02), 1.0]))
    fig.update_xaxes(title_text="digit", type="category")
    fig.update_layout(barmode="group", height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend=legend_below())
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


# -- the Draw page's reading of a digit --------------------------------------------------------------
# Built from plain dicts and not validated: these four charts are redrawn on every stroke, and plotly's
# validation of them costs the server more time per stroke than the model's answer. st.plotly_chart
# validates a dict it is given, and takes a Figure as valid: hence a Figure built without validation.
# Validation is also what turns a colorscale's name into colours, so that is done here, once.
SCALES = {name: get_colorscale(name) for name in ("gray", "Blues", "RdBu")}
TOP, OTHER = "#ff4b4b", "#8da4c4"
BARS_MARGIN = {"l": 10, "r": 10, "t": 30, "b": 10}
HEATMAP_MARGIN = {"l": 10, "r": 10, "t": 70, "b": 10}   # room on top for the title and the top x axis
MAX_HIDDEN_SHOWN = 64       # hidden units in the activation heatmap (the most varying ones beyond this)


# plotly releases `_validate=False` was tested with: from pyproject.toml's floor to below its ceiling
UNVALIDATED_TESTED = ((5, 20), (8, 0))


def skips_validation() -> bool:
    """Whether this plotly builds a Figure unvalidated when asked to: `_validate=False` is private, so only a
    plotly of the tested releases is asked, and one that refuses the keyword (TypeError), or may one day
    take it for a property (ValueError), is not used that way. Asked at the first figure (unvalidated()), not
    on import: a page imports this module before the view package has made pandas whole, and a figure built
    while another session's thread is halfway through importing pandas fails (plotly takes it from
    sys.modules)."""
    low, high = UNVALIDATED_TESTED
    if not low <= tuple(int(p) for p in re.findall(r"\d+", plotly.__version__)[:2]) < high:
        return False
    try:
        go.Figure({"data": [{"type": "bar", "y": [1]}]}, _validate=False)
    except (TypeError, ValueError):
        return False
    return True


UNVALIDATED: bool | None = None       # skips_validation(), once a figure needs it


def unvalidated(spec: dict) -> go.Figure:
    """A Figure of a plain dict, not validated where this plotly allows it, else validated (slower, the
    same figure)."""
    global UNVALIDATED
    if UNVALIDATED is None:
        UNVALIDATED = skips_validation()
    return go.Figure(spec, _validate=False) if UNVALIDATED else go.Figure(spec)


def dict_figure(trace: dict, height: int, margin: dict, xaxis: dict, yaxis: dict, **layout) -> go.Figure:
    return unvalidated({"data": [trace], "layout": {"height": height, "margin": margin, "xaxis": xaxis,
                                                    "yaxis": yaxis, **layout}})


def input_figure(image) -> go.Figure:
    """The (28, 28) model input (a tensor or an array), as the model sees it: white ink on black."""
    trace = {"type": "heatmap", "z": image.tolist(), "colorscale": SCALES["gray"], "zmin": 0, "zmax": 1,
             "showscale": False, "hovertemplate": "row %{y}, column %{x}: %{z:.2f}<extra></extra>"}
    return dict_figure(trace, 210, {"l": 0, "r": 0, "t": 0, "b": 0}, {"visible": False, "constrain": "domain"},
                       {"visible": False, "autorange": "reversed", "scaleanchor": "x", "constrain": "domain"})


def probability_figure(probabilities: list[float], digit: int) -> go.Figure:
    """The ten class probabilities as bars, the predicted `digit` highlighted."""
    trace = {"type": "bar", "x": DIGITS, "y": list(probabilities),
             "marker": {"color": [TOP if d == digit else OTHER for d in range(10)]},
             "text": [f"{p:.0%}" if p >= 0.005 else "" for p in probabilities],
             "textposition": "outside", "hovertemplate": "digit %{x}: %{y:.2%}<extra></extra>"}
    return dict_figure(trace, 280, BARS_MARGIN, {"title": {"text": "digit"}, "type": "category"},
                       {"title": {"text": "probability"}, "range": [0, 1.12], "tickformat": ".0%"}, showlegend=False)


def steps_figure(steps: list[list[float]], unit: str) -> go.Figure:
    """Class probabilities after each step (T, 10): how the belief forms as the LSTM reads the image."""
    trace = {"type": "heatmap", "z": steps, "x": DIGITS, "y": list(range(1, len(steps) + 1)),
             "colorscale": SCALES["Blues"], "zmin": 0, "zmax": 1,
             "colorbar": {"title": {"text": "p"}, "tickformat": ".0%"},
             "hovertemplate": f"after {unit} %{{y}}<br>digit %{{x}}: %{{z:.1%}}<extra></extra>"}
    return dict_figure(trace, 460, HEATMAP_MARGIN, {"title": {"text": "digit"}, "type": "category", "side": "top"},
                       {"title": {"text": f"{unit} read"}, "autorange": "reversed"},
                       title={"text": "Belief after each step", "y": 0.99})


def most_varying(hidden: list[list[float]], limit: int = MAX_HIDDEN_SHOWN) -> list[int]:
    """The units (columns of `hidden`, (T, H)) worth showing, in order: all of them up to `limit`, else the
    `limit` whose activation varies most over the steps."""
    width = len(hidden[0])
    if width <= limit:
        return list(range(width))
    variance = numpy.asarray(hidden, dtype=numpy.float64).var(axis=0)
    return sorted(numpy.argsort(-variance, kind="stable")[:limit].tolist())


def hidden_figure(hidden: list[list[float]], unit: str, limit: int = MAX_HIDDEN_SHOWN) -> go.Figure:
    """Last-layer activations over time (T, H); with many units, only the ones that vary most."""
    units = most_varying(hidden, limit)
    z = hidden if len(units) == len(hidden[0]) else [[row[u] for u in units] for row in hidden]
    shown = "" if len(units) == len(hidden[0]) else f" ({len(units)} of {len(hidden[0])}, most varying)"
    trace = {"type": "heatmap", "z": z, "x": [str(u) for u in units], "y": list(range(1, len(hidden) + 1)),
             "colorscale": SCALES["RdBu"], "zmid": 0, "colorbar": {"title": {"text": "h"}},
             "hovertemplate": f"{unit} %{{y}}, unit %{{x}}: %{{z:.3f}}<extra></extra>"}
    return dict_figure(trace, 460, HEATMAP_MARGIN,
                       {"title": {"text": "hidden unit"}, "type": "category", "side": "top", "showticklabels": False},
                       {"title": {"text": f"{unit} read"}, "autorange": "reversed"},
                       title={"text": f"Hidden state{shown}", "y": 0.99})


# each gate's letter in the cell's equations, on its colour bar
GATE_SYMBOLS = {"input gate": "i", "forget gate": "f", "output gate": "o", "cell state": "c", "reset gate": "r",
                "update gate": "z"}


def gates_figure(values: list[list[float]], name: str, unit: str, units: list[int] | None = None,
                 height: int = 380) -> go.Figure:
    """One of the last layer's gates over time (T, D*H) (preprocess.Prediction.gates), from 0 (shut) to 1
    (open); the "cell state", an LSTM's memory, is unbounded and diverges around 0, as the hidden state does.
    `units`: the columns to show (the hidden state figure's, so that a unit is the same column in every
    figure), else the most varying ones."""
    width = len(values[0])
    units = most_varying(values) if units is None else units
    z = values if len(units) == width else [[row[u] for u in units] for row in values]
    shown = "" if len(units) == width else f" ({len(units)} of {width} units)"
    scale = ({"colorscale": SCALES["RdBu"], "zmid": 0} if name == "cell state"
             else {"colorscale": SCALES["Blues"], "zmin": 0, "zmax": 1})
    trace = {"type": "heatmap", "z": z, "x": [str(u) for u in units], "y": list(range(1, len(values) + 1)), **scale,
             "colorbar": {"title": {"text": GATE_SYMBOLS.get(name, "")}},
             "hovertemplate": f"{unit} %{{y}}, unit %{{x}}: %{{z:.3f}}<extra></extra>"}
    return dict_figure(trace, height, HEATMAP_MARGIN,
                       {"title": {"text": "hidden unit"}, "type": "category", "side": "top", "showticklabels": False},
                       {"title": {"text": f"{unit} read"}, "autorange": "reversed"},
                       title={"text": f"{name.capitalize()}{shown}", "y": 0.99})


# -- a study: Optuna's own plots ---------------------------------------------------------------------
# name -> the optuna.visualization function that draws it
STUDY_PLOTS = {"history": "plot_optimization_history", "intermediate": "plot_intermediate_values",
               "contour": "plot_contour", "importances": "plot_param_importances",
               "parallel": "plot_parallel_coordinate", "slice": "plot_slice"}


def study_figure(study, kind: str, target: str, params: list[str] | None = None, height: int = 380) -> go.Figure:
    """One of Optuna's plots of `study` (a STUDY_PLOTS name), sized for a page; `target` names the trials'
    value, `params` are the contour's two axes. Optuna raises for a study it cannot plot yet."""
    import optuna.visualization as ov     # only the Tuning page draws these: the others need not load it
    if kind == "intermediate":
        fig = pruned_marked(ov.plot_intermediate_values(study), study, target)
    elif kind == "contour":
        fig = ov.plot_contour(study, params=params, target_name=target)
    else:
        fig = getattr(ov, STUDY_PLOTS[kind])(study, target_name=target)
    return whole_log_ticks(fig).update_layout(height=height, margin={"l": 10, "r": 10, "t": 50, "b": 10})


def whole_log_ticks(fig: go.Figure) -> go.Figure:
    """Optuna's log axes (a log-scale parameter, such as lr, in the contour and slice plots) with log_axis's
    ticks in place of plotly's "0.001, 2, 3, ... 0.01": within the range Optuna gave the axis, where it gave
    one (the contour's colours fill it), else around the values plotted on it."""
    for key in list(fig.layout.to_plotly_json()):
        if not re.fullmatch(r"[xy]axis\d*", key) or fig.layout[key].type != "log":
            continue
        letter, anchor = key[0], key[0] + key[5:]           # yaxis2 -> the traces on "y2"
        axis = fig.layout[key]
        if axis.range:
            settings = {k: v for k, v in log_axis([10 ** end for end in axis.range]).items() if k != "range"}
        else:
            settings = log_axis(v for trace in fig.data if (getattr(trace, f"{letter}axis") or letter) == anchor
                                for v in getattr(trace, letter) or ())
        axis.update(settings)
    return fig


def pruned_marked(fig: go.Figure, study, target: str) -> go.Figure:
    """Optuna draws every trial's curve alike: dash the pruned ones and cross their last step."""
    pruned = {f"Trial{t.number}" for t in study.get_trials(deepcopy=False) if t.state.name == "PRUNED"}
    ends = [(trace.x[-1], trace.y[-1], trace.name) for trace in fig.data if trace.name in pruned]
    fig.update_traces(showlegend=False)      # one entry per trial would outgrow the plot
    fig.for_each_trace(lambda t: t.update(line_dash="dot"), selector=lambda t: t.name in pruned)
    if ends:
        fig.add_trace(go.Scatter(x=[e[0] for e in ends], y=[e[1] for e in ends], text=[e[2] for e in ends],
                                 mode="markers", name="pruned", marker={"symbol": "x", "size": 11, "color": "#d62728"},
                                 hovertemplate="%{text} pruned at epoch %{x}<extra></extra>"))
    fig.update_layout(showlegend=bool(ends), legend=legend_below())
    return fig.update_xaxes(title_text="epoch", dtick=1).update_yaxes(title_text=target)
