"""Job `blocks`: appendix A, per-block feature maps and per-block q/k/v norm maps."""

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

NO_BLOCKS = "no per-block norms: extract this run with `tokenlake extract ... --blocks all`"


def blocks(lake: Any, *, runs: list[str] | str | None = None, out: str | Path | None = None,
           percentile: float = 0.98, n_images: int = 2, max_blocks: int = 12) -> dict[str, Any]:
    """Per-block norm maps (blocks.norm of every block's output) and every block's q/k/v norm
    maps for runs extracted with --blocks all; the first `n_images` images of each such run, up
    to `max_blocks` evenly spaced blocks drawn (always the first and last; the table has all).
    Runs without blocks are reported under 'missing' with NO_BLOCKS. Writes blocks_<run>.png and
    blocks.parquet/.csv (the patch rows of the images drawn)."""
    lk = as_lake(lake)
    infos = resolve_runs(lk, runs)
    out = out_dir(lk, out)
    have = query(lk, "block_images", [[i.run for i in infos]]).to_pydict()
    thr = thresholds(lk, infos, percentile)
    figures, missing, parts = {}, {}, []
    for info in infos:
        ids = [i for r, i in zip(have["run"], have["image_id"]) if r == info.run][:n_images]
        if not ids:
            missing[info.run] = NO_BLOCKS
            continue
        t = query(lk, "block_grid", [info.run, ids])
        parts.append(t)
        p = out / f"blocks_{info.run}.png"
        _draw(lk, info, t, ids, p, max_blocks, thr.get(info.run))
        figures[info.run] = str(p)
    cmd = command("blocks", lk.path, out, infos, percentile)
    res: dict[str, Any] = {"figures": figures, "missing": missing, "command": cmd}
    if parts:
        res["table"] = save_table(pa.concat_tables(parts), out, "blocks", meta={
            "description": "Per-block output norms and q/k/v norms of the "
                           "patch tokens of the images drawn in blocks_<run>.png.",
            "missing": missing, "command": cmd})
    return res


def _pick(blocks_: list[int], k: int) -> list[int]:
    if k <= 0 or len(blocks_) <= k:
        return blocks_
    idx = np.unique(np.round(np.linspace(0, len(blocks_) - 1, k)).astype(int))
    return [blocks_[i] for i in idx]


QUANTITIES = (("norm", "output ‖x‖", "viridis"), ("q_norm", "‖q‖", "cividis"),
              ("k_norm", "‖k‖", "cividis"), ("v_norm", "‖v‖", "cividis"))


def _draw(lk, info: RunInfo, t: pa.Table, ids: list[int], path: Path, max_blocks: int,
          threshold: float | None) -> None:
    """Per image a group of four rows (block output norm, then the block's ‖q‖, ‖k‖, ‖v‖: the
    paper's Figure 9 and the q/k/v maps appendix A.2 reads across blocks 19-20), one column per
    shown block, the input image first."""
    d = {c: t.column(c).to_numpy(zero_copy_only=False) for c in
         ("image_id", "block", "row", "col", "norm", "q_norm", "k_norm", "v_norm")}
    all_blocks = sorted(set(d["block"].tolist()))
    shown = _pick(all_blocks, max_blocks)
    last = all_blocks[-1]
    ncol, nrow = 1 + len(shown), 4 * len(ids)
    with _plot.style():
        fig, axes = _plot.plt.subplots(nrow, ncol, figsize=(1.9 * ncol + 0.4, 1.9 * nrow + 0.7),
                                       squeeze=False)
        for r, iid in enumerate(ids):
            sel = d["image_id"] == iid
            pg = query(lk, "patch_grid", [info.run, [iid], float(threshold or np.inf)])
            img, why = input_image(lk, info, pg)
            _plot.image_panel(axes[4 * r, 0], img, title=f"image {iid}\ninput", missing=why)
            shape = grid_shape(info, d["row"][sel], d["col"][sel])
            for q, (key, label, cmap) in enumerate(QUANTITIES):
                row = 4 * r + q
                if q:
                    axes[row, 0].axis("off")
                    axes[row, 0].text(0.5, 0.5, f"image {iid}\n{label}", ha="center",
                                      va="center", fontsize=9, transform=axes[row, 0].transAxes)
                for c, b in enumerate(shown, start=1):
                    m = sel & (d["block"] == b)
                    v = d[key][m].astype(float)
                    title = f"block {b}" + (" (last)" if b == last else "") if q == 0 else ""
                    if not np.isfinite(v).any():  # runs extracted before schema 3: last block only
                        _plot.image_panel(axes[row, c], None, title=title,
                                          missing=f"{label}\nnot stored")
                        continue
                    g = to_grid(shape, d["row"][m], d["col"][m], v)
                    _plot.map_panel(axes[row, c], fig, g, cmap=cmap, title=title,
                                    cbar_label=label if c == ncol - 1 else "")
        note = "" if len(shown) == len(all_blocks) else f" ({len(shown)} of {len(all_blocks)} blocks shown)"
        _plot.suptitle(fig, f"Per-block feature maps and q/k/v norms — {info.label}{note}", [info])
        _plot.layout(fig, [info])
        _plot.save(fig, path)
