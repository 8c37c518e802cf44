"""Register neurons from the lake, and the comparison of no / trained / test-time registers.

**Ranking** (`tokenlake neurons`, `rank_neurons`). Input: a run extracted with ``--record-mlp``
(image array ``mlp_acts`` [L, H, Np]: the hidden activation of every block's MLP — the input of
``fc2`` — at every patch token, fp16) and the run's outlier patch tokens (norm above the
``percentile`` quantile of its threshold run's patch norms; at 0.98 exactly the SQL ``outliers``
view). Over all images, for every (block, neuron):

    mean_outlier  = mean activation over outlier patch tokens
    mean_normal   = mean activation over the other patch tokens
    score         = mean_outlier - mean_normal       (the ranking key, activation units)
    outlier_share = sum of max(a, 0) over outlier tokens / sum of max(a, 0) over all patch tokens

A register neuron fires hard on the (few) outlier positions and not elsewhere, so its excess mean
activation at outliers is large; the score is in activation units, as in Jiang et al. 2025 who rank
neurons by their activation at outlier positions, so a weak neuron that merely correlates with the
outliers ranks below one that carries their magnitude. Every neuron is ranked (rank 1 = highest
score; ties by block, neuron) and stored in LAKE/neurons/<run>.parquet (SQL view ``neurons``).

**Comparison** (`registers`, a report section). Runs are grouped by (subset, model without
``_reg4``, image size, weights): the same images through the same network size. In each group:
*no registers* = the model without ``_reg4`` and without a test-time register; *trained* = the
``_reg4`` model; *test-time* = runs with ``--test-time-registers`` (one row per K). Per run: patch-norm
quantiles, max/median ratio, outliers by the run's own 98th percentile (2 % by construction) and
patches above the *no-register run's* threshold (the comparable count), and the artifact overlap
numbers of `tokenlake.analyze.artifacts`. A test-time run is also compared with the run of the same
model without the extra token: mean relative L2 change ``||p' - p|| / ||p||`` of its patch tokens
(stored fp16 embeddings, matched by image and grid position). With K = 0 the zero token changes
the patches only through attention; this is that change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tokenlake import store
from tokenlake.analyze import _plot
from tokenlake.analyze._common import RunInfo, as_lake, out_dir, resolve_runs, save_table

MLP_ARRAY = "mlp_acts"

_PATCH_OUTLIERS = """
SELECT t.image_id, t.token, t.norm > th.threshold AS outlier
FROM tokens AS t
JOIN runs AS r ON r.run = t.run
JOIN thresholds_at(?) AS th ON th.run = r.threshold_run
WHERE t.run = ? AND t.kind = 'patch'
ORDER BY t.image_id, t.token
"""


def _cfg(m: dict[str, Any], key: str) -> Any:
    cfg = m.get("config")
    return cfg.get(key) if isinstance(cfg, dict) else m.get(key)


def neuron_scores(acts_batches, masks) -> dict[str, np.ndarray]:
    """Accumulate the ranking statistics over image batches.

    acts_batches: iterable of [n, L, H, Np] activations; masks: matching [n, Np] bool (outlier)."""
    s_out = s_all = p_out = p_all = None
    n_out = n_all = 0
    for a, m in zip(acts_batches, masks):
        a = np.asarray(a, np.float32)
        w = np.asarray(m, np.float32)[:, None, None, :]
        pos = np.maximum(a, 0)
        terms = ((a * w).sum((0, 3)), a.sum((0, 3)), (pos * w).sum((0, 3)), pos.sum((0, 3)))
        if s_out is None:
            s_out, s_all, p_out, p_all = (t.astype(np.float64) for t in terms)
        else:
            s_out += terms[0]
            s_all += terms[1]
            p_out += terms[2]
            p_all += terms[3]
        n_out += int(np.asarray(m).sum())
        n_all += int(np.asarray(m).size)
    if s_out is None or n_out == 0:
        raise ValueError("no outlier patch token in the run: nothing to rank neurons by")
    n_norm = n_all - n_out
    mean_out = s_out / n_out
    mean_norm = (s_all - s_out) / n_norm if n_norm else np.zeros_like(s_out)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(p_all > 0, p_out / p_all, np.nan)
    return {"score": mean_out - mean_norm, "mean_outlier": mean_out, "mean_normal": mean_norm,
            "outlier_share": share, "n_outlier": n_out, "n_normal": n_norm}


def rank_neurons(lake: Any, run: str, *, top: int = 10, percentile: float = 0.98,
                 out: str | Path | None = None, batch: int = 8) -> dict[str, Any]:
    """Rank every MLP neuron of a --record-mlp run (see the module doc), write the ranking to the
    lake and a figure (neurons_<run>.png in `out`, default LAKE/analysis)."""
    lk = as_lake(lake)
    m = lk.manifest(run)
    if MLP_ARRAY not in lk.layout(run).arrays:
        raise ValueError(f"run {run!r} has no MLP activations: extract it with --record-mlp")
    t = lk.sql(_PATCH_OUTLIERS, params=[float(percentile), run])
    ids_all = t.column("image_id").to_numpy()
    flags = t.column("outlier").to_numpy(zero_copy_only=False).astype(bool)
    ids = np.unique(ids_all)
    n_patch = len(ids_all) // max(len(ids), 1)
    mask = flags.reshape(len(ids), n_patch)  # rows ordered by image, patches by token
    chunks = [slice(i, i + batch) for i in range(0, len(ids), batch)]
    stats = neuron_scores((lk.image_array(run, MLP_ARRAY, ids[c]) for c in chunks),
                          (mask[c] for c in chunks))
    depth, hidden = stats["score"].shape
    block, neuron = np.meshgrid(np.arange(depth), np.arange(hidden), indexing="ij")
    score = stats["score"].ravel()
    order = np.lexsort((neuron.ravel(), block.ravel(), -score))
    rank = np.empty(score.size, np.int32)
    rank[order] = np.arange(1, score.size + 1)
    table = pa.table({
        "run": [run] * score.size, "rank": rank, "block": block.ravel().astype(np.int16),
        "neuron": neuron.ravel().astype(np.int32), "score": score,
        "mean_outlier": stats["mean_outlier"].ravel(), "mean_normal": stats["mean_normal"].ravel(),
        "outlier_share": stats["outlier_share"].ravel(),
        "n_outlier": np.full(score.size, stats["n_outlier"], np.int64),
        "n_normal": np.full(score.size, stats["n_normal"], np.int64),
    }).take(pa.array(order))
    meta = {"definition": "score = mean activation at outlier patch tokens - mean at the other "
                          "patch tokens (fc2 input of each block's MLP)",
            "percentile": percentile, "threshold_run": _cfg(m, "outlier_ref") or run,
            "model": m.get("timm_name"), "weights_sha256": m.get("weights_sha256")}
    path = store.write_neurons(lk.path, run, table, meta=meta)
    fig = out_dir(lk, out) / f"neurons_{run}.png"
    _draw_ranking(stats["score"], table.slice(0, top), fig, run, bool(m.get("random_weights")))
    return {"path": str(path), "figure": str(fig), "table": table,
            "n_outlier": stats["n_outlier"], "n_normal": stats["n_normal"],
            "top": table.slice(0, top).to_pylist()}


def _draw_ranking(score: np.ndarray, top: pa.Table, path: Path, run: str, random: bool) -> None:
    depth, hidden = score.shape
    with _plot.style():
        fig, ax = _plot.plt.subplots(figsize=(max(6.0, 0.45 * depth + 3), 4.0))
        x = np.arange(depth)[:, None] + 0.8 * (np.arange(hidden)[None, :] / max(hidden, 1)) - 0.4
        ax.scatter(x.ravel(), score.ravel(), s=4, color="#1f77b4", alpha=0.5, lw=0)
        for r in top.to_pylist():
            xi = r["block"] + 0.8 * r["neuron"] / hidden - 0.4
            ax.scatter([xi], [r["score"]], s=18, color="#d62728")
            ax.annotate(f"#{r['rank']} b{r['block']}:n{r['neuron']}", (xi, r["score"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xticks(range(depth))
        ax.set_xlabel("block (neurons spread within the block's column)")
        ax.set_ylabel("score: mean act. at outliers − at normal patches")
        title = f"Register-neuron ranking of {run}"
        ax.set_title(("RANDOM WEIGHTS — " if random else "") + title,
                     color=_plot.RANDOM if random else "black")
        fig.tight_layout()
        _plot.save(fig, path)


# -- comparison: no registers / trained registers / test-time registers ----------------------------

def _kind(info: RunInfo) -> str:
    if _cfg(info.manifest, "test_time_registers"):
        return "test-time"
    return "trained" if info.model.endswith("_reg4") else "none"


def _group_key(info: RunInfo) -> tuple:
    """Runs compared side by side: same images (keep-if-outlier selects other ones), model size,
    resolution and weights."""
    m = info.manifest
    return (info.subset, info.model.removesuffix("_reg4"), info.img_size,
            bool(info.random_weights), m.get("weights_sha256"),
            bool(_cfg(m, "keep_if_outlier")))


def patch_change(lk: store.Lake, run: str, base: str) -> dict[str, Any]:
    """Mean relative L2 change of `run`'s patch tokens against `base`'s, same images and grid
    positions, from the stored (fp16) embeddings; also the change of the patch-norm mean."""
    t = lk.sql(
        'SELECT a.slot AS sa, b.slot AS sb FROM tokens a JOIN tokens b '
        'ON a.image_id = b.image_id AND a."row" = b."row" AND a.col = b.col '
        "WHERE a.run = ? AND b.run = ? AND a.kind = 'patch' AND b.kind = 'patch' "
        "AND a.slot IS NOT NULL AND b.slot IS NOT NULL ORDER BY a.image_id, a.token",
        params=[run, base])
    if t.num_rows == 0:
        return {"n_patches": 0, "mean_rel_l2": None, "median_rel_l2": None, "max_rel_l2": None}
    a = lk.gather(run, t.column("sa").to_numpy()).astype(np.float32)
    b = lk.gather(base, t.column("sb").to_numpy()).astype(np.float32)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return {"n_patches": int(rel.size), "mean_rel_l2": float(rel.mean()),
            "median_rel_l2": float(np.median(rel)), "max_rel_l2": float(rel.max())}


def _norm_stats(lk: store.Lake, run: str, base_threshold: float | None) -> dict[str, Any]:
    r = lk.sql(
        "SELECT count(DISTINCT image_id) AS n_images, count(*) AS n_patches, "
        "quantile_cont(norm, 0.5) AS median, quantile_cont(norm, 0.98) AS p98, max(norm) AS max, "
        "count(*) FILTER (WHERE norm > coalesce(?, 'inf'::DOUBLE)) AS above_base "
        "FROM tokens WHERE run = ? AND kind = 'patch'", params=[base_threshold, run]).to_pylist()[0]
    o = lk.sql("SELECT count(*) AS n FROM outliers WHERE run = ?", params=[run]).column(0)[0].as_py()
    r["max_median_ratio"] = r["max"] / r["median"] if r["median"] else None
    r["outliers_own"] = o
    if base_threshold is None:
        r["above_base"] = None
    return r


def registers(lake: Any, *, runs: list[str] | str | None = None, out: str | Path | None = None,
              artifact_rows: dict[str, dict] | None = None) -> dict[str, Any]:
    """The no / trained / test-time register comparison (module doc): rows per run, missing
    pieces, a figure of patch-norm distributions per group, and the K = 0 (any K) patch change."""
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    out = out_dir(lk, out)
    groups: dict[tuple, list[RunInfo]] = {}
    for i in infos:
        if _kind(i) == "test-time" or i.family in ("dinov2", "dinov2_reg4"):
            groups.setdefault(_group_key(i), []).append(i)
    if artifact_rows is None:
        from tokenlake.analyze._artifacts import artifacts

        sel = [i.run for g in groups.values() for i in g]
        artifact_rows = artifacts(lk, runs=sel, out=out)["runs"] if sel else {}
    rows, missing, hists = [], [], []
    for key, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        subset, model, px = key[0], key[1], key[2]
        by = {k: [i for i in members if _kind(i) == k] for k in ("none", "trained", "test-time")}
        label = f"{model} @{px}px on {subset}" + (", keep-if-outlier images" if key[5] else "")
        for k, want in (("none", model), ("trained", model + "_reg4"),
                        ("test-time", f"{model} or {model}_reg4 with --test-time-registers")):
            if not by[k]:
                missing.append(f"{label}: no run with {k} registers ({want})")
        base_thr = None
        if by["none"]:
            base_thr = lk.sql("SELECT threshold FROM thresholds WHERE run = ?",
                              params=[by["none"][0].run]).column(0)[0].as_py()
        for k in ("none", "trained", "test-time"):
            for i in by[k]:
                tt = _cfg(i.manifest, "test_time_registers") or {}
                row = {"group": label, "registers": k, "run": i.run, "model": i.model,
                       "k": tt.get("k"), "source_run": tt.get("source_run"),
                       "random_weights": i.random_weights,
                       **_norm_stats(lk, i.run, base_thr)}
                a = artifact_rows.get(i.run) or {}
                row.update({"jaccard": a.get("jaccard"), "precision": a.get("precision"),
                            "recall": a.get("recall")})
                change = {"base_run": None, "mean_rel_l2": None, "median_rel_l2": None,
                          "max_rel_l2": None}
                if k == "test-time":
                    bases = [j for j in members if _kind(j) != "test-time" and j.model == i.model]
                    # the change needs stored patch embeddings: prefer a run that keeps them all
                    bases.sort(key=lambda j: j.manifest.get("policy") != "all")
                    if bases:
                        change = {"base_run": bases[0].run,
                                  **patch_change(lk, i.run, bases[0].run)}
                        change.pop("n_patches", None)
                    else:
                        missing.append(f"{label}: no {i.model} run without the test-time register "
                                       f"to measure {i.run}'s patch change against")
                row.update(change)
                rows.append(row)
                hists.append((label, i, lk.sql(
                    "SELECT norm FROM tokens WHERE run = ? AND kind = 'patch'",
                    params=[i.run]).column(0).to_numpy()))
    cols = ["group", "registers", "run", "model", "k", "source_run", "random_weights", "n_images",
            "n_patches", "median", "p98", "max", "max_median_ratio", "outliers_own", "above_base",
            "jaccard", "precision", "recall", "base_run", "mean_rel_l2", "median_rel_l2",
            "max_rel_l2"]
    table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows]) if rows else None
    paths = None
    if table is not None:
        paths = save_table(table, out, "registers", meta={"description": __doc__.split(
            "**Comparison**", 1)[1].strip()})
    fig = None
    if hists:
        fig = str(out / "registers.png")
        _draw_hists(hists, Path(fig), [i for _, i, _ in hists])
    return {"rows": rows, "columns": cols, "missing": missing, "table": paths, "figure": fig}


def _draw_hists(hists, path: Path, infos: list[RunInfo]) -> None:
    labels = list(dict.fromkeys(label for label, _, _ in hists))
    with _plot.style():
        fig, axes = _plot.plt.subplots(1, len(labels), figsize=(5.0 * len(labels), 3.6),
                                       squeeze=False)
        for ax, label in zip(axes[0], labels):
            mine = [(i, n) for lab, i, n in hists if lab == label]
            allv = np.concatenate([n for _, n in mine])
            lo, hi = max(allv.min(), 1e-3), max(allv.max(), 1e-3) * 1.05
            bins = np.geomspace(lo, hi, 40) if hi > lo else 10
            for k, (i, n) in enumerate(mine):
                tt = _cfg(i.manifest, "test_time_registers")
                name = f"{i.run} ({_kind(i)}" + (f", K={tt['k']})" if tt else ")")
                ax.hist(n, bins=bins, histtype="step", lw=1.5, label=name,
                        ls=("-", "--", ":", "-.")[k % 4])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("patch-token norm (pre final norm)")
            ax.set_ylabel("patch tokens")
            ax.set_title(label, fontsize=9)
            ax.legend(frameon=False, fontsize=7)
        _plot.suptitle(fig, "Patch norms: no / trained / test-time registers", infos)
        _plot.layout(fig, infos)
        _plot.save(fig, path)
