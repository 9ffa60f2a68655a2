"""Signals per rule per day as an inline SVG (no script: the page works with JavaScript off and
under a strict Content-Security-Policy): one polyline per rule, the days on the x axis."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT, PAD = 860, 220, 36
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


def daily_chart(counts: Sequence[tuple[str, str, int]]) -> str:
    """`counts` is (YYYY-MM-DD, rule id, signals), as `SignalDB.counts_by_day` gives it."""
    if not counts:
        return ""
    first = datetime.date.fromisoformat(min(day for day, _, _ in counts))
    last = datetime.date.fromisoformat(max(day for day, _, _ in counts))
    days = (last - first).days + 1
    rules = sorted({rule for _, rule, _ in counts})
    top = max(n for _, _, n in counts)
    series: dict[str, list[int]] = {rule: [0] * days for rule in rules}
    for day, rule, n in counts:
        series[rule][(datetime.date.fromisoformat(day) - first).days] = n

    def x(i: int) -> float:
        return PAD + (WIDTH - 2 * PAD) * (i / (days - 1) if days > 1 else 0.5)

    def y(n: int) -> float:
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * n / top

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 18 * len(rules)}" role="img" '
             f'aria-label="signals per rule per day">',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
             'stroke="#999"/>',
             f'<text x="4" y="{PAD}" class="axis">{top}</text>',
             f'<text x="4" y="{HEIGHT - PAD}" class="axis">0</text>',
             f'<text x="{PAD}" y="{HEIGHT - 10}" class="axis">{first.isoformat()}</text>',
             f'<text x="{WIDTH - PAD}" y="{HEIGHT - 10}" class="axis" text-anchor="end">'
             f'{last.isoformat()}</text>']
    for index, rule in enumerate(rules):
        color = COLORS[index % len(COLORS)]
        points = " ".join(f"{x(i):.1f},{y(n):.1f}" for i, n in enumerate(series[rule]))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{points}"><title>{escape(rule)}</title></polyline>')
        legend_y = HEIGHT + 14 + 18 * index
        parts.append(f'<rect x="{PAD}" y="{legend_y - 10}" width="12" height="12" '
                     f'fill="{color}"/><text x="{PAD + 18}" y="{legend_y}" class="legend">'
                     f'{escape(rule)} ({sum(series[rule])})</text>')
    parts.append("</svg>")
    return "".join(parts)
