"""Job `maps`: feature-norm and attention maps of chosen images across runs, beside the input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tokenlake.analyze import _plot
from tokenlake.analyze._common import (
    RunInfo,
    as_lake,
    command,
    out_dir,
    query,
    resolve_runs,
    save_table,
    thresholds,
)
from tokenlake.analyze._grids import grid_shape, input_image, to_grid
from tokenlake.store import Lake, LakeError


def choose_images(lk: Lake, infos: list[RunInfo], thr: dict[str, float], n: int) -> list[str]:
    """Default images: source_ids present in every run, those with outliers in most runs first."""
    runs = [i.run for i in infos if i.run in thr]
    t = query(lk, "common_images", [runs, [float(thr[r]) for r in runs]])
    return t.column("source_id").to_pylist()[:n]


# The per-image array of models with an attention-pooling head (SigLIP; extract/families/siglip.py):
# the pooling query's attention over the tokens, [T] per image. Drawn as a fourth map when present.
POOL = "attn_pool"


def attn_title(info: RunInfo) -> str:
    """What tokens.attn holds: CLS attention, or (no CLS: Swin, PVT, SigLIP, AIMv2) the attention
    each token receives."""
    return "received attention" if info.hierarchical or info.layout.get("n_cls") == 0 else (
        "CLS attention")


def has_pool_map(lk: Lake, info: RunInfo) -> bool:
    return POOL in lk.layout(info.run).arrays


def image_rows(lk: Lake, infos: list[RunInfo], sources: list[str]) -> dict[tuple[str, str], int]:
    t = query(lk, "images_by_source", [[i.run for i in infos], sources])
    return {(r, s): i for r, s, i in zip(t.column("run").to_pylist(),
                                          t.column("source_id").to_pylist(),
                                          t.column("image_id").to_pylist())}


def maps(lake: Any, *, runs: list[str] | str | None = None, out: str | Path | None = None,
         percentile: float = 0.98, images: list[str] | str | None = None,
         n_images: int = 3) -> dict[str, Any]:
    """Feature maps (L2 norm before the final norm, per patch) and attention maps (tokens.attn: CLS
    attention for ViTs, received attention for Swin/PVT and ViTs without CLS) for the same images
    (same source_id) in every run, beside the input image reassembled from the stored patch pixels.
    Runs of models with an attention-pooling head (image array `attn_pool`) get a fourth map, the
    pooling query's attention over the patches. Outliers (norm > the run's `percentile`
    threshold) are outlined in red; each map has its own colour bar.

    images: source_ids (list or comma string); default the `n_images` inputs present in every
    run that have outliers in the most runs. Writes maps.png and maps.parquet/.csv (one row per
    (run, image, patch): the grid values drawn). Returns paths and the images used.
    """
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    out = out_dir(lk, out)
    thr = thresholds(lk, infos, percentile)
    if isinstance(images, str):
        images = [s.strip() for s in images.split(",") if s.strip()]
    sources = list(images) if images else choose_images(lk, infos, thr, n_images)
    if not sources:
        raise LakeError("maps: no input is present in every chosen run; pass --images or --runs")
    where = image_rows(lk, infos, sources)
    pooled = {i.run for i in infos if has_pool_map(lk, i)}
    parts, panels = [], {}
    for info in infos:
        for s in sources:
            iid = where.get((info.run, s))
            if iid is None or info.run not in thr:
                panels[info.run, s] = None
                continue
            t = query(lk, "patch_grid", [info.run, [iid], float(thr[info.run])])
            t = t.append_column("threshold", pa.array([thr[info.run]] * len(t), pa.float64()))
            if pooled:  # the column only when some run has a pooling head
                vals = None
                if info.run in pooled:  # [T] per image, indexed by token
                    row = lk.image_array(info.run, POOL, np.array([iid]))[0]
                    vals = row[t.column("token").to_numpy()]
                t = t.append_column(POOL, pa.array(vals, pa.float32()) if vals is not None
                                    else pa.nulls(len(t), pa.float32()))
            parts.append(t)
            panels[info.run, s] = t
    table = pa.concat_tables(parts) if parts else None
    if table is None:
        raise LakeError(f"maps: none of {sources} found in runs {[i.run for i in infos]}")
    fig_path = out / "maps.png"
    _draw(lk, infos, sources, panels, fig_path, percentile, pooled)
    meta = {
        "description": "Per-patch values drawn in maps.png: norm = L2 norm of the last block's "
                       "output before the final norm; attn = tokens.attn (ViT: CLS attention, mean "
                       "over heads; Swin/PVT and ViTs without CLS: attention received); "
                       "is_outlier = norm > threshold; attn_pool (only when a run has an "
                       "attention-pooling head, NULL for the others) = the pooling query's "
                       "attention over the tokens, mean over heads (image array attn_pool).",
        "percentile": percentile, "images": sources,
        "command": command("maps", lk.path, out, infos, percentile) + f" --images {','.join(sources)}",
    }
    cols = ["run", "image_id", "source_id", "token", "row", "col", "norm", "attn", "nbr_cos",
            "is_outlier", "threshold"] + ([POOL] if pooled else [])
    paths = save_table(table.select(cols), out, "maps", meta=meta)
    return {"figure": str(fig_path), "table": paths, "images": sources,
            "runs": [i.run for i in infos], "command": meta["command"]}


def _draw(lk: Lake, infos: list[RunInfo], sources: list[str], panels: dict, path: Path,
          percentile: float, pooled: set[str]) -> None:
    per = 4 if pooled else 3  # input, norm, attention (, pooling-query attention)
    nr, nc = len(infos), per * len(sources)
    with _plot.style():
        fig, axes = _plot.plt.subplots(nr, nc, figsize=(2.5 * nc, 2.55 * nr + 0.6), squeeze=False)
        for r, info in enumerate(infos):
            for k, s in enumerate(sources):
                ax_img, ax_norm, ax_attn = axes[r, per * k: per * k + 3]
                t = panels[info.run, s]
                head = f"{s}\n" if r == 0 else ""
                if t is None or len(t) == 0:
                    for ax in axes[r, per * k: per * k + per]:
                        _plot.image_panel(ax, None, title=head, missing="not in this run")
                    continue
                rows, cols = t.column("row").to_numpy(), t.column("col").to_numpy()
                shape = grid_shape(info, rows, cols)
                norm = to_grid(shape, rows, cols, t.column("norm").to_numpy())
                attn = to_grid(shape, rows, cols, t.column("attn").to_numpy(zero_copy_only=False))
                out_m = to_grid(shape, rows, cols, t.column("is_outlier").to_numpy(zero_copy_only=False)) == 1
                img, why = input_image(lk, info, t)
                _plot.image_panel(ax_img, img, title=head + "input (stored pixels)", missing=why)
                n_out = int(out_m.sum())
                _plot.map_panel(ax_norm, fig, norm, marks=out_m,
                                title=head + f"‖x‖ pre-norm ({n_out} outl.)", cbar_label="L2 norm")
                _plot.map_panel(ax_attn, fig, attn, marks=out_m, cmap="magma", mark_color="#00e5ff",
                                title=head + attn_title(info), cbar_label="attention")
                if pooled:
                    ax_pool = axes[r, per * k + 3]
                    if info.run in pooled:
                        pool = to_grid(shape, rows, cols, t.column(POOL).to_numpy(zero_copy_only=False))
                        _plot.map_panel(ax_pool, fig, pool, marks=out_m, cmap="magma",
                                        mark_color="#00e5ff", title=head + "pooling-query attention",
                                        cbar_label="attention")
                    else:
                        _plot.image_panel(ax_pool, None, title=head + "pooling-query attention",
                                          missing="no attention-pooling head")
            _plot.row_label(axes[r, 0], info, info.label.replace("  ", "\n"))
        _plot.suptitle(fig, f"Feature and attention maps — outlined: outliers (norm > "
                            f"{percentile * 100:g}th percentile; red on norm, cyan on attention)", infos)
        _plot.layout(fig, infos)
        _plot.save(fig, path)
