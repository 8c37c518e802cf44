"""Shared matplotlib style and panels: every figure of the analysis jobs is drawn through here."""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from tokenlake.analyze._common import RunInfo

RANDOM = "#d62728"
COLORS = {"cls": "#2ca02c", "reg": "#9467bd", "patch": "#1f77b4",
          "normal": "#1f77b4", "outlier": "#d62728"}
STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "image.cmap": "viridis",
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    with plt.rc_context(STYLE):
        yield


def run_title(ax, info: RunInfo, extra: str = "", *, size: float | None = None) -> None:
    """Axis title: the run label, and a red RANDOM WEIGHTS mark when the run has random weights."""
    label = "\n".join(textwrap.wrap(info.label, 48))  # long run names must not run into the next panel
    text = label + (f"\n{extra}" if extra else "")
    if info.random_weights:
        ax.set_title(f"RANDOM WEIGHTS\n{text}", color=RANDOM, fontweight="bold", fontsize=size)
    else:
        ax.set_title(text, fontsize=size)


def row_label(ax, info: RunInfo, text: str, *, width: int = 22, size: float = 9) -> None:
    """A grid row's y label: wrapped to the row's height (long run names ran into the next row),
    red with a RANDOM WEIGHTS mark when the run has random weights."""
    lines = [line for part in text.split("\n") for line in textwrap.wrap(part, width)]
    if info.random_weights:
        lines.insert(0, "RANDOM WEIGHTS")
    ax.set_ylabel("\n".join(lines), color=RANDOM if info.random_weights else "black",
                  fontsize=size, fontweight="bold" if info.random_weights else None)


def suptitle(fig, title: str, infos: list[RunInfo]) -> None:
    """Figure title; runs with random weights are named in red under it (never omitted)."""
    from matplotlib.transforms import ScaledTranslation

    rnd = [i.run for i in infos if i.random_weights]
    down = lambda inch: fig.transFigure + ScaledTranslation(0, -inch, fig.dpi_scale_trans)
    fig.text(0.5, 1.0, title, ha="center", va="top", fontsize=12, fontweight="bold",
             transform=down(0.08))
    if rnd:
        fig.text(0.5, 1.0, "RANDOM WEIGHTS: " + ", ".join(rnd) + " (untrained networks)",
                 ha="center", va="top", color=RANDOM, fontsize=10, fontweight="bold",
                 transform=down(0.34))


def layout(fig, infos: list[RunInfo]) -> None:
    """tight_layout leaving room (in inches) for the title lines drawn by `suptitle`."""
    room = 0.62 if any(i.random_weights for i in infos) else 0.38
    fig.tight_layout(rect=(0, 0, 1, 1 - room / fig.get_figheight()))


def save(fig, path: Path, *, top: float | None = None) -> str:
    if top is not None:
        fig.subplots_adjust(top=top)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def map_panel(ax, fig, grid: np.ndarray, *, title: str, marks: np.ndarray | None = None,
              marks2: np.ndarray | None = None, cmap: str = "viridis", cbar_label: str = "",
              mark_color: str = RANDOM) -> None:
    """One map with its own colour scale and colour bar; `marks` cells outlined in red,
    `marks2` (optional) in white dashes."""
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.ax.tick_params(labelsize=7)
    if cbar_label:
        cb.set_label(cbar_label, fontsize=7)
    lw = 1.2 if max(grid.shape) <= 32 else 0.8
    for m, kw in ((marks2, {"ec": "white", "ls": "--"}), (marks, {"ec": mark_color, "ls": "-"})):
        if m is None:
            continue
        for r, c in zip(*np.nonzero(m)):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=lw, **kw))


def image_panel(ax, image: np.ndarray | None, *, title: str, missing: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.set_title(title)
    for sp in ax.spines.values():
        sp.set_visible(False)
    if image is None:
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, missing, ha="center", va="center", fontsize=8, wrap=True,
                transform=ax.transAxes, color="#444444")
    else:
        ax.imshow(image, interpolation="nearest")


def narrow_log_axis(ax) -> None:
    """A log x-axis spanning less than a decade gets a few plain ticks instead of crowded 10^x ones."""
    import matplotlib.ticker as mticker

    lo, hi = ax.get_xlim()
    if lo > 0 and hi / lo < 10:
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
        ax.set_xticks(np.geomspace(lo, hi, 5)[1:-1])
        ax.xaxis.set_major_formatter(mticker.FormatStrFormatter("%.3g"))


def panel_grid(n: int, *, cols: int = 3, width: float = 4.6, height: float = 3.4):
    """A figure with one panel per run (at most `cols` a row); unused panels hidden.
    Returns (figure, the first n axes). Call inside `style()`."""
    nc = min(cols, n)
    nr = -(-n // nc)
    fig, axes = plt.subplots(nr, nc, figsize=(width * nc, height * nr + 0.5), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, list(axes.ravel()[:n])
