"""Signals per rule per day as an inline SVG (no script: the page works with JavaScript off and
under a strict Content-Security-Policy): a bar per day, stacked by rule, so no rule hides
another."""

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
    color = {rule: COLORS[i % len(COLORS)] for i, rule in enumerate(rules)}
    per_day: dict[int, list[tuple[str, int]]] = {}
    for day, rule, n in sorted(counts, key=lambda c: (c[0], rules.index(c[1]))):
        per_day.setdefault((datetime.date.fromisoformat(day) - first).days, []).append((rule, n))
    top = max(sum(n for _, n in bars) for bars in per_day.values())
    slot = (WIDTH - 2 * PAD) / days
    scale = (HEIGHT - 2 * PAD) / top
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 18 * len(rules)}" role="img" '
             f'aria-label="signals per rule per day">',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
             'stroke="#999"/>',
             f'<text x="4" y="{PAD}" class="axis">{top}</text>',
             f'<text x="4" y="{HEIGHT - PAD}" class="axis">0</text>',
             f'<text x="{PAD}" y="{HEIGHT - 10}" class="axis">{first.isoformat()}</text>',
             f'<text x="{WIDTH - PAD}" y="{HEIGHT - 10}" class="axis" text-anchor="end">'
             f'{last.isoformat()}</text>']
    for index, bars in per_day.items():
        x, y = PAD + index * slot + slot * 0.1, HEIGHT - PAD
        day = (first + datetime.timedelta(days=index)).isoformat()
        for rule, n in bars:
            height = n * scale
            y -= height
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(slot * 0.8, 1):.1f}" '
                         f'height="{height:.1f}" fill="{color[rule]}"><title>{day} '
                         f'{escape(rule)}: {n}</title></rect>')
    totals = {rule: sum(n for _, r, n in counts if r == rule) for rule in rules}
    for index, rule in enumerate(rules):
        legend_y = HEIGHT + 14 + 18 * index
        parts.append(f'<rect x="{PAD}" y="{legend_y - 10}" width="12" height="12" '
                     f'fill="{color[rule]}"/><text x="{PAD + 18}" y="{legend_y}" '
                     f'class="legend">{escape(rule)} ({totals[rule]})</text>')
    parts.append("</svg>")
    return "".join(parts)
