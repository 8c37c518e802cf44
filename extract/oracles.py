"""Independent computations that tests hold the adapters against.

Each is the definition written out the slow, obvious way (loops, timm's own unfused attention
path), so a test that compares an adapter's output with it checks the definition, not a copy of
the adapter's code. Shared by the family tests and usable by anyone adding a family.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def nbr_cos_by_loops(grid: np.ndarray) -> np.ndarray:
    """[H, W, C] -> [H*W]: each cell's mean cosine with its 4-neighbours inside the grid."""
    h, w, _ = grid.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            sims = [grid[i, j] @ grid[a, b] / np.linalg.norm(grid[i, j]) / np.linalg.norm(grid[a, b])
                    for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
                    if 0 <= a < h and 0 <= b < w]
            out[i, j] = np.mean(sims)
    return out.reshape(-1)


def probs_from_unfused(attn_module: torch.nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """timm's own attention probabilities [B, h, T, T] (rotary embeddings included): with the
    fused kernel switched off, the softmax output is the input of ``attn_drop``; `run` runs the
    model once."""
    captured = {}
    attn_module.fused_attn = False
    handle = attn_module.attn_drop.register_forward_hook(
        lambda _m, args, _o: captured.setdefault("p", args[0]))
    try:
        run()
    finally:
        handle.remove()
        attn_module.fused_attn = True
    return captured["p"]
