"""The train/eval loss curve as a small SVG picture (final/loss-curve.svg, shown by final/report.md).

A line chart of two series is a few dozen lines of SVG; a plotting library (matplotlib: tens of MB) in the trainer
image for it would cost more than it saves. Pure: history in, SVG text out.
"""

from __future__ import annotations

import math
from typing import Any
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 24, 40  # margins for the axes' labels
TICKS = 5
COLORS = {"train": "#1f77b4", "eval": "#d62728"}


def _finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if isinstance(y, (int, float)) and math.isfinite(y)]


def loss_curve_svg(history: list[dict[str, Any]], eval_history: list[dict[str, Any]]) -> str:
    """SVG of train loss per step (and eval loss where evaluated); '' when there is nothing to draw."""
    series = {"train": _finite([(float(h["step"]), h.get("loss")) for h in history]),
              "eval": _finite([(float(e["step"]), e.get("loss")) for e in eval_history])}
    everything = series["train"] + series["eval"]
    if not everything:
        return ""
    x0, x1 = min(x for x, _ in everything), max(x for x, _ in everything)
    y0, y1 = min(y for _, y in everything), max(y for _, y in everything)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
           '<title>Training and evaluation loss by optimizer step</title>',
           f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for i in range(TICKS + 1):
        y = y0 + (y1 - y0) * i / TICKS
        x = x0 + (x1 - x0) * i / TICKS
        out.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        out.append(f'<text x="{px(x):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle">step</text>')
    out.append(f'<text x="14" y="{TOP + plot_h / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {TOP + plot_h / 2:.0f})">loss</text>')
    for row, (name, points) in enumerate((k, v) for k, v in series.items() if v):
        color = COLORS[name]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        if len(points) > 1:
            out.append(f'<polyline class="{name}" fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        for x, y in points if len(points) <= 50 or name == "eval" else []:
            out.append(f'<circle class="{name}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>')
        out.append(f'<text x="{WIDTH - RIGHT - 4}" y="{TOP + 14 + 14 * row}" text-anchor="end" fill="{color}">'
                   f'{escape(name)} loss</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
