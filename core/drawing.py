"""The plots of core.plots drawn with matplotlib, as PNG (Agg) or SVG. Each picture is a Figure of its own, never
pyplot's (whose current-figure state the server's threads would share); matplotlib is imported at the first
drawing, not when the API starts."""

from __future__ import annotations

import functools
import io
import math
import statistics
from collections.abc import Sequence
from typing import Any

from core.plots import Curve, JobPlot, Mark, StudyPlot, ValueGroup

FORMATS = {"png": "image/png", "svg": "image/svg+xml"}
DPI = 100
SPLIT_COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
OTHER_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
MARK_STYLES: dict[str, dict[str, Any]] = {
    "best": {"color": "#2ca02c", "linestyle": ":", "linewidth": 1.8},
    "early_stop": {"color": "#d62728", "linestyle": "--", "linewidth": 1.5},
    "resume": {"color": "#555555", "linestyle": "-.", "linewidth": 1.5},
    "pruned": {"color": "#9467bd", "linestyle": "-", "linewidth": 1.5},
}
THRESHOLD_STYLE: dict[str, Any] = {"color": "#9467bd", "linestyle": ":", "linewidth": 1.2}
PANEL_TITLES = {"loss": "Loss", "acc": "Accuracy", "lr": "Learning rate"}
MARKERS_UP_TO = 40  # epochs: a shorter curve shows a dot per epoch


@functools.cache
def _matplotlib() -> Any:
    """matplotlib.figure, once configured: SVG text stays text (searchable, smaller than glyph outlines) and SVG ids
    do not change between drawings. These two settings are the only global state the plots touch."""
    import matplotlib
    import matplotlib.figure

    matplotlib.rcParams["svg.fonttype"] = "none"
    matplotlib.rcParams["svg.hashsalt"] = "trickserve"
    return matplotlib.figure


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = _matplotlib().Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _render(figure: Any, fmt: str) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: png or svg")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=DPI, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- a job


def draw_job(plot: JobPlot, fmt: str) -> bytes:
    """Learning curves, one panel per kind of metric (loss, accuracy, ...), train and val together, with the
    marks as vertical lines and their meaning in a legend below."""
    from matplotlib.ticker import MaxNLocator

    panels: dict[str, list[str]] = {}
    for name in plot.curves:
        panels.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    columns = min(max(len(panels), 1), 3)
    rows = max(math.ceil(len(panels) / columns), 1)
    figure = _figure(6.2 * columns, 4.2 * rows + 0.35 * len(plot.marks) + 0.6)
    figure.suptitle(plot.title, fontsize="large")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[max(len(panels), 1) :]:
        ax.set_visible(False)
    if not panels:
        _say(axes[0], "no epoch has ended yet")
        axes[0].set_xlabel("epoch")
    colors = _metric_colors(plot.curves)
    for ax, (kind, names) in zip(axes, panels.items(), strict=False):
        for name in names:
            _metric_line(ax, name, plot.curves[name], colors[name])
        if not any(plot.curves[name].epochs for name in names):
            _say(ax, "no points yet")
        _mark_lines(ax, plot.marks, names, colors)
        ax.set_title(PANEL_TITLES.get(kind, kind))
        ax.set_xlabel("epoch")
        ax.set_ylabel(PANEL_TITLES.get(kind, kind).lower())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if any(plot.curves[name].epochs for name in names):
            ax.legend(loc="best", fontsize="small")
    if plot.marks:
        figure.legend(handles=_mark_handles(plot.marks), loc="outside lower left", fontsize="small", frameon=False)
    return _render(figure, fmt)


def _metric_colors(curves: dict[str, Curve]) -> dict[str, str]:
    """train blue, val orange, test green in every panel; other metrics from a palette of their own."""
    others = iter(OTHER_COLORS * (len(curves) // len(OTHER_COLORS) + 1))
    return {name: SPLIT_COLORS.get(name.split("/", 1)[0]) or next(others) for name in curves}


def _metric_line(ax: Any, name: str, curve: Curve, color: str) -> None:
    if len(curve.epochs) == 1:  # a test result: one point, at the end
        ax.plot(curve.epochs, curve.values, marker="D", linestyle="none", color=color, label=name)
        return
    dots = {"marker": "o", "markersize": 3} if len(curve.epochs) <= MARKERS_UP_TO else {}
    ax.plot(curve.epochs, curve.values, color=color, linewidth=1.8, label=name, **dots)


def _mark_lines(ax: Any, marks: Sequence[Mark], names: Sequence[str], colors: dict[str, str]) -> None:
    """Every mark as a vertical line; on the panel of its metric, a marker on the curve (and a pruning rule's
    threshold as a horizontal line)."""
    for mark in marks:
        ax.axvline(mark.epoch, **MARK_STYLES[mark.kind], alpha=0.9, zorder=1)
        if mark.metric not in names:
            continue
        if mark.value is not None and mark.kind in ("best", "pruned"):
            shape = {"best": "*", "pruned": "X"}[mark.kind]
            ax.plot([mark.epoch], [mark.value], marker=shape, markersize=13, linestyle="none",
                    color=MARK_STYLES[mark.kind]["color"], markeredgecolor="black", zorder=4)  # fmt: skip
        if mark.threshold is not None:
            ax.axhline(mark.threshold, **THRESHOLD_STYLE, zorder=1)


def _mark_handles(marks: Sequence[Mark]) -> list[Any]:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], **MARK_STYLES[mark.kind], label=mark.label) for mark in marks]
    for mark in marks:
        if mark.threshold is not None:
            handles.append(Line2D([], [], **THRESHOLD_STYLE, label=f"pruning threshold {mark.threshold:.4g}"))
    return handles


def _say(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#777777")


# --------------------------------------------------------------------------------------------- a study


def draw_study(plot: StudyPlot, fmt: str) -> bytes:
    """Left: one curve per value of the path, the mean over its seeds with a min-max band, and each pruned
    trial's partial curve, thin, ending in a cross. Right: each value's objective with its 95% interval."""
    figure = _figure(15, 6.2)
    figure.suptitle(plot.title, fontsize="large")
    curves, objective = figure.subplots(1, 2, width_ratios=[1.7, 1])
    colors = _value_colors(len(plot.groups))
    _study_curves(curves, plot, colors)
    _objective(objective, plot, colors)
    return _render(figure, fmt)


def _value_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if n <= 10 else "viridis"]
    return [palette(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def _study_curves(ax: Any, plot: StudyPlot, colors: Sequence[Any]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    banded = False
    for group, color in zip(plot.groups, colors, strict=True):
        epochs, means, lows, highs = _over_seeds(group.seeds)
        label = f"{plot.path} = {group.label}"
        if epochs:
            seeds = len(group.seeds)
            ax.plot(
                epochs, means, color=color, linewidth=2, label=f"{label} (mean of {seeds} trial{'s' * (seeds > 1)})"
            )
            if seeds > 1:
                ax.fill_between(epochs, lows, highs, color=color, alpha=0.2, linewidth=0)
                banded = True
        for i, curve in enumerate(group.pruned):
            shown = label + " (pruned only)" if not epochs and i == 0 else "_nolegend_"
            ax.plot(curve.epochs, curve.values, color=color, linewidth=0.9, alpha=0.85, label=shown)
            ax.plot(curve.epochs[-1:], curve.values[-1:], marker="X", markersize=10, color=color,
                    markeredgecolor="black", linestyle="none")  # fmt: skip
    extra: list[Any] = []
    if banded:
        extra.append(Patch(color="#888888", alpha=0.3, label="band: min–max over seeds"))
    if any(group.pruned for group in plot.groups):
        extra.append(Line2D([], [], color="#555555", linewidth=0.9, marker="X", markersize=9,
                            markeredgecolor="black", label="pruned trial, cut short at ×"))  # fmt: skip
    ax.set_title(f"{plot.metric} per epoch, by {plot.path}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(plot.metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + extra
    if not handles:
        _say(ax, "no epoch has ended yet")
        return
    many = len(plot.groups) > 8
    ax.legend(handles=handles, fontsize="small", loc="upper left" if many else "best",
              bbox_to_anchor=(1.01, 1) if many else None, ncols=1 + len(handles) // 20)  # fmt: skip


def _over_seeds(curves: Sequence[Curve]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per epoch that some trial reached with a number: the mean, the lowest and the highest value."""
    at: dict[int, list[float]] = {}
    for curve in curves:
        for epoch, value in zip(curve.epochs, curve.values, strict=True):
            if not math.isnan(value):
                at.setdefault(epoch, []).append(value)
    epochs = sorted(at)
    return epochs, [statistics.fmean(at[e]) for e in epochs], [min(at[e]) for e in epochs], [max(at[e]) for e in epochs]


def _objective(ax: Any, plot: StudyPlot, colors: Sequence[Any]) -> None:
    from matplotlib.lines import Line2D

    for x, (group, color) in enumerate(zip(plot.groups, colors, strict=True)):
        if group.mean is None:
            ax.text(x, 0.5, "no finished trial", transform=ax.get_xaxis_transform(), ha="center", va="center",
                    rotation=90, color="#777777", fontsize="small")  # fmt: skip
            continue
        shape = {"marker": "*" if group.best else "o", "markersize": 15 if group.best else 8}
        if group.ci95 is None:  # one trial: no interval
            ax.plot([x], [group.mean], **shape, color=color, markerfacecolor="white", linestyle="none")
            continue
        low, high = group.ci95
        ax.errorbar([x], [group.mean], yerr=[[group.mean - low], [high - group.mean]], color=color, capsize=6,
                    elinewidth=2, linestyle="none", **shape)  # fmt: skip
    if len(plot.groups) > 8:  # the values alone, slanted
        labels = [group.label for group in plot.groups]
        ax.set_xticks(range(len(plot.groups)), labels, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(len(plot.groups)), [_tick(group) for group in plot.groups])
    ax.set_xlim(-0.6, len(plot.groups) - 0.4)
    ax.set_title("objective per value: mean and 95% interval")
    ax.set_xlabel(plot.path)
    ax.set_ylabel(plot.objective)
    ax.grid(alpha=0.3, axis="y")
    if not any(group.mean is not None for group in plot.groups):
        _say(ax, "no trial has finished yet")
        return
    legend = [
        Line2D([], [], color="#555555", marker="o", linestyle="none", label="mean (bar: 95% interval, Student's t)"),
        Line2D([], [], color="#555555", marker="*", markersize=13, linestyle="none", label="best value"),
        Line2D([], [], color="#555555", marker="o", markerfacecolor="white", linestyle="none",
               label="one trial: no interval"),
    ]  # fmt: skip
    ax.legend(handles=legend, fontsize="small", loc="best")


def _tick(group: ValueGroup) -> str:
    """The value, and below it how many trials finished (and were pruned or failed)."""
    lost = "".join(f", {k} {what}" for k, what in ((group.n_pruned, "pruned"), (group.n_failed, "failed")) if k)
    return f"{group.label}\nn={group.n}{lost}"
