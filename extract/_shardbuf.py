"""Host-side accumulation of one shard's results, turned into the lake's tables and arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from tokenlake.extract._adapters import TokenLayout
from tokenlake.extract._loader import InputRow


@dataclass
class ImageResult:
    row: InputRow
    width: int
    height: int
    norm: np.ndarray  # [T] fp32
    attn: np.ndarray  # [T] fp32
    nbr_cos: np.ndarray  # [Np] fp32
    stored: np.ndarray  # [k] token indices with an embedding slot
    embeddings: np.ndarray  # [k, D] fp16
    cells: np.ndarray  # [k, P, P, 3] uint8 (zeros for prefix tokens)
    per_image: dict[str, np.ndarray]  # cls_post [D], patch_mean_post [D], registers_post [R, D],
    # mlp_acts [L, H, Np] (--record-mlp; stored as float16)
    block_norm: np.ndarray | None = None  # [L, T]
    qkv_norm: np.ndarray | None = None  # [3, T]


@dataclass
class ShardBuffer:
    shard: int
    shard_size: int
    layout: TokenLayout
    images: list[ImageResult] = field(default_factory=list)
    errors: list[tuple[InputRow, str]] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)  # image ids refused by --keep-if-outlier

    def truncate(self, n_images: int) -> None:
        """End the shard's input stream right after its n-th kept image (keep-if-outlier's quota)."""
        cutoff = self.images[n_images - 1].row.image_id if n_images else -1
        del self.images[n_images:]
        self.errors = [(r, why) for r, why in self.errors if r.image_id <= cutoff]
        self.rejected = [i for i in self.rejected if i <= cutoff]

    def _kinds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lay = self.layout
        kind = np.array(["cls"] * lay.n_cls + ["reg"] * lay.n_reg + ["ttreg"] * lay.n_ttreg
                        + ["patch"] * lay.n_patches)
        rows = np.arange(lay.n_patches) // lay.grid[1]
        cols = np.arange(lay.n_patches) % lay.grid[1]
        return kind, rows, cols

    def tables(self) -> dict:
        lay = self.layout
        t, n = lay.n_tokens, len(self.images)
        kind, rows, cols = self._kinds()
        prefix_null = np.zeros(t, dtype=bool)
        prefix_null[: lay.n_prefix] = True
        slot = np.full((n, t), -1, dtype=np.int64)
        offset = 0
        for i, img in enumerate(self.images):
            slot[i, img.stored] = np.arange(offset, offset + img.stored.size)
            offset += img.stored.size
        norm = np.stack([r.norm for r in self.images]) if n else np.zeros((0, t), np.float32)
        attn = np.stack([r.attn for r in self.images]) if n else np.zeros((0, t), np.float32)
        nbr = np.full((n, t), np.nan, dtype=np.float32)
        if n:
            nbr[:, lay.n_prefix:] = np.stack([r.nbr_cos for r in self.images])
        ids = np.array([r.row.image_id for r in self.images], dtype=np.int64)
        rc_mask = np.tile(prefix_null, n)
        row_col = np.concatenate([np.full(lay.n_prefix, -1), rows]), np.concatenate(
            [np.full(lay.n_prefix, -1), cols])
        tokens = pa.table({
            "image_id": np.repeat(ids, t),
            "token": np.tile(np.arange(t, dtype=np.int32), n),
            "kind": np.tile(kind, n),
            "row": pa.array(np.tile(row_col[0], n).astype(np.int16), mask=rc_mask),
            "col": pa.array(np.tile(row_col[1], n).astype(np.int16), mask=rc_mask),
            "norm": norm.reshape(-1).astype(np.float32),
            "attn": attn.reshape(-1).astype(np.float32),
            "nbr_cos": pa.array(nbr.reshape(-1), mask=rc_mask),
            "slot": pa.array(slot.reshape(-1), mask=slot.reshape(-1) < 0),
        })
        patch_norm = norm[:, lay.n_prefix:]
        images = pa.table({
            "image_id": ids,
            "source_index": np.array([r.row.source_index for r in self.images], dtype=np.int64),
            "source_id": pa.array([r.row.source_id for r in self.images], pa.string()),
            "label": pa.array([r.row.label for r in self.images], pa.int64()),
            "width": np.array([r.width for r in self.images], dtype=np.int32),
            "height": np.array([r.height for r in self.images], dtype=np.int32),
            "n_tokens": np.full(n, t, dtype=np.int32),
            "max_patch_norm": patch_norm.max(1) if n else np.zeros(0, np.float32),
            "mean_patch_norm": patch_norm.mean(1).astype(np.float32) if n else np.zeros(0, np.float32),
        })
        errors = pa.table({
            "image_id": pa.array([r.image_id for r, _ in self.errors], pa.int64()),
            "source_index": pa.array([r.source_index for r, _ in self.errors], pa.int64()),
            "source_id": pa.array([r.source_id for r, _ in self.errors], pa.string()),
            "reason": pa.array([why for _, why in self.errors], pa.string()),
        })
        return {"images": images, "tokens": tokens, "errors": errors, "blocks": self._blocks(ids)}

    def _blocks(self, ids: np.ndarray) -> pa.Table | None:
        if not self.images or self.images[0].block_norm is None:
            return None
        lay = self.layout
        t, depth, n = lay.n_tokens, lay.depth, len(self.images)
        block_norm = np.stack([r.block_norm for r in self.images])  # [N, L, T]
        qkv = np.stack([r.qkv_norm for r in self.images])  # [N, 3, T]
        last = np.zeros((n, depth, t), dtype=bool)
        last[:, -1] = True
        qkv_full = np.zeros((3, n, depth, t), dtype=np.float32)
        qkv_full[:, :, -1] = qkv.transpose(1, 0, 2)
        mask = ~last.reshape(-1)
        return pa.table({
            "image_id": np.repeat(ids, depth * t),
            "token": np.tile(np.arange(t, dtype=np.int32), n * depth),
            "block": np.tile(np.repeat(np.arange(depth, dtype=np.int16), t), n),
            "norm": block_norm.reshape(-1).astype(np.float32),
            "q_norm": pa.array(qkv_full[0].reshape(-1), mask=mask),
            "k_norm": pa.array(qkv_full[1].reshape(-1), mask=mask),
            "v_norm": pa.array(qkv_full[2].reshape(-1), mask=mask),
        })

    def arrays(self, image_arrays: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """Token arrays by local slot; image arrays by row of ``images``."""
        lay = self.layout
        out: dict[str, np.ndarray] = {}
        if self.images:
            out["tokens"] = np.concatenate([r.embeddings for r in self.images])
            out["pixels"] = np.concatenate([r.cells for r in self.images])
        else:
            out["tokens"] = np.zeros((0, lay.embed_dim), np.float16)
            out["pixels"] = np.zeros((0, lay.cell, lay.cell, 3), np.uint8)
        for name, shape in image_arrays.items():  # aligned with the rows of `images`
            dtype = np.float16 if name == "mlp_acts" else np.float32
            out[name] = (np.stack([r.per_image[name] for r in self.images]).astype(dtype)
                         if self.images else np.zeros((0, *shape), dtype))
        return out
