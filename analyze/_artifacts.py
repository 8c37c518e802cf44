"""Job `artifacts`: claim 1 quantified, do top-attention patches coincide with top-norm patches?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
from tokenlake.analyze._grids import grid_shape, input_image, to_grid
from tokenlake.analyze._maps import attn_title

DEFINITION = (
    "Among patch tokens: N = norm > the `percentile` quantile of the threshold run's patch norms "
    "(the outliers); A = attn > the `attn_percentile` quantile of the run's own patch attention. "
    "precision = |A∩N|/|A|, recall = |A∩N|/|N|, Jaccard = |A∩N|/|A∪N|, per image and overall "
    "(overall: pooled counts over all images). NULL where the denominator is 0."
)


def _overall(per: pa.Table, infos: dict[str, RunInfo]) -> pa.Table:
    d = per.to_pydict()
    runs = sorted(set(d["run"]))
    out = {k: [] for k in ("run", "n_images", "n_norm", "n_attn", "n_both", "n_either", "precision",
                           "recall", "jaccard", "mean_image_jaccard", "norm_threshold",
                           "attn_threshold")}
    for r in runs:
        ks = [k for k, x in enumerate(d["run"]) if x == r]
        s = {c: sum(d[c][k] for k in ks) for c in ("n_norm", "n_attn", "n_both", "n_either")}
        js = [d["jaccard"][k] for k in ks if d["jaccard"][k] is not None]
        div = lambda a, b: a / b if b else None
        out["run"].append(r)
        out["n_images"].append(len(ks))
        for c, v in s.items():
            out[c].append(v)
        out["precision"].append(div(s["n_both"], s["n_attn"]))
        out["recall"].append(div(s["n_both"], s["n_norm"]))
        out["jaccard"].append(div(s["n_both"], s["n_either"]))
        out["mean_image_jaccard"].append(float(np.mean(js)) if js else None)
        out["norm_threshold"].append(d["norm_threshold"][ks[0]])
        out["attn_threshold"].append(d["attn_threshold"][ks[0]])
    t = pa.table(out, schema=pa.schema([
        ("run", pa.string()), ("n_images", pa.int64()), ("n_norm", pa.int64()), ("n_attn", pa.int64()),
        ("n_both", pa.int64()), ("n_either", pa.int64()), ("precision", pa.float64()),
        ("recall", pa.float64()), ("jaccard", pa.float64()), ("mean_image_jaccard", pa.float64()),
        ("norm_threshold", pa.float64()), ("attn_threshold", pa.float64())]))
    return add_run_columns(t, infos)


def artifacts(lake: Any, *, runs: list[str] | str | None = None, out: str | Path | None = None,
              percentile: float = 0.98, attn_percentile: float | None = None,
              n_worst: int = 4) -> dict[str, Any]:
    """Claim 1 quantified per run (see DEFINITION): overlap of the top-attention and top-norm patch
    tokens, per image (artifacts_per_image.*) and overall (artifacts.*), plus the `n_worst` images
    per run where they disagree most (lowest Jaccard among images with >= 1 outlier;
    artifacts_disagree.*) drawn with their maps (artifacts_disagree.png)."""
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    out = out_dir(lk, out)
    ap = percentile if attn_percentile is None else attn_percentile
    imap = {i.run: i for i in infos}
    per = query(lk, "attn_norm_overlap", [[i.run for i in infos], float(percentile), float(ap)])
    overall = _overall(per, imap)
    # disagreement: images with >= 1 outlier, lowest Jaccard first (ties: more outliers first)
    has = per.filter(pc.greater(per.column("n_norm"), 0))
    worst = []
    for info in infos:
        t = has.filter(pc.equal(has.column("run"), info.run)).sort_by(
            [("jaccard", "ascending"), ("n_norm", "descending"), ("image_id", "ascending")])
        worst.append(t.slice(0, n_worst))
    worst_t = pa.concat_tables(worst) if worst else has.slice(0, 0)
    cmd = command("artifacts", lk.path, out, infos, percentile)
    meta = {"description": DEFINITION, "percentile": percentile, "attn_percentile": ap, "command": cmd}
    paths = save_table(overall, out, "artifacts", meta=meta)
    ppaths = save_table(per, out, "artifacts_per_image", meta=meta)
    wpaths = save_table(worst_t, out, "artifacts_disagree", meta={
        **meta, "description": "Per run, the images with >= 1 outlier whose top-attention and "
                               "top-norm patches disagree most (lowest Jaccard). " + DEFINITION})
    fig = out / "artifacts.png"
    _draw_summary(infos, overall, per, fig, percentile)
    fig2 = out / "artifacts_disagree.png"
    _draw_worst(lk, infos, worst_t, fig2)
    rows = {r["run"]: r for r in overall.to_pylist()}
    return {"figure": str(fig), "disagree_figure": str(fig2), "table": paths,
            "per_image": ppaths, "disagree": wpaths, "runs": rows, "command": cmd}


def _draw_summary(infos, overall: pa.Table, per: pa.Table, path: Path, percentile: float) -> None:
    o = {r["run"]: r for r in overall.to_pylist()}
    with _plot.style():
        fig, (a1, a2) = _plot.plt.subplots(1, 2, figsize=(max(7.0, 1.4 * len(infos) + 5), 4.0),
                                           gridspec_kw={"width_ratios": [1.4, 1]})
        x = np.arange(len(infos))
        w = 0.26
        for k, (m, c) in enumerate((("precision", "#1f77b4"), ("recall", "#ff7f0e"),
                                    ("jaccard", "#2ca02c"))):
            vals = [o.get(i.run, {}).get(m) for i in infos]
            bars = a1.bar(x + (k - 1) * w, [v if v is not None else 0 for v in vals], w, color=c,
                          label=m)
            a1.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in vals],
                         fontsize=7, padding=1)
        a1.axhline(0.5, color="grey", ls=":", lw=1, label="Jaccard = 0.5 (claim-1 rule)")
        a1.set_xticks(x, [("RANDOM\n" if i.random_weights else "") + i.run for i in infos],
                      rotation=20, ha="right")
        for t, i in zip(a1.get_xticklabels(), infos):
            if i.random_weights:
                t.set_color(_plot.RANDOM)
        a1.set_ylim(0, 1.3)
        a1.set_yticks(np.linspace(0, 1, 6))
        a1.set_ylabel("overlap (pooled over images)")
        a1.set_title(f"top-{100 * (1 - percentile):g}% attention vs top-{100 * (1 - percentile):g}% norm patches")
        a1.legend(frameon=False, fontsize=7, loc="upper center", ncol=4)
        d = per.to_pydict()
        bins = np.linspace(0, 1, 21)
        for k, i in enumerate(infos):
            js = [j for r, j in zip(d["run"], d["jaccard"]) if r == i.run and j is not None]
            if js:
                a2.hist(js, bins=bins, histtype="step", lw=1.6, label=i.run,
                        ls=("-", "--", ":", "-.")[k % 4])
        a2.set_xlabel("per-image Jaccard (images with a top token)")
        a2.set_ylabel("images")
        a2.set_title("per-image agreement")
        a2.legend(frameon=False, fontsize=7)
        _plot.suptitle(fig, "Claim 1 — are high-norm tokens the attention artifacts?", infos)
        _plot.layout(fig, infos)
        _plot.save(fig, path)


def _draw_worst(lk, infos: list[RunInfo], worst: pa.Table, path: Path) -> None:
    rows = worst.to_pylist()
    by = {i.run: i for i in infos}
    n = max(1, len(rows))
    with _plot.style():
        fig, axes = _plot.plt.subplots(n, 3, figsize=(8.2, 2.7 * n + 0.6), squeeze=False)
        if not rows:
            for ax in axes[0]:
                _plot.image_panel(ax, None, title="", missing="no image with an outlier")
        for k, r in enumerate(rows):
            info = by[r["run"]]
            t = query(lk, "patch_grid", [info.run, [r["image_id"]], float(r["norm_threshold"])])
            rr, cc = t.column("row").to_numpy(), t.column("col").to_numpy()
            shape = grid_shape(info, rr, cc)
            norm = to_grid(shape, rr, cc, t.column("norm").to_numpy())
            attn_v = t.column("attn").to_numpy(zero_copy_only=False).astype(float)
            attn = to_grid(shape, rr, cc, attn_v)
            top_a = to_grid(shape, rr, cc, np.nan_to_num(attn_v, nan=-np.inf) > r["attn_threshold"]) == 1
            top_n = norm > r["norm_threshold"]
            img, why = input_image(lk, info, t)
            lab = f"{info.run} · {r['source_id']}\nJaccard {r['jaccard']:.2f} " \
                  f"({r['n_both']}/{r['n_either']})"
            _plot.image_panel(axes[k, 0], img, title="input", missing=why)
            _plot.row_label(axes[k, 0], info, lab, width=30, size=8)
            _plot.map_panel(axes[k, 1], fig, norm, marks=top_n, marks2=top_a,
                            title="‖x‖ (red: top norm)", cbar_label="L2 norm")
            _plot.map_panel(axes[k, 2], fig, attn, marks=top_n, marks2=top_a, cmap="magma",
                            title=attn_title(info) + " (white: top attn)", cbar_label="attention")
        _plot.suptitle(fig, "Images where top-attention and top-norm patches disagree most", infos)
        _plot.layout(fig, infos)
        _plot.save(fig, path)
