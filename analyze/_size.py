"""Job `size`: claim 2, outlier statistics against parameter count per model family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tokenlake.analyze import _plot
from tokenlake.analyze._common import as_lake, command, out_dir, resolve_runs, save_table
from tokenlake.analyze._norms import BIMODALITY, norm_table

MEASURES = (
    ("max_median_ratio", "max / median patch norm", "log"),
    ("bc_log", "bimodality coeff. BC of ln(norm)", "linear"),
    ("outliers_per_affected_image", "outliers per image with ≥1 outlier", "linear"),
)


def size(lake: Any, *, runs: list[str] | str | None = None, out: str | Path | None = None,
         percentile: float = 0.98) -> dict[str, Any]:
    """Claim 2: outlier statistics vs parameter count (manifest 'params'), one line per family
    (family from the model alias: dinov2, dinov2_reg4, dino, clip, deit3, pvt, swinv2), log-x.

    With each run's own threshold the outlier share is ~(1 - percentile) by construction, so the
    plotted measures are the prominence of the high-norm tokens: max/median norm ratio, the
    bimodality coefficient of ln(norm) and the outliers per affected image. Runs without 'params'
    in their manifest are listed in the table (params NULL) but not drawn.
    """
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    out = out_dir(lk, out)
    t = norm_table(lk, infos, percentile)
    keep = ["run", "model", "family", "params", "random_weights", "threshold", "outlier_share",
            "image_share", "outliers_per_image", "outliers_per_affected_image", "max_median_ratio",
            "bc_log", "bc", "gmm_ashman_d"]
    t = t.select(keep).sort_by([("family", "ascending"), ("params", "ascending")])
    cmd = command("size", lk.path, out, infos, percentile)
    paths = save_table(t, out, "size", meta={
        "description": "Claim 2: outlier statistics per run against its parameter count. " + BIMODALITY,
        "percentile": percentile, "command": cmd})
    fig = out / "size.png"
    rows = t.to_pylist()
    _draw(infos, rows, fig)
    return {"figure": str(fig), "table": paths, "rows": rows,
            "families": sorted({r["family"] for r in rows}), "command": cmd}


def _draw(infos, rows: list[dict], path: Path) -> None:
    fams = sorted({r["family"] for r in rows if r["params"]})
    cmap = _plot.plt.get_cmap("tab10")
    with _plot.style():
        fig, axes = _plot.plt.subplots(1, len(MEASURES), figsize=(5.0 * len(MEASURES), 4.0), squeeze=False)
        for ax, (col, label, yscale) in zip(axes[0], MEASURES):
            for k, f in enumerate(fams):
                # sort on (params, value) only: ties must never compare the row dicts
                pts = sorted(((r["params"], r[col], r) for r in rows
                              if r["family"] == f and r["params"] and r[col] is not None
                              and np.isfinite(r[col])), key=lambda t: t[:2])
                if not pts:
                    continue
                x = [p[0] / 1e6 for p in pts]
                y = [p[1] for p in pts]
                ax.plot(x, y, "-o", color=cmap(k % 10), label=f, lw=1.6, ms=5)
                for xx, yy, p in zip(x, y, pts):
                    rnd = p[2]["random_weights"]
                    ax.annotate(p[2]["model"] + (" (RANDOM)" if rnd else ""), (xx, yy), fontsize=7,
                                xytext=(3, 3), textcoords="offset points",
                                color=_plot.RANDOM if rnd else "#333333")
            if col == "bc_log":
                ax.axhline(5 / 9, color="grey", ls=":", lw=1, label="BC = 5/9")
            ax.axvline(300, color="grey", ls="--", lw=0.8)
            ax.text(300, 1.0, " 300M", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="grey", va="top")
            ax.set_xscale("log")
            ax.set_yscale(yscale)
            if yscale == "log":
                from matplotlib.ticker import NullFormatter, ScalarFormatter

                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("parameters (millions, log scale)")
            ax.set_ylabel(label)
            ax.set_title(label)
        if fams:
            axes[0, 0].legend(title="family", frameon=False)
        else:
            axes[0, 0].text(0.5, 0.5, "no run has 'params' in its manifest", ha="center",
                            transform=axes[0, 0].transAxes)
        _plot.suptitle(fig, "Claim 2 — high-norm tokens against model size", infos)
        _plot.layout(fig, infos)
        _plot.save(fig, path)
