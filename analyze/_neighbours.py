"""Job `neighbours`: claim 3, neighbour similarity of outlier vs normal patches (Fig. 3, 10)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tokenlake.analyze import _plot
from tokenlake.analyze._common import (
    add_run_columns,
    as_lake,
    command,
    out_dir,
    query,
    resolve_runs,
    save_table,
)

DEFINITION = (
    "nbr_cos = mean cosine similarity of a patch's patch-embedding output with its 4-neighbours. "
    "Outlier = patch with norm > the `percentile` quantile of its threshold run's patch norms. "
    "Low-information patch = nbr_cos above the `low_info` quantile (default 0.9) of nbr_cos over "
    "all patches of the run. ratio = P(low-info | outlier) / P(low-info | normal) "
    "(the paper: outliers are ~2.5x more likely to lie in low-information areas)."
)


def neighbours(lake: Any, *, runs: list[str] | str | None = None, out: str | Path | None = None,
               percentile: float = 0.98, low_info: float = 0.9, n_bins: int = 50) -> dict[str, Any]:
    """Distributions of tokens.nbr_cos for outlier vs normal patches per run, and the
    low-information ratio (see DEFINITION). Writes neighbours.png, neighbours.parquet/.csv (per run
    stats) and neighbours_histogram.parquet/.csv (the densities drawn)."""
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    out = out_dir(lk, out)
    names = [i.run for i in infos]
    stats = query(lk, "neighbour_stats", [names, float(percentile), float(low_info)])
    stats = add_run_columns(stats, {i.run: i for i in infos})
    hist = query(lk, "neighbour_histogram", [names, float(percentile), int(n_bins)])
    cmd = command("neighbours", lk.path, out, infos, percentile)
    meta = {"description": DEFINITION, "percentile": percentile, "low_info": low_info, "command": cmd}
    paths = save_table(stats, out, "neighbours", meta=meta)
    hpaths = save_table(hist, out, "neighbours_histogram", meta={**meta, "n_bins": n_bins})
    fig = out / "neighbours.png"
    rows = {r["run"]: r for r in stats.to_pylist()}
    _draw(infos, hist, rows, fig, percentile, low_info, n_bins)
    return {"figure": str(fig), "table": paths, "histogram": hpaths, "runs": rows, "command": cmd}


def _draw(infos, hist, rows: dict, path: Path, percentile: float, low_info: float,
          n_bins: int) -> None:
    h = hist.to_pydict()
    with _plot.style():
        fig, axes = _plot.panel_grid(len(infos))
        for ax, info in zip(axes, infos):
            for grp in ("normal", "outlier"):
                ks = [k for k, (r, g) in enumerate(zip(h["run"], h["group"]))
                      if r == info.run and g == grp]
                if not ks:
                    continue
                cnt = np.zeros(n_bins)
                cnt[[h["bin"][k] for k in ks]] = [h["n"][k] for k in ks]
                edges = np.linspace(-1, 1, n_bins + 1)
                dens = cnt / (cnt.sum() * (2 / n_bins))
                ax.stairs(dens, edges, color=_plot.COLORS[grp], lw=1.3, fill=True, alpha=0.25)
                ax.stairs(dens, edges, color=_plot.COLORS[grp], lw=1.3,
                          label=f"{grp} patches ({int(cnt.sum()):,})")
            r = rows.get(info.run)
            if r and r["low_info_cutoff"] is not None:
                ax.axvline(r["low_info_cutoff"], color="k", ls="--", lw=1,
                           label=f"low-info cutoff (p{low_info * 100:g})")
            ratio = r["ratio"] if r else None
            extra = ("P(low|outlier)/P(low|normal) = " +
                     (f"{ratio:.2f}" if ratio is not None else "n/a"))
            _plot.run_title(ax, info, extra, size=9)
            ax.set_xlim(-1, 1)
            ax.set_xlabel("cosine similarity with 4-neighbours (after patch embedding)")
            ax.set_ylabel("density")
            ax.legend(loc="upper left", frameon=False)
        _plot.suptitle(fig, f"Claim 3 — neighbour similarity of outlier (norm > p{percentile * 100:g}) "
                            "vs normal patches", infos)
        _plot.layout(fig, infos)
        _plot.save(fig, path)
