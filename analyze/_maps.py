"""Job `maps`: feature-norm and attention maps of chosen images across runs, beside the input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def attn_title(info: RunInfo) -> str:
    return "received attention" if info.hierarchical else "CLS attention"


def image_rows(lk: Lake, infos: list[RunInfo], sources: list[str]) -> dict[tuple[str, str], int]:
    t = query(lk, "images_by_source", [[i.run for i in infos], sources])
    return {(r, s): i for r, s, i in zip(t.column("run").to_pylist(),
                                          t.column("source_id").to_pylist(),
                                          t.column("image_id").to_pylist())}


def maps(lake: Any, *, runs: list[str] | str | None = None, out: str | Path | None = None,
         percentile: float = 0.98, images: list[str] | str | None = None,
         n_images: int = 3) -> dict[str, Any]:
    """Feature maps (L2 norm before the final norm, per patch) and attention maps (tokens.attn: CLS
    attention for ViTs, received attention for Swin/PVT) for the same images (same source_id) in
    every run, beside the input image reassembled from the stored patch pixels. Outliers
    (norm > the run's `percentile` threshold) are outlined in red; each map has its own colour bar.

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
    parts, panels = [], {}
    for info in infos:
        for s in sources:
            iid = where.get((info.run, s))
            if iid is None or info.run not in thr:
                panels[info.run, s] = None
                continue
            t = query(lk, "patch_grid", [info.run, [iid], float(thr[info.run])])
            parts.append(t.append_column("threshold", pa.array([thr[info.run]] * len(t), pa.float64())))
            panels[info.run, s] = t
    table = pa.concat_tables(parts) if parts else None
    if table is None:
        raise LakeError(f"maps: none of {sources} found in runs {[i.run for i in infos]}")
    fig_path = out / "maps.png"
    _draw(lk, infos, sources, panels, fig_path, percentile)
    meta = {
        "description": "Per-patch values drawn in maps.png: norm = L2 norm of the last block's "
                       "output before the final norm; attn = tokens.attn (ViT: CLS attention, mean "
                       "over heads; Swin/PVT: attention received); is_outlier = norm > threshold.",
        "percentile": percentile, "images": sources,
        "command": command("maps", lk.path, out, infos, percentile) + f" --images {','.join(sources)}",
    }
    cols = ["run", "image_id", "source_id", "token", "row", "col", "norm", "attn", "nbr_cos",
            "is_outlier", "threshold"]
    paths = save_table(table.select(cols), out, "maps", meta=meta)
    return {"figure": str(fig_path), "table": paths, "images": sources,
            "runs": [i.run for i in infos], "command": meta["command"]}


def _draw(lk: Lake, infos: list[RunInfo], sources: list[str], panels: dict, path: Path,
          percentile: float) -> None:
    nr, nc = len(infos), 3 * len(sources)
    with _plot.style():
        fig, axes = _plot.plt.subplots(nr, nc, figsize=(2.5 * nc, 2.55 * nr + 0.6), squeeze=False)
        for r, info in enumerate(infos):
            for k, s in enumerate(sources):
                ax_img, ax_norm, ax_attn = axes[r, 3 * k: 3 * k + 3]
                t = panels[info.run, s]
                head = f"{s}\n" if r == 0 else ""
                if t is None or len(t) == 0:
                    for ax in (ax_img, ax_norm, ax_attn):
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
            _plot.row_label(axes[r, 0], info, info.label.replace("  ", "\n"))
        _plot.suptitle(fig, f"Feature and attention maps — outlined: outliers (norm > "
                            f"{percentile * 100:g}th percentile; red on norm, cyan on attention)", infos)
        _plot.layout(fig, infos)
        _plot.save(fig, path)
