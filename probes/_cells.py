"""Reconstruction targets (paper Table 2): which pixels a token is asked to reconstruct.

The paper: "A linear layer reconstructs the image patch from token embeddings (D), outputting
P^2 x 3 values (flattened RGB patch)". For ViT and Swin the patch under token (i, j) is its
aligned cell, rows [P*i, P*(i+1)), and the token's receptive field is centred on it: both targets
coincide. PVT-v2's overlapping convolutions centre token (i, j) on pixel (32i, 32j), half a cell
up-left of its aligned cell (token_layout rf_offset -16). Two targets, chosen by `target`:

* "aligned" (default): the aligned 32x32 cell, the "flattened RGB patch" a reader expects, with no
  zero-filled margin;
* "centred": the cell centred on the receptive field. New PVT runs store the aligned cells
  (pixel_offset 0), so the centred cell is assembled from the aligned cells of the token and its
  up, left and up-left neighbours (zeros outside the image), which must all be stored. PVT runs
  written before (pixel_offset -16, no rf_offset) stored the centred cells: "centred" reads them,
  "aligned" cannot be derived from them (the last row and column lack their far half) and is
  refused, naming the re-extraction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tokenlake.probes._data import ProbeError, RunInfo
from tokenlake.store import Lake

TARGETS = ("aligned", "centred")


@dataclass(frozen=True)
class CellPlan:
    target: str
    pixel_offset: int  # where the stored cell starts, relative to the aligned cell
    rf_offset: int  # where the receptive-field-centred cell starts, relative to the aligned cell
    derive: bool  # True: centred cells assembled from stored aligned cells
    source: str  # in words, for the result

    def to_dict(self) -> dict:
        return {"target": self.target, "pixel_offset": self.pixel_offset,
                "rf_offset": self.rf_offset, "derived_from_neighbours": self.derive,
                "cells": self.source}


def plan_cells(lake: Lake, run: str, info: RunInfo, target: str) -> CellPlan:
    """How the `target` cells of `run` are read; ProbeError when they cannot be."""
    if target not in TARGETS:
        raise ProbeError(f"target must be one of {TARGETS}, got {target!r}")
    lay = info.layout
    po = int(lay.get("pixel_offset") or 0)
    # runs written before rf_offset was recorded stored the receptive-field-centred cell
    rf = int(lay["rf_offset"]) if lay.get("rf_offset") is not None else po
    same = "aligned = centred: the token's receptive field is centred on its aligned cell"
    if target == "aligned":
        if po != 0:
            raise ProbeError(
                f"run {run!r} stores the receptive-field-centred cell under each token (token_layout "
                f"pixel_offset {po}: written before tokenlake stored the aligned cell), so the "
                "aligned reconstruction target is not available (the last row and column lack "
                "half their pixels). Re-extract the run into a new one, e.g. "
                f"`{lake.reextract_command(run)}`, or reconstruct the centred cells "
                "(target='centred', --target centred).")
        return CellPlan(target, po, rf, False, "stored aligned cells" + (
            f" ({same})" if rf == 0 else ""))
    if rf == po:
        return CellPlan(target, po, rf, False, "stored cells" + (
            f" ({same})" if rf == 0 else ", centred on the receptive field"))
    cell = info.cell or 0
    if po == 0 and -cell < rf < 0:
        return CellPlan(target, po, rf, True,
                        f"centred cells assembled from the stored aligned cells of the token and "
                        f"its up, left and up-left neighbours (offset {rf} px; zeros outside the "
                        "image)")
    raise ProbeError(f"run {run!r}: cannot form centred cells from token_layout pixel_offset {po}, "
                     f"rf_offset {rf} (cell {cell})")


def neighbour_slots(idx: dict[str, np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """[N, 4] slots of the up-left, up, left neighbours and the token itself, for every token of
    the patch index; -1 outside the grid (zeros there). ProbeError when a neighbour inside the grid
    has no stored pixels: its quarter of the centred cell is unknown."""
    gh, gw = grid
    images, pos = np.unique(idx["image_id"], return_inverse=True)
    table = np.full((images.size, gh + 1, gw + 1), -1, np.int64)  # row/col 0: outside the grid
    stored = np.zeros((images.size, gh + 1, gw + 1), bool)
    stored[:, 0, :] = stored[:, :, 0] = True
    r, c = idx["row"] + 1, idx["col"] + 1
    table[pos, r, c] = idx["slot"]
    stored[pos, r, c] = True
    quads = [(r - 1, c - 1), (r - 1, c), (r, c - 1), (r, c)]
    out = np.stack([table[pos, a, b] for a, b in quads], 1)
    ok = np.stack([stored[pos, a, b] for a, b in quads], 1).all(1)
    if not ok.all():
        raise ProbeError(
            f"{int((~ok).sum())} of {ok.size} patch tokens lack a stored up/left neighbour, whose "
            "pixels the receptive-field-centred cell needs; use the aligned target "
            "(target='aligned', --target aligned) or a run that stores every patch (--policy all)")
    return out


def assemble_centred(quads: np.ndarray, lead: int) -> np.ndarray:
    """uint8 [n, 4, P, P, 3] aligned cells (up-left, up, left, self) -> [n, P, P, 3] the cell that
    starts `lead` pixels up and left of the token's aligned cell."""
    m = quads.shape[2] - lead
    out = np.empty_like(quads[:, 0])
    out[:, :lead, :lead] = quads[:, 0, m:, m:]
    out[:, :lead, lead:] = quads[:, 1, m:, :m]
    out[:, lead:, :lead] = quads[:, 2, :m, m:]
    out[:, lead:, lead:] = quads[:, 3, :m, :m]
    return out


def centred_reader(lake: Lake, run: str, quad_slots: np.ndarray, lead: int, cell: int
                   ) -> Callable[[np.ndarray], np.ndarray]:
    """positions -> uint8 [n, P, P, 3] centred cells of the tokens at those rows of quad_slots."""

    def read(positions: np.ndarray) -> np.ndarray:
        q = quad_slots[positions].reshape(-1)
        pix = np.zeros((q.size, cell, cell, 3), np.uint8)
        inside = q >= 0
        if inside.any():
            # Lake.gather reads pixels together with embeddings; the embeddings are dropped
            pix[inside] = lake.gather(run, q[inside], pixels=True)[1]
        return assemble_centred(pix.reshape(len(positions), 4, cell, cell, 3), lead)

    return read
