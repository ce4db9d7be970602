"""Every figure the pages draw, built without Streamlit: what each one plots, the Draw page's figures built
without plotly's validation (and what that would have made of them), and a study's Optuna plots."""
import math

import optuna
import plotly.graph_objects as go
import pytest
import torch

from lstm_core import plots

CM = [[10 if i == j else (2 if j == (i + 1) % 10 else 0) for j in range(10)] for i in range(10)]
EPOCHS = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_accuracy": 1 - 0.1 / e,
           "val_accuracy": 1 - 0.12 / e} for e in (1, 2, 3)]


def test_curves_figure_has_train_and_validation_loss_and_accuracy():
    fig = plots.curves_figure(EPOCHS)
    assert [t.name for t in fig.data] == ["train", "validation", "train", "validation"]
    assert list(fig.data[1].y) == [r["val_loss"] for r in EPOCHS] and list(fig.data[3].x) == [1, 2, 3]


def test_running_loss_figure_puts_batches_on_a_fractional_epoch_axis():
    batches = [{"epoch": 1, "batch": 5, "batches": 10, "loss": 0.9, "accuracy": 0.7},
               {"epoch": 2, "batch": 10, "batches": 10, "loss": 0.5, "accuracy": 0.9}]
    fig = plots.running_loss_figure(batches)
    assert list(fig.data[0].x) == [0.5, 2.0] and list(fig.data[1].y) == [0.7, 0.9]


def test_gradient_figure_plots_norms_on_a_log_axis_and_the_clipped_share():
    batches = [{"epoch": 1, "batch": 5, "batches": 10, "grad_norm": 0.5, "grad_norm_max": 0.9,
                "layer_grad_norms": {"lstm 1": 0.4, "head": 0.2}, "clip_fraction": 0.2, "nonfinite_steps": 0},
               {"epoch": 1, "batch": 10, "batches": 10, "grad_norm": 40.0, "grad_norm_max": 900.0,
                "layer_grad_norms": {"lstm 1": 39.0, "head": 5.0}, "clip_fraction": 1.0, "nonfinite_steps": 2},
               {"epoch": 1, "batch": 10, "batches": 10, "loss": 0.3}]          # a record from before gradient health
    fig = plots.gradient_figure(batches)
    names = [t.name for t in fig.data]
    assert names[:4] == ["total (mean)", "total (max)", "lstm 1", "head"] and "clipped steps" in names
    assert list(fig.data[0].y) == [0.5, 40.0] and list(fig.data[2].y) == [0.4, 39.0]
    assert fig.layout.yaxis.type == "log"
    assert list(fig.data[names.index("clipped steps")].y) == [0.2, 1.0]
    assert "non-finite" in names and fig.layout.shapes[0].x0 == 1.0     # the window with non-finite steps, marked
    unclipped = plots.gradient_figure([{**b, "clip_fraction": None, "nonfinite_steps": 0} for b in batches[:2]])
    assert "clipped steps" not in [t.name for t in unclipped.data] and not unclipped.layout.shapes


def test_step_gradient_figure_draws_the_first_and_latest_moments_on_the_sequence_axis():
    batches = [{"epoch": 1, "batch": b, "batches": 10, "step_grad_norms": [10.0 ** (k - 28 + b) for k in range(28)]}
               for b in range(1, 11)] + [{"epoch": 1, "batch": 10, "batches": 10, "loss": 0.3}]  # one from before
    fig = plots.step_gradient_figure(batches, sequence_steps=28, lines=3)
    assert [t.name for t in fig.data] == ["epoch 0.10", "epoch 0.50", "epoch 1.00"]       # first, middle, latest
    assert list(fig.data[0].x) == list(range(1, 29)) and fig.data[-1].y[-1] == 1e9
    assert fig.layout.yaxis.type == "log" and not fig.layout.annotations
    assert fig.data[-1].line.width > fig.data[0].line.width                           # the latest stands out
    # 784 pixels in 28 spans: each point sits in the middle of its 28 pixels; an underflowed 0 is left out, noted
    pixels = plots.step_gradient_figure([{**batches[0], "step_grad_norms": [0.0] * 20 + [1e-3] * 8}], 784)
    assert pixels.data[0].x[0] == 14.5 and pixels.data[0].x[-1] == 770.5
    assert pixels.data[0].y[:20] == (None,) * 20 and "underflow" in pixels.layout.annotations[0].text
    assert not plots.step_gradient_figure(batches[-1:], 28).data                      # nothing recorded: empty


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_figure_counts_or_row_fractions(normalize):
    z = plots.confusion_figure(CM, normalize=normalize).data[0].z
    if normalize:
        assert all(sum(row) == pytest.approx(1.0) for row in z) and z[0][0] == pytest.approx(10 / 12)
    else:
        assert [list(row) for row in z] == CM


def test_confusion_difference_is_b_minus_a_on_a_symmetric_scale():
    b = [[v + (3 if i == j == 4 else 0) for j, v in enumerate(row)] for i, row in enumerate(CM)]
    heatmap = plots.confusion_difference_figure(CM, b).data[0]
    assert heatmap.z[4][4] == 3 and sum(map(sum, heatmap.z)) == 3 and (heatmap.zmin, heatmap.zmax) == (-3, 3)


def test_overlay_and_per_class_figures():
    overlay = plots.overlay_figure({"a": EPOCHS, "b": EPOCHS[:2]}, "val_loss")
    assert [t.name for t in overlay.data] == ["a", "b"]
    assert list(overlay.data[1].y) == [r["val_loss"] for r in EPOCHS[:2]]
    per_class = [{"digit": d, "precision": 0.9, "recall": 0.8, "f1": 0.85} for d in range(10)]
    bars = plots.per_class_figure(per_class)
    assert [t.name for t in bars.data] == ["precision", "recall", "f1"] and list(bars.data[1].y) == [0.8] * 10


# -- axes that read at a glance -------------------------------------------------------------------------
def window(epoch, batch, **record):
    return {"epoch": epoch, "batch": batch, "batches": 4, **record}


# gradient norms over 0.12 ... 3.5 (plotly's own log ticks would read 0.2 and 0.5 as "2" and "5")
NORMS = [window(e, b, loss=1.0, accuracy=0.19 + 0.62 * (4 * (e - 1) + b - 1) / 7, grad_norm=0.12 * 3 ** (b - 1),
                grad_norm_max=3.5, layer_grad_norms={"lstm 1": 0.2, "head": 0.15}, clip_fraction=b / 4,
                nonfinite_steps=0, step_grad_norms=[5e-6 * 1.25 ** k for k in range(28)])   # 5e-6 ... 2.1e-3
         for e in (1, 2) for b in (1, 2, 3, 4)]
LOG_FIGURES = {"gradient": lambda: plots.gradient_figure(NORMS), "steps": lambda: plots.step_gradient_figure(NORMS, 28)}


def ticks(axis) -> list[tuple[float, str]]:
    assert axis.tickmode == "array", "plotly's own ticks"
    return list(zip(axis.tickvals, axis.ticktext))


def assert_whole_log_ticks(axis) -> None:
    """At least three ticks in sight, each a round value of its decade, labelled by the value itself."""
    assert axis.type == "log"
    shown = [(v, t) for v, t in ticks(axis) if axis.range[0] <= math.log10(v) <= axis.range[1]]
    assert len(shown) >= 3
    for value, text in shown:
        assert float(text) == value                                  # "0.5" for 0.5, never "5" or "500m"
        mantissa = value / 10 ** math.floor(math.log10(value))
        assert round(mantissa, 9) in (1, 2, 3, 5, 7)


@pytest.mark.parametrize("name", LOG_FIGURES)
def test_a_log_axis_names_each_tick_by_its_whole_value(name):
    fig = LOG_FIGURES[name]()
    axis = fig.layout.yaxis
    assert_whole_log_ticks(axis)
    plotted = [v for trace in fig.data if trace.yaxis in (None, "y") and trace.y for v in trace.y if v]
    assert 10 ** axis.range[0] <= min(plotted) and max(plotted) <= 10 ** axis.range[1]


def test_log_ticks_are_denser_the_fewer_decades_the_values_span():
    assert plots.log_axis([0.12, 3.5])["ticktext"] == ["0.1", "0.2", "0.5", "1", "2", "5"]
    assert plots.log_axis([0.3, 0.8])["ticktext"] == ["0.3", "0.5", "0.7", "1"]
    assert plots.log_axis([5e-6, 2e-3])["ticktext"] == ["1e-6", "1e-5", "1e-4", "0.001", "0.01"]
    assert plots.log_axis([1e-30, 10, None, 0.0, float("nan")])["ticktext"] == [
        "1e-30", "1e-24", "1e-18", "1e-12", "1e-6", "1", "1e6"]           # every sixth decade; no 0 on a log axis
    assert plots.log_axis([0.0, None]) == {"type": "log"}


PERCENT_AXES = {                # the figure, and the axis of its fractions
    "curves accuracy": (lambda: plots.curves_figure(EPOCHS), "yaxis2"),
    "running accuracy": (lambda: plots.running_loss_figure(NORMS), "yaxis2"),
    "clipped steps": (lambda: plots.gradient_figure(NORMS), "yaxis2"),
    "overlay accuracy": (lambda: plots.overlay_figure({"a": EPOCHS}, "val_accuracy"), "yaxis"),
    "per-class": (lambda: plots.per_class_figure([{"digit": d, "precision": 0.9 + d / 100, "recall": 0.86,
                                                   "f1": 0.88} for d in range(10)]), "yaxis"),
}


@pytest.mark.parametrize("name", PERCENT_AXES)
def test_a_percent_axis_ticks_at_multiples_of_a_round_step(name):
    build, axis_name = PERCENT_AXES[name]
    fig = build()
    axis = fig.layout[axis_name]
    values, texts = zip(*ticks(axis))
    assert [float(t.rstrip("%")) / 100 for t in texts] == pytest.approx(values)      # the text reads the value
    step = values[1] - values[0]
    assert round(step, 9) in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    assert all(abs(v / step - round(v / step)) < 1e-6 for v in values)            # 20%, 40%; never 19%, 81%
    assert 2 <= len(values) <= 6
    anchor = axis_name.replace("axis", "")
    plotted = [v for trace in fig.data if (trace.yaxis or "y") == anchor for v in trace.y if v is not None]
    assert plotted and axis.range[0] <= min(plotted) and max(plotted) <= axis.range[1]


def test_the_running_accuracy_ticks_at_round_percentages():
    """The accuracy of the windows in NORMS goes from 19% to 81%: its axis names 0%, 20%, ..., 100%."""
    assert plots.running_loss_figure(NORMS).layout.yaxis2.ticktext == ("0%", "20%", "40%", "60%", "80%", "100%")


def test_the_clipped_share_has_its_own_axis_below_the_norms():
    """Bars laid over the norms hid them and crowded the axes: the bars get a row, and an axis, of their own."""
    fig = plots.gradient_figure(NORMS)
    (bars,) = [t for t in fig.data if t.type == "bar"]
    assert (bars.xaxis, bars.yaxis) == ("x2", "y2") and fig.layout.yaxis2.overlaying is None
    assert fig.layout.yaxis2.domain[1] < fig.layout.yaxis.domain[0]
    assert fig.layout.xaxis.matches == "x2" and fig.layout.xaxis2.title.text == "epoch"   # one epoch axis, at the foot
    assert all(t.yaxis in (None, "y") for t in fig.data if t.type != "bar")           # the norms, above


LEGEND_FIGURES = {"curves": lambda: plots.curves_figure(EPOCHS), "running": lambda: plots.running_loss_figure(NORMS),
                  **LOG_FIGURES, "per-class": PERCENT_AXES["per-class"][0]}


@pytest.mark.parametrize("name", LEGEND_FIGURES)
def test_a_legend_below_a_plot_sits_under_its_axis_labels(name):
    """Placed against the whole figure, at its foot, plotly fits the plot area above the legend however many
    lines it wraps to in a narrow column; placed a fraction of the plot area below it, it covered the
    epoch labels."""
    legend = LEGEND_FIGURES[name]().layout.legend
    assert (legend.orientation, legend.yref, legend.y, legend.yanchor) == ("h", "container", 0, "bottom")


# -- the Draw page's figures ---------------------------------------------------------------------------
HIDDEN = torch.linspace(-1, 1, 28 * 100).reshape(28, 100)
HIDDEN[:, 7] *= 0      # a unit that never moves
IMAGE = torch.rand(28, 28, generator=torch.Generator().manual_seed(0))
STEPS = torch.softmax(torch.randn(28, 10, generator=torch.Generator().manual_seed(0)), 1).tolist()
DRAW_FIGURES = {
    "input": lambda: plots.input_figure(IMAGE),
    "probabilities": lambda: plots.probability_figure([0.02] * 3 + [0.82] + [0.02] * 6, 3),
    "steps": lambda: plots.steps_figure(STEPS, "row"),
    "hidden": lambda: plots.hidden_figure(HIDDEN.tolist(), "pixel", limit=64),
}


@pytest.mark.parametrize("name", DRAW_FIGURES)
def test_a_draw_figure_is_what_plotly_validation_would_make_of_it(name):
    fig = DRAW_FIGURES[name]()
    assert isinstance(fig, go.Figure)
    assert go.Figure(fig.to_dict()).to_dict() == fig.to_dict()      # validating it changes nothing


def test_this_plotly_builds_the_draw_figures_unvalidated():
    DRAW_FIGURES[next(iter(DRAW_FIGURES))]()
    assert plots.UNVALIDATED                  # the fast path is the one in use here, asked at the first figure


@pytest.mark.parametrize("version", ["5.19.0", "8.0.0", "9.1"])
def test_a_plotly_outside_the_tested_releases_is_not_asked(monkeypatch, version):
    monkeypatch.setattr(plots.plotly, "__version__", version)
    assert plots.skips_validation() is False


@pytest.mark.parametrize("name", DRAW_FIGURES)
def test_without_the_private_flag_the_same_figure_is_built_validated(name, monkeypatch):
    fast = DRAW_FIGURES[name]().to_dict()
    monkeypatch.setattr(plots, "UNVALIDATED", False)
    assert DRAW_FIGURES[name]().to_dict() == fast


@pytest.mark.parametrize("refusal", [TypeError, ValueError])
def test_a_plotly_that_refuses_the_private_flag_is_noticed(monkeypatch, refusal):
    def figure(*args, **kwargs):
        if "_validate" in kwargs:
            raise refusal("invalid Figure property: _validate")
        return go.Figure(*args, **kwargs)
    monkeypatch.setattr(plots.go, "Figure", figure)
    assert plots.skips_validation() is False


def test_the_probability_bars_mark_the_predicted_digit():
    bars = plots.probability_figure([0.02] * 3 + [0.82] + [0.02] * 6, 3).data[0]
    assert [c == plots.TOP for c in bars.marker.color] == [d == 3 for d in range(10)]
    assert list(bars.x) == [str(d) for d in range(10)] and bars.text[3] == "82%"


def test_the_hidden_state_keeps_the_units_that_vary_most():
    hidden = [[float(u * t) for u in range(5)] for t in range(4)]     # unit u varies as u
    assert plots.most_varying(hidden, limit=10) == [0, 1, 2, 3, 4]
    assert plots.most_varying(hidden, limit=2) == [3, 4]
    fig = plots.hidden_figure(HIDDEN.tolist(), "pixel", limit=64)
    heatmap = fig.data[0]
    assert len(heatmap.x) == 64 and "7" not in heatmap.x and len(heatmap.z) == 28
    assert heatmap.z[0][0] == HIDDEN[0, int(heatmap.x[0])].item()
    assert fig.layout.title.text == "Hidden state (64 of 100, most varying)"
    assert plots.hidden_figure(HIDDEN[:, :10].tolist(), "row").layout.title.text == "Hidden state"


# -- a study --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study() -> optuna.Study:
    """Three complete trials and one pruned, over two parameters (in memory)."""
    study = optuna.create_study(direction="maximize")
    distributions = {"hidden_size": optuna.distributions.IntDistribution(8, 64),
                     "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for hidden, lr, value in ((16, 1e-3, 0.8), (32, 1e-2, 0.9), (64, 3e-2, 0.85)):
        study.add_trial(optuna.trial.create_trial(params={"hidden_size": hidden, "lr": lr}, value=value,
                                                  intermediate_values={1: value - 0.1, 2: value},
                                                  distributions=distributions))
    study.add_trial(optuna.trial.create_trial(params={"hidden_size": 8, "lr": 1e-4}, distributions=distributions,
                                              state=optuna.trial.TrialState.PRUNED, intermediate_values={1: 0.2}))
    return study


TITLES = {"history": "Optimization History Plot", "intermediate": "Intermediate Values Plot",
          "contour": "Contour Plot", "importances": "Hyperparameter Importances",
          "parallel": "Parallel Coordinate Plot", "slice": "Slice Plot"}


@pytest.mark.parametrize("kind", plots.STUDY_PLOTS)
def test_each_of_optunas_plots_of_a_study(study, kind):
    fig = plots.study_figure(study, kind, "val accuracy", params=["hidden_size", "lr"], height=300)
    assert fig.layout.title.text == TITLES[kind] and fig.layout.height == 300


@pytest.mark.parametrize("kind, axis", [("contour", "yaxis"), ("slice", "xaxis2")])
def test_optunas_log_axes_name_each_tick_by_its_whole_value(study, kind, axis):
    """lr, searched on a log scale, read "0.001, 2, 3, ... 0.01" on plotly's own ticks."""
    fig = plots.study_figure(study, kind, "val accuracy", params=["hidden_size", "lr"])
    assert fig.layout[axis].title.text == "lr"
    assert_whole_log_ticks(fig.layout[axis])


def test_pruned_trials_are_dotted_and_crossed_where_they_stopped(study):
    fig = plots.study_figure(study, "intermediate", "val accuracy")
    curves = {t.name: t for t in fig.data}
    assert curves["Trial3"].line.dash == "dot" and curves["Trial0"].line.dash is None
    assert (list(curves["pruned"].x), list(curves["pruned"].y)) == ([1], [0.2])
    assert fig.layout.yaxis.title.text == "val accuracy"


def test_the_gradient_over_time_of_several_runs_shares_one_axis_of_the_sequence_read():
    """An RNN on pixels (784 steps) beside an LSTM on rows (28): each line spans the whole axis, its points
    in the middle of their spans, the hover naming the steps each one stands for."""
    runs = {"r1 · LSTM · 98.9%": {"norms": [1.0] * 28, "steps": 28, "epoch": 2.0},
            "r2 · RNN · 11.4%": {"norms": [0.0] * 4 + [10.0 ** (k - 23) for k in range(24)], "steps": 784,
                                 "epoch": 1.5}}
    fig = plots.step_gradient_overlay_figure(runs)
    assert [t.name for t in fig.data] == list(runs)
    lstm, rnn = fig.data
    assert list(lstm.x) == list(rnn.x)
    assert lstm.x[0] == pytest.approx(0.5 / 28) and lstm.x[-1] == pytest.approx(27.5 / 28)
    assert (lstm.customdata[0], lstm.customdata[-1]) == ("step 1", "step 28")
    assert (rnn.customdata[0], rnn.customdata[-1]) == ("steps 1–28", "steps 757–784")
    assert "of 784" in rnn.hovertemplate and "epoch 1.50" in rnn.hovertemplate
    assert rnn.y[:4] == (None,) * 4 and rnn.y[-1] == 1.0 and "underflow" in fig.layout.annotations[0].text
    assert fig.layout.yaxis.type == "log" and tuple(fig.layout.xaxis.range) == (0, 1)
    assert "share of each run's sequence" in fig.layout.xaxis.title.text
    assert not plots.step_gradient_overlay_figure({}).data


# -- the Draw page's gates -------------------------------------------------------------------------------
GATES = torch.sigmoid(3 * HIDDEN)          # (28, 100) in (0, 1); unit 7 sits at 0.5 throughout


@pytest.mark.parametrize("name", ["forget gate", "cell state"])
def test_a_gate_figure_is_what_plotly_validation_would_make_of_it(name):
    fig = plots.gates_figure(GATES.tolist(), name, "row")
    assert go.Figure(fig.to_dict()).to_dict() == fig.to_dict()


def test_a_gate_runs_from_shut_to_open_and_the_cell_state_around_zero():
    gate = plots.gates_figure(GATES.tolist(), "forget gate", "row").data[0]
    assert (gate.zmin, gate.zmax, gate.zmid) == (0, 1, None) and gate.colorbar.title.text == "f"
    cell = plots.gates_figure((3 * HIDDEN).tolist(), "cell state", "row").data[0]
    assert (cell.zmin, cell.zmax, cell.zmid) == (None, None, 0) and cell.colorbar.title.text == "c"


def test_a_gate_figure_shows_the_units_it_is_given_else_the_most_varying():
    fig = plots.gates_figure(GATES.tolist(), "input gate", "pixel")
    heatmap = fig.data[0]
    assert len(heatmap.x) == 64 and "7" not in heatmap.x and len(heatmap.z) == 28
    assert fig.layout.title.text == "Input gate (64 of 100 units)" and fig.layout.yaxis.title.text == "pixel read"
    units = [7, 50, 99]                       # the hidden state figure's, so that the columns line up
    heatmap = plots.gates_figure(GATES.tolist(), "input gate", "row", units).data[0]
    assert list(heatmap.x) == ["7", "50", "99"] and list(heatmap.z[5]) == GATES[5, units].tolist()
    assert plots.gates_figure(GATES[:, :10].tolist(), "reset gate", "row").layout.title.text == "Reset gate"
