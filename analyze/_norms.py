"""Job `norms`: token-norm distributions per run and the outlier/bimodality table (Fig. 4, 7, 12)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tokenlake.analyze import _plot
from tokenlake.analyze._common import (
    RunInfo,
    add_run_columns,
    as_lake,
    command,
    out_dir,
    query,
    resolve_runs,
    save_table,
)

BIMODALITY = (
    "Sarle's bimodality coefficient BC = (g^2 + 1) / (k + 3 (n-1)^2 / ((n-2)(n-3))), g = sample "
    "skewness, k = sample excess kurtosis (both bias-corrected, = scipy.stats.skew/kurtosis with "
    "bias=False), n = patch tokens. bc_log is computed on ln(norm) (the headline measure: a long "
    "but unimodal right tail becomes near-symmetric in log space, a separate high-norm cluster "
    "does not); bc on the raw norms. BC > 5/9 (the value of a uniform distribution) suggests "
    "bimodality. gmm_ashman_d: a 2-component Gaussian mixture fitted to ln(norm) of a "
    "deterministic sample of <= 20,000 patch tokens; Ashman's D = sqrt(2)|mu1-mu2|/sqrt(s1^2+s2^2) "
    "(D > 2: clean separation); gmm_high_weight = weight of the higher-mean component."
)
NORMS_DESCRIPTION = (
    "Per run, over patch tokens: threshold = `percentile` quantile of the threshold run's patch "
    "norms (linear interpolation); outlier = patch with norm > threshold; outlier_share = "
    "outliers / patch tokens; image_share = images with >= 1 outlier / images; outliers_per_image "
    "= outliers / images (mean over all images); max_median_ratio = max / median patch norm. "
    + BIMODALITY
)


def gmm_separation(x: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(Ashman's D, weight of the higher component) of a 2-Gaussian fit to x; NaN if too few."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if x.size < 20 or np.ptp(x) == 0:
        return math.nan, math.nan
    from sklearn.mixture import GaussianMixture

    g = GaussianMixture(2, random_state=seed, n_init=1, max_iter=200).fit(x[:, None])
    mu = g.means_.ravel()
    var = g.covariances_.ravel()
    hi = int(np.argmax(mu))
    d = math.sqrt(2) * abs(mu[0] - mu[1]) / math.sqrt(var[0] + var[1])
    return float(d), float(g.weights_[hi])


def norm_table(lk, infos: list[RunInfo], percentile: float, *, sample: int = 20000) -> pa.Table:
    runs = [i.run for i in infos]
    t = query(lk, "norm_summary", [runs, float(percentile)])
    s = query(lk, "patch_norm_sample", [runs, int(sample)])
    srun = np.asarray(s.column("run").to_pylist())
    snorm = s.column("norm").to_numpy().astype(np.float64)
    d, w = [], []
    for r in t.column("run").to_pylist():
        x = snorm[(srun == r) & (snorm > 0)]
        dd, ww = gmm_separation(np.log(x))
        d.append(dd)
        w.append(ww)
    t = t.append_column("gmm_ashman_d", pa.array(d, pa.float64()))
    t = t.append_column("gmm_high_weight", pa.array(w, pa.float64()))
    t = t.append_column("percentile", pa.array([float(percentile)] * len(t), pa.float64()))
    return add_run_columns(t, {i.run: i for i in infos})


def norms(lake: Any, *, runs: list[str] | str | None = None, out: str | Path | None = None,
          percentile: float = 0.98, n_bins: int = 60) -> dict[str, Any]:
    """Distribution of token norms per run (cls, reg and patch separately, log-spaced bins, log
    counts) with the outlier threshold drawn, and a table per run.

    Table norms.parquet/.csv, per run: threshold, n_outliers, outlier_share, image_share,
    outliers_per_image, max_median_ratio, bimodality (see BIMODALITY: Sarle's coefficient on log
    norms `bc_log`, on raw norms `bc`, and a 2-component GMM's Ashman D); norms_histogram.parquet/
    .csv: the histogram drawn in norms.png.
    """
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    out = out_dir(lk, out)
    table = norm_table(lk, infos, percentile)
    hist = query(lk, "norm_histogram", [[i.run for i in infos], int(n_bins)])
    cmd = command("norms", lk.path, out, infos, percentile)
    paths = save_table(table, out, "norms", meta={"description": NORMS_DESCRIPTION,
                                                 "percentile": percentile, "command": cmd})
    hpaths = save_table(hist, out, "norms_histogram", meta={
        "description": "Token-norm histogram per run and kind on log-spaced bins (lo, hi edges in "
                       "norm units); drawn in norms.png.", "n_bins": n_bins, "command": cmd})
    thr = dict(zip(table.column("run").to_pylist(), table.column("threshold").to_pylist()))
    fig = out / "norms.png"
    _draw(infos, hist, thr, table, fig, percentile, n_bins)
    rows = {r["run"]: r for r in table.to_pylist()}
    return {"figure": str(fig), "table": paths, "histogram": hpaths, "runs": rows, "command": cmd}


def _draw(infos, hist: pa.Table, thr: dict, table: pa.Table, path: Path, percentile: float,
          n_bins: int) -> None:
    h = hist.to_pydict()
    stats = {r["run"]: r for r in table.to_pylist()}
    with _plot.style():
        fig, axes = _plot.panel_grid(len(infos))
        for ax, info in zip(axes, infos):
            sel = [k for k, r in enumerate(h["run"]) if r == info.run]
            for kind in ("patch", "cls", "reg"):
                ks = [k for k in sel if h["kind"][k] == kind]
                if not ks:
                    continue
                b0 = h["bin"][ks[0]]
                step = np.log10(h["hi"][ks[0]] / h["lo"][ks[0]])
                x0 = np.log10(h["lo"][ks[0]]) - b0 * step
                edges = 10 ** (x0 + step * np.arange(n_bins + 1))
                cnt = np.zeros(n_bins)
                cnt[[h["bin"][k] for k in ks]] = [h["n"][k] for k in ks]
                ax.stairs(cnt, edges, color=_plot.COLORS[kind], lw=1.4,
                          fill=kind == "patch", alpha=0.35 if kind == "patch" else 1.0,
                          label=f"{kind} ({int(cnt.sum()):,})")
                if kind == "patch":
                    ax.stairs(cnt, edges, color=_plot.COLORS[kind], lw=1.2)
            if info.run in thr and thr[info.run] is not None:
                ax.axvline(thr[info.run], color="k", ls="--", lw=1.1,
                           label=f"threshold p{percentile * 100:g} = {thr[info.run]:.3g}")
            ax.set_xscale("log")
            _plot.narrow_log_axis(ax)
            ax.set_yscale("log")
            ax.set_xlabel("token L2 norm before the final norm (log scale)")
            ax.set_ylabel("tokens per bin (log scale)")
            s = stats.get(info.run, {})
            extra = (f"outliers {100 * (s.get('outlier_share') or 0):.2f}% · images with ≥1: "
                     f"{100 * (s.get('image_share') or 0):.1f}% · BC(log) {s.get('bc_log') or float('nan'):.2f}")
            _plot.run_title(ax, info, extra, size=9)
            ax.legend(loc="upper right", frameon=False)
        _plot.suptitle(fig, "Token-norm distributions (cls / reg / patch)", infos)
        _plot.layout(fig, infos)
        _plot.save(fig, path)
