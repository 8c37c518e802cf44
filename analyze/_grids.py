"""Grids and input images of chosen images, reassembled from the lake (tokens + stored pixels)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tokenlake.analyze._common import RunInfo
from tokenlake.store import Lake


def grid_shape(info: RunInfo, rows: np.ndarray, cols: np.ndarray) -> tuple[int, int]:
    g = info.layout.get("grid")
    if g:
        return int(g[0]), int(g[1])
    return int(rows.max()) + 1, int(cols.max()) + 1


def to_grid(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Values laid out at (row, col); cells without a token are NaN."""
    g = np.full(shape, np.nan, np.float64)
    g[rows.astype(int), cols.astype(int)] = values
    return g


def input_image(lk: Lake, info: RunInfo, part: pa.Table) -> tuple[np.ndarray | None, str]:
    """The input image of one image's patch tokens (`part`: rows of patch_grid) from the stored
    pixels, laid out by row/col; PVT cells are offset by half a cell (token_layout.pixel_offset).
    Returns (image or None, reason when None)."""
    if "pixels" not in lk.layout(info.run).arrays:
        return None, "pixels not stored\nfor this run"
    slot = part.column("slot")
    if slot.null_count:
        return None, "pixels not stored\nfor this image\n(token policy)"
    slots = slot.to_numpy()
    _, px = lk.gather(info.run, slots, pixels=True)
    rows = part.column("row").to_numpy().astype(int)
    cols = part.column("col").to_numpy().astype(int)
    gh, gw = grid_shape(info, rows, cols)
    p = px.shape[1]
    canvas = np.zeros((gh * p, gw * p, 3), np.uint8)
    for k in range(len(slots)):
        canvas[rows[k] * p:(rows[k] + 1) * p, cols[k] * p:(cols[k] + 1) * p] = px[k]
    lead = -int(info.layout.get("pixel_offset", 0) or 0)
    if lead > 0:
        canvas = canvas[lead:, lead:]  # cells start half a cell before the image (PVT)
    return canvas, ""
