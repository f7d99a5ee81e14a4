"""Figure 2 of the paper: the per-stage average accuracy of every run, one panel per few-shot setting, written
through the package's one PNG helper (``analysis.plots``)."""

from __future__ import annotations

from pathlib import Path

from dwmtrain.analysis.plots import new_figure, panels, save_png, styled
from dwmtrain.eval.tasks import PAPER_TASKS


@styled
def figure2(rows_by_shots: dict[int, list[dict]], path: Path, tasks: int = len(PAPER_TASKS)) -> Path:
    """Per-stage AVERAGE of every run (over ``tasks`` tasks), one panel per shot setting (the paper's Figure 2)."""
    fig = new_figure(5.2 * len(rows_by_shots), 3.8)
    styles = [("--", "o", 7), ("-", "s", 5), (":", "^", 6), ("-.", "D", 4)]
    for ax, (k, rows) in zip(panels(fig, len(rows_by_shots)), sorted(rows_by_shots.items())):
        labels = list(dict.fromkeys(r["run"] for r in rows))
        for i, label in enumerate(labels):
            dodge = (i - (len(labels) - 1) / 2) * 0.05  # runs with equal scores stay side by side, not hidden
            pts = [(r["stage"] + dodge, r["AVERAGE"]) for r in rows if r["run"] == label and r["AVERAGE"] is not None]
            ls, marker, size = styles[i % len(styles)]
            if pts:
                ax.plot(*zip(*pts), linestyle=ls, marker=marker, markersize=size, linewidth=1.8, label=label)
        ax.set_title(f"{'Zero' if k == 0 else k}-shot: average over the {tasks} tasks")
        ax.set_xlabel("stage")
        ax.set_ylabel("average accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    return save_png(fig, path)
