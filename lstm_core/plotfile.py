"""A self-contained SVG of a run's curves (loss, accuracy, error; train and validation per epoch).

Plain SVG text: it opens in any browser or image viewer, offline, and weighs a few kilobytes, where a
plotly HTML file carries megabytes of JavaScript and a PNG would need an extra renderer.
"""
from __future__ import annotations

import math
from html import escape

PANELS = [("loss", "train_loss", "val_loss"), ("accuracy", "train_accuracy", "val_accuracy"),
          ("error", "train_error", "val_error")]
COLORS = {"train": "#1f77b4", "validation": "#ff7f0e"}
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 360, 260, 56, 14, 34, 40


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= step * m)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def panel(x0: float, name: str, series: dict[str, list[tuple[int, float]]]) -> list[str]:
    points = [p for values in series.values() for p in values]
    out = [f'<g transform="translate({x0},0)">',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-weight="bold">{escape(name)}</text>']
    if not points:
        out += [f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#888">no finished epoch</text>', "</g>"]
        return out
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1), y_hi + 0.5 * (abs(y_hi) or 1)
    sx = lambda x: PAD_L + (x - x_lo) / (x_hi - x_lo) * (W - PAD_L - PAD_R)  # noqa: E731
    sy = lambda y: H - PAD_B - (y - y_lo) / (y_hi - y_lo) * (H - PAD_T - PAD_B)  # noqa: E731
    out.append(f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
               'fill="none" stroke="#ccc"/>')
    for t in nice_ticks(y_lo, y_hi):
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{PAD_L - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="10">{t:.4g}</text>')
    for t in nice_ticks(x_lo, x_hi):
        if float(t).is_integer():
            out.append(f'<text x="{sx(t):.1f}" y="{H - PAD_B + 14}" text-anchor="middle" font-size="10">{int(t)}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="11">epoch</text>')
    for label, values in series.items():
        if values:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
            out.append(f'<polyline points="{path}" fill="none" stroke="{COLORS[label]}" stroke-width="2"/>')
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{COLORS[label]}"/>' for x, y in values]
    out.append("</g>")
    return out


def curves_svg(epochs: list[dict], title: str = "") -> str:
    """epochs: the `epoch` records of metrics.jsonl -> an SVG document with three panels."""
    body = []
    for i, (name, train_key, val_key) in enumerate(PANELS):
        series = {label: [(r["epoch"], float(r[key])) for r in epochs
                          if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
                  for label, key in (("train", train_key), ("validation", val_key))}
        body += panel(i * W, name, series)
    legend = "".join(f'<rect x="{10 + i * 110}" y="{H + 6}" width="12" height="12" fill="{c}"/>'
                     f'<text x="{26 + i * 110}" y="{H + 16}" font-size="12">{n}</text>'
                     for i, (n, c) in enumerate(COLORS.items()))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{3 * W}" height="{H + 26}" '
            f'font-family="sans-serif" font-size="12"><title>{escape(title)}</title>'
            f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}{legend}</svg>\n')
