"""Shared matplotlib helpers: Agg-rendered figures in one style, saved atomically as PNG.

Figures are built from ``matplotlib.figure.Figure`` directly, never through pyplot: no global backend is
switched, no window can open, and nothing leaks between figures of a long-running process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dwmtrain.fileio import atomic_file

# The paper's convention (Figures 3 and 5): preferred data red, unpreferred blue.
PREFERRED = "#d62728"
UNPREFERRED = "#1f77b4"
NEUTRAL = "#7f7f7f"
STAGE_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")

STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "legend.fontsize": 9,
    "legend.frameon": False,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The package's plot style, applied to artists created (and figures saved) inside the block."""
    with matplotlib.rc_context(STYLE):
        yield


def styled(fn):
    """Decorator: run a plotting function inside ``style()``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)

    return wrapper


def new_figure(width: float, height: float) -> Figure:
    """An Agg-backed figure of ``width`` x ``height`` inches with constrained layout (labels never overlap)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def panel_grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, cols) for ``n`` panels, at most ``max_cols`` per row."""
    cols = max(1, min(n, max_cols))
    return math.ceil(max(n, 1) / cols), cols


def panels(fig: Figure, n: int, max_cols: int = 4, **subplot_kw) -> list:
    """``n`` axes on a grid; the grid's unused cells are removed so no empty panel is drawn."""
    rows, cols = panel_grid(n, max_cols)
    axes = fig.subplots(rows, cols, squeeze=False, **subplot_kw).ravel().tolist()
    for ax in axes[n:]:
        ax.remove()
    return axes[:n]


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` to ``path`` (PNG) so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with style(), atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
