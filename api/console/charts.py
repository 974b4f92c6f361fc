"""Charts as geometry: the console draws them as SVG on the server (templates/_charts.html).

Pure functions from numbers to shapes with coordinates, colours and labels: no script in
the browser, nothing from the internet, and every colour a presentation attribute (the
Content-Security-Policy allows no inline style). Each chart also carries the words a
screen reader reads (`title`s, and the pages print the numbers in tables beside it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from core.condition_text import human_duration
from core.journeys import BranchStep, JourneyDefinition, WaitForEventStep

LIGHT = (0xEE, 0xF2, 0xF8)
DARK = (0x1F, 0x4E, 0x99)


def shade(t: float) -> str:
    """A colour from light (0) to dark blue (1)."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (round(a + (b - a) * t) for a, b in zip(LIGHT, DARK, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def ink(t: float) -> str:
    """Text that reads on `shade(t)`."""
    return "#ffffff" if t > 0.55 else "#1b2330"


def compact(value: float) -> str:
    """12,345 -> 12.3k; 1,234,567 -> 1.23M."""
    magnitude = abs(value)
    if magnitude >= 1_000_000:
        return f"{value / 1_000_000:.3g}M"
    if magnitude >= 10_000:
        return f"{value / 1_000:.3g}k"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}"


def _nice_top(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    kind: str
    title: str


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "middle"


@dataclass(frozen=True)
class Rule:
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class BarChart:
    width: float
    height: float
    bars: list[Bar]
    labels: list[Label]
    rules: list[Rule]
    description: str


def column_chart(
    points: list[tuple[str, float]],
    *,
    unit: str,
    width: float = 1160,
    height: float = 180,
    label_every: int = 1,
) -> BarChart:
    """Columns over categories (minutes, days), a y scale with three rules."""
    left, right, top, bottom = 44.0, 8.0, 10.0, 24.0
    # At least 4, so a quiet chart's scale reads 0, 2, 4 rather than fractions.
    top_value = _nice_top(max(max((v for _, v in points), default=0), 4))
    plot_w, plot_h = width - left - right, height - top - bottom
    step = plot_w / max(len(points), 1)
    bars, labels, rules = [], [], []
    for index, (name, value) in enumerate(points):
        h = plot_h * value / top_value
        bars.append(
            Bar(
                x=left + index * step + step * 0.12,
                y=top + plot_h - h,
                width=max(step * 0.76, 1.0),
                height=h,
                kind="bar",
                title=f"{name}: {value:,.0f} {unit}",
            )
        )
        if index % label_every == 0:
            labels.append(Label(left + index * step + step / 2, height - 6, name))
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - fraction)
        rules.append(Rule(left, y, width - right, y))
        labels.append(Label(left - 6, y + 4, compact(top_value * fraction), "end"))
    total = sum(v for _, v in points)
    return BarChart(
        width, height, bars, labels, rules, f"{total:,.0f} {unit} over {len(points)} periods"
    )


def diverging_chart(
    points: list[tuple[str, float, float]],
    *,
    width: float = 1160,
    height: float = 160,
    label_every: int = 1,
) -> BarChart:
    """Entries up and exits down per category, around one baseline."""
    left, right, top, bottom = 44.0, 8.0, 8.0, 22.0
    largest = _nice_top(max((max(up, down) for _, up, down in points), default=0))
    plot_w, plot_h = width - left - right, height - top - bottom
    middle = top + plot_h / 2
    step = plot_w / max(len(points), 1)
    bars, labels = [], []
    for index, (name, up, down) in enumerate(points):
        x = left + index * step + step * 0.15
        w = max(step * 0.7, 1.0)
        h_up, h_down = plot_h / 2 * up / largest, plot_h / 2 * down / largest
        bars.append(Bar(x, middle - h_up, w, h_up, "entered", f"{name}: {up:,.0f} entered"))
        bars.append(Bar(x, middle, w, h_down, "exited", f"{name}: {down:,.0f} exited"))
        if index % label_every == 0:
            labels.append(Label(left + index * step + step / 2, height - 5, name))
    labels += [
        Label(left - 6, top + 8, f"+{compact(largest)}", "end"),
        Label(left - 6, top + plot_h, f"-{compact(largest)}", "end"),
    ]
    rules = [Rule(left, middle, width - right, middle)]
    entered = sum(p[1] for p in points)
    exited = sum(p[2] for p in points)
    return BarChart(
        width,
        height,
        bars,
        labels,
        rules,
        f"{entered:,.0f} entered and {exited:,.0f} exited over {len(points)} days",
    )


def sparkline(
    points: list[tuple[str, float, float]], *, width: float = 140, height: float = 28
) -> BarChart:
    """A tiny diverging chart (entries up, exits down) for a table row."""
    largest = max((max(up, down) for _, up, down in points), default=0) or 1
    step = width / max(len(points), 1)
    middle = height / 2
    bars = []
    for index, (name, up, down) in enumerate(points):
        x, w = index * step + step * 0.1, max(step * 0.8, 1.0)
        h_up, h_down = (middle - 1) * up / largest, (middle - 1) * down / largest
        bars.append(Bar(x, middle - h_up, w, h_up, "entered", f"{name}: {up:,.0f} entered"))
        bars.append(Bar(x, middle, w, h_down, "exited", f"{name}: {down:,.0f} exited"))
    entered = sum(p[1] for p in points)
    exited = sum(p[2] for p in points)
    return BarChart(
        width,
        height,
        bars,
        [],
        [Rule(0, middle, width, middle)],
        f"{entered:,.0f} entered and {exited:,.0f} exited over {len(points)} days",
    )


PALETTE = (
    "#1f4e99", "#3b8ea5", "#2e8b57", "#9bbf3c", "#e0a526", "#d9693b", "#b3261e",
    "#8e4fb8", "#5b6677", "#c2607f", "#4a7bd0",
)  # fmt: skip


@dataclass(frozen=True)
class Segment:
    x: float
    width: float
    fill: str
    title: str
    label: str


@dataclass(frozen=True)
class Stack:
    width: float
    height: float
    parts: list[Segment]


def stacked_bar(
    items: list[tuple[str, float]], *, width: float = 1160, height: float = 30
) -> Stack:
    """Shares of a whole side by side, each labelled when it is wide enough."""
    total = sum(v for _, v in items) or 1
    parts, x = [], 0.0
    for index, (name, value) in enumerate(items):
        w = width * value / total
        parts.append(
            Segment(
                x=x,
                width=w,
                fill=PALETTE[index % len(PALETTE)],
                title=f"{name}: {value:,.0f} ({value / total:.1%})",
                label=name if w > 8 * len(name) + 12 else "",
            )
        )
        x += w
    return Stack(width, height, parts)


def label_colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class Cell:
    x: float
    y: float
    width: float
    height: float
    fill: str
    ink: str
    text: str
    title: str


@dataclass(frozen=True)
class Matrix:
    width: float
    height: float
    cells: list[Cell]
    labels: list[Label]
    description: str


def heat_map(
    rows: list[str],
    columns: list[str],
    values: list[list[int]],
    *,
    row_title: str,
    column_title: str,
    by_row: bool = False,
    cell: float = 64,
    left: float = 64,
) -> Matrix:
    """A grid of counts, darker for more: against the largest cell, or (`by_row`) against
    its row's total (a migration matrix reads as shares of where each row went)."""
    top = 34.0
    largest = max((max(row, default=0) for row in values), default=0) or 1
    cells, labels = [], []
    for i, (name, row) in enumerate(zip(rows, values, strict=True)):
        total = sum(row) or 1
        for j, (column, value) in enumerate(zip(columns, row, strict=True)):
            t = value / total if by_row else value / largest
            share = f" ({value / total:.0%} of {name})" if by_row and sum(row) else ""
            cells.append(
                Cell(
                    x=left + j * cell,
                    y=top + i * cell * 0.62,
                    width=cell - 2,
                    height=cell * 0.62 - 2,
                    fill=shade(t),
                    ink=ink(t),
                    text=compact(value),
                    title=f"{row_title} {name}, {column_title} {column}: {value:,}{share}",
                )
            )
        labels.append(Label(left - 8, top + i * cell * 0.62 + cell * 0.31 + 4, name, "end"))
    for j, column in enumerate(columns):
        labels.append(Label(left + j * cell + cell / 2, top - 10, column))
    width = left + len(columns) * cell + 4
    height = top + len(rows) * cell * 0.62 + 4
    return Matrix(width, height, cells, labels, f"{row_title} by {column_title}")


@dataclass(frozen=True)
class ForestRow:
    y: float
    label: str
    point: float | None
    low: float | None
    high: float | None
    significant: bool
    text: str


@dataclass(frozen=True)
class Forest:
    width: float
    height: float
    rows: list[ForestRow]
    zero_x: float
    labels: list[Label]
    rules: list[Rule]


def forest_plot(
    items: list[tuple[str, float | None, tuple[float, float] | None, bool]],
    *,
    width: float = 760,
) -> Forest:
    """Lift with its 95% interval per experience, around no lift (0%)."""
    left, right, row_h, top = 170.0, 24.0, 34.0, 26.0
    bounds = [0.0]
    for _, lift, interval, _ in items:
        if lift is not None:
            bounds.append(lift)
        if interval is not None:
            bounds += [interval[0], interval[1]]
    low, high = min(bounds), max(bounds)
    pad = (high - low) * 0.08 or 0.1
    # A lift is never below -100%: the scale stops there.
    low, high = max(low - pad, -1.0) if low >= -1.0 else low - pad, high + pad
    plot_w = width - left - right

    def x(value: float) -> float:
        return left + plot_w * (value - low) / (high - low)

    rows = []
    for index, (name, lift, interval, significant) in enumerate(items):
        y = top + index * row_h + row_h / 2
        text = "too few viewers to compare"
        if lift is not None:
            text = f"lift {lift:+.1%}"
            if interval is not None:
                text += f" (95% interval {interval[0]:+.1%} to {interval[1]:+.1%})"
        rows.append(
            ForestRow(
                y=y,
                label=name,
                point=x(lift) if lift is not None else None,
                low=x(interval[0]) if interval is not None else None,
                high=x(interval[1]) if interval is not None else None,
                significant=significant,
                text=text,
            )
        )
    height = top + len(items) * row_h + 26
    labels = [Label(x(0.0), top - 10, "no lift")]
    for fraction in (0.0, 0.5, 1.0):
        value = low + (high - low) * fraction
        labels.append(Label(x(value), height - 6, f"{value:+.0%}"))
    rules = [Rule(x(0.0), top - 4, x(0.0), height - 22)]
    return Forest(width, height, rows, x(0.0), labels, rules)


@dataclass(frozen=True)
class FunnelRow:
    y: float
    label: str
    width: float
    text: str


@dataclass(frozen=True)
class Funnel:
    width: float
    height: float
    rows: list[FunnelRow]
    left: float


def funnel(steps: list[tuple[str, int]], *, total: int, width: float = 900) -> Funnel:
    """Runs that reached each step, as bars against the runs triggered."""
    left, row_h = 150.0, 26.0
    plot_w = width - left - 120
    rows = []
    for index, (name, count) in enumerate(steps):
        share = count / total if total else 0.0
        rows.append(
            FunnelRow(
                y=index * row_h + 4,
                label=name,
                width=max(plot_w * min(share, 1.0), 1.0 if count else 0.0),
                text=f"{count:,} ({share:.0%})",
            )
        )
    return Funnel(width, len(steps) * row_h + 8, rows, left)


# --- the journey as a graph ------------------------------------------------------------------

NODE_W, NODE_H, GAP_X, GAP_Y, SIDE = 190.0, 60.0, 36.0, 64.0, 90.0
_EDGE_KINDS = {"next": "next", "on_event": "event", "on_timeout": "timeout", "default": "default"}
END = "(end)"


@dataclass(frozen=True)
class GraphNode:
    id: str
    x: float
    y: float
    kind: str
    title: str
    detail: str
    count: str


@dataclass(frozen=True)
class GraphEdge:
    path: str
    label: str
    label_x: float
    label_y: float
    kind: str
    title: str


@dataclass
class Graph:
    width: float
    height: float
    nodes: list[GraphNode] = field(default_factory=list)
    edges: list[GraphEdge] = field(default_factory=list)
    node_w: float = NODE_W
    node_h: float = NODE_H


def step_exits(step: object) -> list[tuple[str, str, str | None]]:
    """(exit name, label, target) of a step, in the order analytics names them."""
    if isinstance(step, WaitForEventStep):
        return [
            ("on_event", step.event.replace("email_", ""), step.on_event),
            ("on_timeout", "timeout", step.on_timeout),
        ]
    if isinstance(step, BranchStep):
        exits = [
            (f"condition_{i + 1}", f"branch {i + 1}", case.next)
            for i, case in enumerate(step.branches)
        ]
        return [*exits, ("default", "default", step.default)]
    if getattr(step, "type", None) == "exit":
        return []
    return [("next", "", getattr(step, "next", None))]


def _detail(step: object) -> str:
    kind = getattr(step, "type", "")
    if kind in ("email", "sms"):
        return str(getattr(step, "template", ""))
    if kind == "delay":
        return f"wait {human_duration(step.duration)}"  # type: ignore[attr-defined]
    if isinstance(step, WaitForEventStep):
        of = f" of {step.of_step}" if step.of_step else ""
        return f"{step.event}{of}, up to {human_duration(step.timeout)}"
    if isinstance(step, BranchStep):
        return f"{len(step.branches)} condition{'s' if len(step.branches) != 1 else ''}"
    if kind == "update_attribute":
        return f"set {getattr(step, 'attribute', '')}"
    return ""


def _layers(definition: JourneyDefinition) -> tuple[dict[str, int], list[str], bool]:
    """Each step's layer: its longest distance from `start` once the edges that loop back
    are set aside (a depth-first walk finds them), so every forward edge points down.
    Also the steps in the order the walk met them, and whether any step ends the run."""
    steps = definition.steps
    seen: dict[str, int] = {}  # 0: on the walk's path, 1: done
    finished: list[str] = []
    met: list[str] = []
    back: set[tuple[str, str]] = set()
    ends = False
    roots = [definition.start, *[s for s in steps if s != definition.start]]
    for root in roots:
        if root in seen or root not in steps:
            continue
        stack = [(root, iter(step_exits(steps[root])))]
        seen[root] = 0
        met.append(root)
        while stack:
            node, exits = stack[-1]
            for _, _, target in exits:
                if target is None or target not in steps:
                    ends = True
                    continue
                if target not in seen:
                    seen[target] = 0
                    met.append(target)
                    stack.append((target, iter(step_exits(steps[target]))))
                    break
                if seen[target] == 0:
                    back.add((node, target))
            else:
                seen[node] = 1
                finished.append(node)
                stack.pop()
    layer = {step_id: 0 for step_id in steps}
    for node in reversed(finished):
        for _, _, target in step_exits(steps[node]):
            if target in steps and (node, target) not in back:
                layer[target] = max(layer[target], layer[node] + 1)
    return layer, met, ends


def journey_graph(
    definition: JourneyDefinition,
    *,
    entered: dict[str, int],
    edges: dict[tuple[str, str], int],
    total: int,
) -> Graph:
    """Steps in layers top to bottom (each forward edge points down); each edge with the
    runs that took it; an edge that skips layers bows out to the side, and one that loops
    back up goes round the right-hand side."""
    steps = definition.steps
    layer, order, ends = _layers(definition)
    deepest = max(layer.values(), default=0)
    if ends:
        layer[END] = deepest + 1
        order.append(END)
    rows: dict[int, list[str]] = {}
    for step_id in order:
        rows.setdefault(layer[step_id], []).append(step_id)
    widest = max(len(r) for r in rows.values())
    width = widest * (NODE_W + GAP_X) + GAP_X + 2 * SIDE
    height = (max(rows) + 1) * (NODE_H + GAP_Y) + GAP_Y / 2
    graph = Graph(width=width, height=height)
    centre: dict[str, tuple[float, float]] = {}
    for depth, members in rows.items():
        span = len(members) * (NODE_W + GAP_X) - GAP_X
        x0 = (width - span) / 2
        for index, step_id in enumerate(members):
            x = x0 + index * (NODE_W + GAP_X)
            y = GAP_Y / 3 + depth * (NODE_H + GAP_Y)
            centre[step_id] = (x + NODE_W / 2, y + NODE_H / 2)
            if step_id == END:
                graph.nodes.append(GraphNode(END, x, y, "end", "end", "", ""))
                continue
            step = steps[step_id]
            count = entered.get(step_id, 0)
            share = f" ({count / total:.0%})" if total else ""
            graph.nodes.append(
                GraphNode(
                    step_id,
                    x,
                    y,
                    step.type,
                    step_id,
                    f"{step.type} · {_detail(step)}".strip(" ·"),
                    f"{count:,} entered{share}",
                )
            )
    for source in order:
        if source == END:
            continue
        exits = step_exits(steps[source])
        for index, (name, label, target) in enumerate(exits):
            target_id = target if target in steps else END
            count = edges.get((source, name), 0)
            text = f"{label} {compact(count)}".strip() if count or label else ""
            title = f"{source} -> {target or 'end'}" + (f" ({label})" if label else "")
            path, lx, ly = _edge_path(
                centre[source],
                centre[target_id],
                span=layer[target_id] - layer[source],
                offset=(index - (len(exits) - 1) / 2) * 40,
                centre_x=width / 2,
            )
            kind = _EDGE_KINDS.get(name, "branch")
            if layer[target_id] <= layer[source]:
                kind = "loop"
            graph.edges.append(GraphEdge(path, text, lx, ly, kind, f"{title}: {count:,} runs"))
    return graph


def _edge_path(
    source: tuple[float, float],
    target: tuple[float, float],
    *,
    span: int,
    offset: float,
    centre_x: float,
) -> tuple[str, float, float]:
    """The SVG path of one edge and where its label goes."""
    (sx, sy), (tx, ty) = source, target
    if span == 1:
        x1, y1 = sx + offset, sy + NODE_H / 2
        x2, y2 = tx, ty - NODE_H / 2 - 6
        bend = (y2 - y1) / 2
        path = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}"
        return path, (x1 + x2) / 2 + 4, (y1 + y2) / 2
    if span > 1:
        # Round the side of the nodes between, so the edge crosses none of them.
        side = -1 if (sx + offset) <= centre_x else 1
        x1, y1 = sx + offset, sy + NODE_H / 2
        x2, y2 = tx + side * NODE_W / 4, ty - NODE_H / 2 - 6
        reach = (
            (min(sx, tx) - NODE_W / 2 - SIDE / 2)
            if side < 0
            else (max(sx, tx) + NODE_W / 2 + SIDE / 2)
        )
        path = (
            f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + GAP_Y:.1f} {reach:.1f},{y1 + GAP_Y / 2:.1f}"
            f" {reach:.1f},{(y1 + y2) / 2:.1f} S{x2:.1f},{y2 - GAP_Y:.1f} {x2:.1f},{y2:.1f}"
        )
        return path, reach + (6 if side > 0 else -40), (y1 + y2) / 2
    x1, y1 = sx + NODE_W / 2, sy + offset / 4
    x2, y2 = tx + NODE_W / 2 + 6, ty
    reach = max(x1, x2) + SIDE / 2
    path = f"M{x1:.1f},{y1:.1f} C{reach:.1f},{y1:.1f} {reach:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
    return path, reach - 6, (y1 + y2) / 2
