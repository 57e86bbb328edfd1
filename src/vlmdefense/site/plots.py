"""The site's SVG figures: the diagram of the three paradigms, and one ε sweep per method and profile.

The geometry is computed here; the markup is in ``templates/paradigms.svg.j2`` and ``templates/sweep.svg.j2``
(escaped by the engine). Written directly, without matplotlib, because every method page with a result has
a sweep and the build must stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmdefense.catalog.schema import Entry
from vlmdefense.runs.records import Result
from vlmdefense.site.data import SiteData
from vlmdefense.site.labels import PARADIGM_COLOURS
from vlmdefense.site.render import render

WHEN = {
    "training-time": ("before deployment", "trains weights or prompts once", "pays in training compute"),
    "test-time-adaptation": ("at inference, per input", "tunes prompts or parameters", "pays per prediction"),
    "training-free": ("at inference, nothing learned", "processes input, features, output", "plugs into any model"),
}
"""When each paradigm intervenes, what it changes, what it costs: the three lines under its title."""


@dataclass
class Series:
    """One line of a sweep: its legend label, (ε, accuracy %) points, colour, and whether it is dashed."""

    label: str
    points: list[tuple[float, float]]
    colour: str
    dashed: bool = False


def paradigm_diagram(data: SiteData) -> str:
    """An SVG of the three paradigms: when each intervenes, what it changes, its families and counts."""
    col, gap, margin, top = 320, 24, 12, 92
    width = 2 * margin + 3 * col + 2 * gap
    boxes: list[dict[str, Any]] = []
    for index, info in enumerate(data.catalog.taxonomy.paradigms):
        x = margin + index * (col + gap)
        entries = data.entries_of(info.id)
        y = top + 84
        lines = []
        for line in WHEN.get(info.id.value, ("", "", "")):
            lines.append({"y": y, "text": line})
            y += 24
        y += 12
        families = []
        for family in info.families:
            families.append({"y": y, "name": family.name, "count": sum(e.family == family.id for e in entries)})
            y += 36
        boxes.append(
            {
                "x": x,
                "centre": x + col / 2,
                "colour": PARADIGM_COLOURS.get(info.id.value, "#555"),
                "name": info.name,
                "methods": len(entries),
                "lines": lines,
                "families": families,
                "bottom": y,
            }
        )
    height = max((b["bottom"] for b in boxes), default=top + 100) + 10
    return render(
        "paradigms.svg.j2",
        width=width,
        height=height,
        col=col,
        top=top,
        arrow_y=40,
        arrow_labels=(margin + col / 2, margin + 2 * col + 1.5 * gap, width / 2),
        divider=margin + col + gap / 2,
        boxes=boxes,
    )


def svg_sweep(series: list[Series], title: str) -> str:
    """A small SVG line chart of accuracy (%) against ε (×1/255), one :class:`Series` per line."""
    width, height = 640, 320
    left, right, top, bottom = 52, 170, 34, 44
    xs = [x * 255 for s in series for x, _ in s.points] or [0.0, 1.0]
    x_max = max(max(xs), 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + plot_w * (x * 255) / x_max

    def py(y: float) -> float:
        return top + plot_h * (1 - y / 100)

    lines = [
        {
            "label": s.label,
            "colour": s.colour,
            "dashed": s.dashed,
            "points": [(px(x), py(y)) for x, y in s.points],
            "legend": (left + plot_w + 12, top + 12 + 20 * index),
        }
        for index, s in enumerate(series)
    ]
    return render(
        "sweep.svg.j2",
        width=width,
        height=height,
        left=left,
        top=top,
        plot_w=plot_w,
        plot_h=plot_h,
        title=title,
        y_ticks=[(py(tick), tick) for tick in range(0, 101, 20)],
        x_ticks=[(left + plot_w * tick / x_max, tick) for tick in sorted({round(x, 3) for x in xs})],
        lines=lines,
    )


def method_plot(entry: Entry, result: Result, baseline: Result | None) -> str:
    """The ε sweep of one method in one profile: the undefended baseline, the method, and its adaptive attack."""
    from vlmdefense.workbench.report import sweep

    colour = PARADIGM_COLOURS.get(entry.paradigm.value, "#d62728")
    series = []
    if baseline is not None and baseline.method != result.method:
        series.append(Series("undefended", sweep(baseline, False), "#777777"))
    series.append(Series(entry.name, sweep(result, False), colour))
    if any(r.adaptive for r in result.robust):
        series.append(Series(f"{entry.name} (adaptive)", sweep(result, True), colour, dashed=True))
    return svg_sweep([s for s in series if s.points], f"{entry.name} — {result.profile} profile")
