"""Register neurons from the lake, and the comparison of no / trained / test-time registers.

**Ranking** (`tokenlake neurons`, `rank_neurons`), from the per-image statistics that a run
extracted with ``--record-mlp`` stores (extract/_neuronstats.py). Notation: ``a`` = a neuron's
activation, the input of ``blocks[l].mlp.fc2``; ``thr`` = the run's outlier threshold (98th
percentile of its ``--outlier-ref`` run's final patch norms); ``O_d`` = an image's patch tokens
whose block-``d`` output norm exceeds ``thr``; L blocks, Np patch tokens per image.

``--method jiang`` (default): Jiang et al. 2025, github.com/nickjiang2378/test-time-registers,
shared/algorithms.py ``find_register_neurons`` followed by the notebook's (register_neurons.ipynb)
``filter_layers(register_neurons, highest_layer)``:

    detection block d   ``--detect-block``; default: the block where outlier norms first appear =
                        the first block whose output norm, at the run's final outlier patch tokens
                        (O_{L-1}, all images pooled; the ``outliers`` view), has a median (DuckDB
                        ``median``, interpolated) above thr. Read from the ``blocks`` table
                        through the ``emergence`` view (sql/views/emergence.sql), the one
                        definition the outlier cards (``cards`` view) share.
    images              I_d: the images with at least one token in O_d (theirs: ``continue``)
    score[l, h]         mean over i in I_d of ( mean over p in O_d(i) of |a_i[l, h, p]| ) x s_i[l, h]
    sparsity s_i[l, h]  ``--sparsity-filter on`` (default, as the notebook calls it): 1 if at least
                        ``--sparsity-frac`` (0.5) of image i's patch tokens have a < 0.5, else 0;
                        ``off``: 1. (their apply_sparsity_filter, sparsity_frac_threshold,
                        sparsity_activation_threshold; the 0.5 activation level is fixed when
                        extracting)
    candidates          blocks <= ``--highest-block`` (default d; -1 = the last block, no limit)
                        get a rank, 1 = highest score (ties: lower block, then lower neuron); the
                        other rows keep their score, with rank NULL

Why the limit: a neuron in a block after the outliers appear can only *respond* to them; moving it
onto the extra token leaves the outliers in place. Without it such readers rank first.

``--method contrast`` (this project's first score, kept for comparison): outliers of the last
block, pooled over all images: score = mean a over O_{L-1} - mean a over the other patch tokens;
d is the last block, no sparsity filter, no layer limit by default.

Every row also has, at d: ``mean_abs_outlier`` / ``mean_abs_normal`` (pooled mean |a| over O_d /
over the other patch tokens), ``outlier_share`` (sum of |a| over O_d / over all patch tokens),
``sparse_share`` (share of I_d where the neuron passes the sparsity test). Each choice is a column
(method, detect_block, highest_block, sparsity_filter) and, with the rest, the file's metadata.

Deliberate differences from their code: (1) their outlier threshold is an absolute norm chosen per
model (configs/dinov2_large.yaml: 150 at detect_outliers_layer -2, highest_layer 17); ours is the
run's own threshold applied at the detection block, which is found from the data unless given;
(2) their positions are any token above the threshold, CLS (and trained registers) included, and
their sparsity test counts every token; ours are patch tokens only, as every tokenlake outlier;
(3) they draw ``processed_image_cnt`` random files (unseeded ``random.sample``); ours are the run's
subset, every image of it.

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

METHODS = ("jiang", "contrast")
SPARSITY_FRAC = 0.5  # their sparsity_frac_threshold default

# The emergence block and the per-block medians it is read from are defined ONCE, by the SQL view
# `emergence` (sql/views/emergence.sql), which the outlier cards (`cards` view) read too.
_EMERGENCE = ("SELECT block, median_norm, threshold, n_blocks, emergence_block FROM emergence "
              "WHERE run = ? ORDER BY block")


def _cfg(m: dict[str, Any], key: str) -> Any:
    cfg = m.get("config")
    return cfg.get(key) if isinstance(cfg, dict) else m.get(key)


def emergence(lk: store.Lake, run: str) -> dict[str, Any]:
    """Where the run's outliers emerge (the `emergence` view): {"medians": median output norm per
    block at the final outlier patches (empty without a blocks table or an outlier), "threshold",
    "n_blocks", "block": the first block whose median exceeds the threshold, or None}."""
    t = lk.sql(_EMERGENCE, params=[run]).to_pydict()
    return {"medians": np.asarray(t["median_norm"], np.float64),
            "threshold": t["threshold"][0] if t["block"] else None,
            "n_blocks": t["n_blocks"][0] if t["block"] else None,
            "block": t["emergence_block"][0] if t["block"] else None}


def detection_block(lk: store.Lake, run: str, *, em: dict[str, Any] | None = None) -> int:
    """The default detection block: the block where the run's outliers emerge (`emergence`;
    `em`: its result when already read)."""
    e = emergence(lk, run) if em is None else em
    if not e["medians"].size:
        raise ValueError(f"run {run!r} has no outlier patch token or no per-block norms: nothing "
                         "to find the detection block from")
    if e["block"] is None:
        raise ValueError(f"no block's median norm at the final outliers of run {run!r} exceeds "
                         f"its threshold {e['threshold']}")
    return int(e["block"])


def _block(value: int | None, depth: int, what: str) -> int | None:
    """A block index; negative counts from the end (-1 = the last block), as theirs do."""
    if value is None:
        return None
    if not -depth <= value < depth:
        raise ValueError(f"{what} {value} is outside this model's blocks 0..{depth - 1}")
    return value % depth


def _sums(lk: store.Lake, run: str, ids: np.ndarray, d: int, n_patches: int, frac: float,
          batch: int) -> dict[str, Any]:
    """One pass over the run's statistics, at detection block d (module doc)."""
    acc: dict[str, Any] = {}

    def add(key, value):
        acc[key] = acc.get(key, 0) + value

    for lo in range(0, len(ids), batch):
        chunk = ids[lo:lo + batch]
        count = lk.image_array(run, "mlp_n_outlier", chunk)[:, d].astype(np.int64)  # [n]
        mean = lk.image_array(run, "mlp_abs_outlier", chunk)[:, d].astype(np.float64)  # [n, L, H]
        passes = lk.image_array(run, "mlp_n_below", chunk) >= frac * n_patches  # [n, L, H]
        has = count > 0
        add("score_filtered", (mean * passes)[has].sum(0))
        add("score_plain", mean[has].sum(0))
        add("n_pass", passes[has].sum(0))
        add("n_images", int(has.sum()))
        add("abs_outlier", np.einsum("n,nlh->lh", count.astype(np.float64), mean))
        add("n_outlier", int(count.sum()))
        add("abs_all", lk.image_array(run, "mlp_abs_sum", chunk).astype(np.float64).sum(0))
        add("n_all", len(chunk) * n_patches)
        add("sum_final", lk.image_array(run, "mlp_sum_final", chunk).astype(np.float64).sum(0))
        add("sum_all", lk.image_array(run, "mlp_sum", chunk).astype(np.float64).sum(0))
    return acc


def _stats(acc: dict[str, Any], method: str, sparsity_filter: bool) -> dict[str, np.ndarray]:
    n_out, n_img = acc["n_outlier"], acc["n_images"]
    n_norm = acc["n_all"] - n_out
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(acc["abs_all"] > 0, acc["abs_outlier"] / acc["abs_all"], np.nan)
        # a difference of two float32-rounded sums: a neuron silent off the outliers comes out
        # at +-1e-6, so clip the rounding below zero
        mean_norm = np.maximum(acc["abs_all"] - acc["abs_outlier"], 0) / n_norm if n_norm else (
            np.full_like(share, np.nan))
    if method == "jiang":
        score = acc["score_filtered" if sparsity_filter else "score_plain"] / n_img
    else:  # pooled signed means; d is the last block, so sum_final is the sum over O_d
        score = acc["sum_final"] / n_out - (
            (acc["sum_all"] - acc["sum_final"]) / n_norm if n_norm else 0.0)
    return {"score": score, "mean_abs_outlier": acc["abs_outlier"] / n_out,
            "mean_abs_normal": mean_norm, "outlier_share": share,
            "sparse_share": acc["n_pass"] / n_img}


def rank_neurons(lake: Any, run: str, *, method: str = "jiang", detect_block: int | None = None,
                 highest_block: int | None = None, sparsity_filter: bool | None = None,
                 sparsity_frac: float = SPARSITY_FRAC, top: int = 10,
                 out: str | Path | None = None, batch: int = 8) -> dict[str, Any]:
    """Rank every MLP neuron of a --record-mlp run (module doc); write the ranking to the lake
    and a figure (neurons_<run>.png in `out`, default LAKE/analysis)."""
    lk = as_lake(lake)
    m = lk.manifest(run)
    arrays = lk.layout(run).arrays
    if "mlp_abs_outlier" not in arrays:
        raise ValueError(f"run {run!r} has no register-neuron statistics: extract it with "
                         "--record-mlp --outlier-ref RUN")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    depth = arrays["mlp_abs_outlier"].shape[0]
    threshold = float(_cfg(m, "threshold"))
    last = depth - 1
    det, high = _block(detect_block, depth, "--detect-block"), _block(highest_block, depth,
                                                                       "--highest-block")
    em = emergence(lk, run)
    medians = em["medians"]
    if em["threshold"] is not None and not np.isclose(em["threshold"], threshold, rtol=1e-9,
                                                      atol=0):
        raise ValueError(f"run {run!r} was recorded with threshold {threshold}, but its outliers "
                         f"(the `outliers` view) use {em['threshold']}: the per-block medians "
                         "would be taken at other patches than the statistics")
    if method == "contrast":
        if det not in (None, last) or sparsity_filter:
            raise ValueError("--method contrast compares the last block's outliers with the other "
                             "patches: no --detect-block and no sparsity filter")
        det, rule, sparsity_filter = last, "the last block (contrast)", False
    elif det is None:
        if medians.size != depth:
            raise ValueError(f"run {run!r} has no outlier patch token (threshold {threshold}) or "
                             "no per-block norms: nothing to find the detection block from")
        det = detection_block(lk, run, em=em)
        rule = "first block with median norm > threshold (the `emergence` view)"
    else:
        rule = "--detect-block"
    high = (last if method == "contrast" else det) if high is None else high
    sparsity_filter = True if sparsity_filter is None else sparsity_filter
    if not 0 < sparsity_frac <= 1:
        raise ValueError(f"--sparsity-frac must be in (0, 1], not {sparsity_frac}")
    ids = lk.sql("SELECT image_id FROM images WHERE run = ? ORDER BY image_id",
                 params=[run]).column(0).to_numpy()
    acc = _sums(lk, run, ids, det, _patches(lk, run), sparsity_frac, batch)
    if acc.get("n_outlier", 0) == 0:
        raise ValueError(f"no outlier patch token at block {det} in run {run!r}: nothing to rank "
                         "neurons by")
    stats = _stats(acc, method, sparsity_filter)
    table = _table(run, stats, method=method, detect=det, highest=high,
                   sparsity_filter=sparsity_filter, acc=acc)
    act = (_cfg(m, "record_mlp") or {}).get("sparsity_activation_threshold")
    meta = {"method": method, "definition": _DEFINITIONS[method], "detect_block": det,
            "detect_block_rule": rule, "median_norm_at_final_outliers": medians.tolist(),
            "highest_block": high, "sparsity_filter": sparsity_filter,
            "sparsity_frac_threshold": sparsity_frac if sparsity_filter else None,
            "sparsity_activation_threshold": act if sparsity_filter else None,
            "threshold": threshold, "threshold_run": _cfg(m, "outlier_ref"), "percentile": 0.98,
            "n_images": acc["n_images"], "tokens": "patch",
            "model": m.get("timm_name"), "weights_sha256": m.get("weights_sha256")}
    path = store.write_neurons(lk.path, run, table, meta=meta)
    fig = out_dir(lk, out) / f"neurons_{run}.png"
    ranked = table.filter(table.column("rank").is_valid())
    _draw_ranking(stats["score"], ranked.slice(0, top), fig, run, bool(m.get("random_weights")),
                  method=method, detect=det, highest=high)
    return {"path": str(path), "figure": str(fig), "table": table, "meta": meta,
            "n_outlier": acc["n_outlier"], "n_normal": acc["n_all"] - acc["n_outlier"],
            "n_images": acc["n_images"], "top": ranked.slice(0, top).to_pylist()}


_DEFINITIONS = {
    "jiang": "score = mean over images with outliers at detect_block of (mean |a| at those patch "
             "outliers x sparsity flag); a = fc2 input of each block's MLP (Jiang et al. 2025, "
             "find_register_neurons)",
    "contrast": "score = mean a at the last block's outlier patch tokens - mean a at the other "
                "patch tokens, pooled over images; a = fc2 input of each block's MLP",
}


def _patches(lk: store.Lake, run: str) -> int:
    return int(lk.sql("SELECT count(*) FROM tokens WHERE run = ? AND kind = 'patch' AND "
                      "image_id = (SELECT min(image_id) FROM images WHERE run = ?)",
                      params=[run, run]).column(0)[0].as_py())


def _table(run: str, stats: dict[str, np.ndarray], *, method: str, detect: int, highest: int,
           sparsity_filter: bool, acc: dict[str, Any]) -> pa.Table:
    """One row per (block, neuron): candidates by rank, then the others by score."""
    depth, hidden = stats["score"].shape
    block, neuron = (g.ravel() for g in np.meshgrid(np.arange(depth), np.arange(hidden),
                                                    indexing="ij"))
    score = stats["score"].ravel()
    cand = block <= highest
    order = np.lexsort((neuron, block, -score, ~cand))  # candidates first, then by score
    rank = np.zeros(score.size, np.int64)
    rank[order] = np.arange(1, score.size + 1)
    n = score.size
    return pa.table({
        "run": [run] * n, "method": [method] * n,
        "detect_block": np.full(n, detect, np.int16), "highest_block": np.full(n, highest, np.int16),
        "sparsity_filter": np.full(n, sparsity_filter),
        "rank": pa.array(rank.astype(np.int32), mask=~cand), "block": block.astype(np.int16),
        "neuron": neuron.astype(np.int32), "score": score,
        **{k: stats[k].ravel() for k in ("mean_abs_outlier", "mean_abs_normal", "outlier_share",
                                         "sparse_share")},
        "n_images": np.full(n, acc["n_images"], np.int64),
        "n_outlier": np.full(n, acc["n_outlier"], np.int64),
        "n_normal": np.full(n, acc["n_all"] - acc["n_outlier"], np.int64),
    }).take(pa.array(order))


def _draw_ranking(score: np.ndarray, top: pa.Table, path: Path, run: str, random: bool, *,
                  method: str, detect: int, highest: int) -> None:
    depth, hidden = score.shape
    with _plot.style():
        fig, ax = _plot.plt.subplots(figsize=(max(6.0, 0.45 * depth + 3) + 2.4, 4.0))
        x = np.arange(depth)[:, None] + 0.8 * (np.arange(hidden)[None, :] / max(hidden, 1)) - 0.4
        cand = np.arange(depth)[:, None] <= highest
        ax.scatter(x[~cand.repeat(hidden, 1)], score[~cand.repeat(hidden, 1)], s=4,
                   color="#bbbbbb", lw=0, label=f"blocks > {highest}: not candidates")
        ax.scatter(x[cand.repeat(hidden, 1)], score[cand.repeat(hidden, 1)], s=4,
                   color="#1f77b4", alpha=0.5, lw=0, label=f"candidates (blocks <= {highest})")
        ax.axvspan(detect - 0.5, detect + 0.5, color="#d62728", alpha=0.08, lw=0,
                   label=f"detection block {detect}")
        ax.axvline(highest + 0.5, color="#d62728", ls=":", lw=1, label="last candidate block")
        listing = []  # the top neurons named in a box: labels beside close points overlap
        for r in top.to_pylist():
            xi = r["block"] + 0.8 * r["neuron"] / hidden - 0.4
            ax.scatter([xi], [r["score"]], s=18, color="#d62728")
            ax.annotate(f"{r['rank']}", (xi, r["score"]), fontsize=6, color="#d62728",
                        xytext=(3, 2), textcoords="offset points")
            listing.append(f"#{r['rank']:<3} block {r['block']:>2} neuron {r['neuron']:<5} "
                           f"{r['score']:.3g}")
        if listing:
            ax.text(1.01, 1.0, "top neurons\n" + "\n".join(listing), transform=ax.transAxes,
                    va="top", ha="left", fontsize=7, family="monospace")
        if highest < depth - 1:  # the best neuron the layer limit leaves out, for comparison
            b, n = np.unravel_index(np.argmax(score[highest + 1:]), score[highest + 1:].shape)
            b += highest + 1
            xi = b + 0.8 * n / hidden - 0.4
            ax.scatter([xi], [score[b, n]], s=18, color="#777777")
            ax.annotate(f"best left out: b{b}:n{n}", (xi, score[b, n]), fontsize=7,
                        color="#777777", xytext=(3, 3), textcoords="offset points")
        ax.set_xticks(range(depth))
        ax.set_xlabel("block (neurons spread within the block's column)")
        ax.set_ylabel("score: mean |act.| at outliers (Jiang et al.)" if method == "jiang"
                      else "mean act. at outliers − at other patches")
        ax.legend(frameon=False, fontsize=7, loc="lower left", bbox_to_anchor=(1.0, 0.0))
        title = f"Register-neuron ranking of {run} ({method})"
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
            ax.legend(frameon=False, fontsize=7, loc="lower left", bbox_to_anchor=(1.0, 0.0))
        _plot.suptitle(fig, "Patch norms: no / trained / test-time registers", infos)
        _plot.layout(fig, infos)
        _plot.save(fig, path)
