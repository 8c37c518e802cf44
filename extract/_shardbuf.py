"""Host-side accumulation of one shard's results, turned into the lake's tables and arrays.

Results arrive a batch at a time as arrays; embeddings and pixel cells are copied once, into
buffers that grow by doubling, so the writer hands whole contiguous arrays to the store.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from tokenlake.extract._adapters import TokenLayout
from tokenlake.extract._loader import InputRow
from tokenlake.store import ArraySpec


def copy_rows(dst: np.ndarray, src: np.ndarray | torch.Tensor) -> None:
    """dst[...] = src with torch's copy, which splits large copies over the intra-op threads
    (numpy copies on one core; at GPU rates these copies are most of the host's work)."""
    src = torch.from_numpy(src) if isinstance(src, np.ndarray) else src
    torch.from_numpy(dst).copy_(src)


class RowPool:
    """Recycles the row buffers of written shards. Fresh memory costs a page fault per 4 KiB, and
    at GPU rates that costs several times the copy into it (measured: 80 ms against 14 ms for a
    256-image batch of pixel cells)."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()  # the writer thread gives back, the main thread takes

    def take(self, row_shape: tuple[int, ...], dtype, rows: int) -> np.ndarray:
        with self._lock:
            for i, a in enumerate(self._free):
                if a.shape[1:] == row_shape and a.dtype == dtype and a.shape[0] >= rows:
                    return self._free.pop(i)
        return np.empty((max(rows, 1), *row_shape), dtype=dtype)

    def give(self, array: np.ndarray) -> None:
        with self._lock:
            self._free.append(array)


class Rows:
    """An append-only array of rows with amortised O(1) appends and one copy per row."""

    def __init__(self, row_shape: tuple[int, ...], dtype, capacity: int, pool: RowPool) -> None:
        self.pool = pool
        self._data = pool.take(row_shape, np.dtype(dtype), capacity)
        self.n = 0

    def extend(self, n: int) -> np.ndarray:
        """The next n rows, uninitialised, for the caller to fill in place."""
        end = self.n + n
        if end > self._data.shape[0]:
            grown = self.pool.take(self._data.shape[1:], self._data.dtype,
                                   max(end, 2 * self._data.shape[0]))
            grown[:self.n] = self._data[:self.n]
            self.pool.give(self._data)
            self._data = grown
        self.n = end
        return self._data[end - n:end]

    def release(self) -> None:
        """Gives the storage back to the pool; the rows must no longer be used."""
        self.pool.give(self._data)
        self._data, self.n = self._data[:0], 0

    def append(self, rows: np.ndarray | torch.Tensor) -> None:
        copy_rows(self.extend(rows.shape[0]), rows)

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def view(self) -> np.ndarray:
        return self._data[:self.n]


@dataclass
class BatchResult:
    """One batch's kept images (a row each) and their stored tokens."""

    rows: list[InputRow]
    sizes: list[tuple[int, int]]  # original (width, height)
    norm: np.ndarray  # [B, T] fp32
    attn: np.ndarray  # [B, T] fp32
    nbr_cos: np.ndarray  # [B, Np] fp32
    stored: np.ndarray  # [B, T] bool: tokens with an embedding slot
    per_image: dict[str, np.ndarray]  # every image array the run declares (array_specs):
    # cls_post [B, D], patch_mean_post [B, D], registers_post [B, R, D], mlp_* (--record-mlp), ...
    block_norm: np.ndarray | None = None  # [B, L, T]
    qkv_norm: np.ndarray | None = None  # [B, L, 3, T]

    def head(self, n: int) -> BatchResult:
        """The first n images."""
        def cut(a):
            return None if a is None else a[:n]
        return BatchResult(self.rows[:n], self.sizes[:n], self.norm[:n], self.attn[:n],
                           self.nbr_cos[:n], self.stored[:n],
                           {k: v[:n] for k, v in self.per_image.items()},
                           cut(self.block_norm), cut(self.qkv_norm))


@dataclass
class ShardBuffer:
    shard: int
    shard_size: int
    layout: TokenLayout
    tokens_per_image: int = 0  # expected stored tokens per image: sizes the first allocation
    pool: RowPool = field(default_factory=RowPool)
    batches: list[BatchResult] = field(default_factory=list)
    errors: list[tuple[InputRow, str]] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)  # image ids refused by --keep-if-outlier

    def __post_init__(self) -> None:
        lay, cap = self.layout, self.shard_size * self.tokens_per_image
        self.embeddings = Rows((lay.embed_dim,), np.float16, cap, self.pool)  # [S, D]
        self.cells = Rows((lay.cell, lay.cell, 3), np.uint8, cap, self.pool)  # [S, P, P, 3]

    def release(self) -> None:
        """Once written: the big buffers go back to the pool for the next shard."""
        self.embeddings.release()
        self.cells.release()

    @property
    def n_images(self) -> int:
        return sum(len(b.rows) for b in self.batches)

    def add(self, result: BatchResult, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """Adds a batch and the embeddings [S, D] (array or tensor) of `result.stored` in (image,
        token) order;
        returns the batch's cell rows [S, P, P, 3] for the caller to fill."""
        self.batches.append(result)
        self.embeddings.append(embeddings)
        return self.cells.extend(embeddings.shape[0])

    def truncate(self, n_images: int) -> None:
        """End the shard's input stream right after its n-th kept image (keep-if-outlier's quota)."""
        kept, left = [], n_images
        for b in self.batches:
            if left <= 0:
                break
            kept.append(b if len(b.rows) <= left else b.head(left))
            left -= len(kept[-1].rows)
        self.batches = kept
        n_slots = int(sum(b.stored.sum() for b in kept))
        self.embeddings.truncate(n_slots)
        self.cells.truncate(n_slots)
        cutoff = kept[-1].rows[-1].image_id if kept else -1
        self.errors = [(r, why) for r, why in self.errors if r.image_id <= cutoff]
        self.rejected = [i for i in self.rejected if i <= cutoff]

    def _cat(self, name: str, width: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        parts = [getattr(b, name) for b in self.batches]
        return np.concatenate(parts) if parts else np.zeros((0, *width), dtype)

    def _kinds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lay = self.layout
        kind = np.array(["cls"] * lay.n_cls + ["reg"] * lay.n_reg + ["ttreg"] * lay.n_ttreg
                        + ["patch"] * lay.n_patches)
        rows = np.arange(lay.n_patches) // lay.grid[1]
        cols = np.arange(lay.n_patches) % lay.grid[1]
        return kind, rows, cols

    def tables(self) -> dict:
        lay = self.layout
        t = lay.n_tokens
        kind, rows, cols = self._kinds()
        prefix_null = np.zeros(t, dtype=bool)
        prefix_null[: lay.n_prefix] = True
        rows_in = [r for b in self.batches for r in b.rows]
        n = len(rows_in)
        stored = self._cat("stored", (t,), bool)  # [N, T]
        slot = np.where(stored, np.cumsum(stored.reshape(-1)).reshape(stored.shape) - 1, -1)
        norm = self._cat("norm", (t,))
        attn = self._cat("attn", (t,))
        nbr = np.full((n, t), np.nan, dtype=np.float32)
        nbr[:, lay.n_prefix:] = self._cat("nbr_cos", (lay.n_patches,))
        ids = np.array([r.image_id for r in rows_in], dtype=np.int64)
        rc_mask = np.tile(prefix_null, n)
        row_col = np.concatenate([np.full(lay.n_prefix, -1), rows]), np.concatenate(
            [np.full(lay.n_prefix, -1), cols])
        tokens = pa.table({
            "image_id": np.repeat(ids, t),
            "token": np.tile(np.arange(t, dtype=np.int32), n),
            "kind": pa.array(kind).take(np.tile(np.arange(t), n)),
            "row": pa.array(np.tile(row_col[0], n).astype(np.int16), mask=rc_mask),
            "col": pa.array(np.tile(row_col[1], n).astype(np.int16), mask=rc_mask),
            "norm": norm.reshape(-1).astype(np.float32),
            "attn": attn.reshape(-1).astype(np.float32),
            "nbr_cos": pa.array(nbr.reshape(-1), mask=rc_mask),
            "slot": pa.array(slot.reshape(-1), mask=slot.reshape(-1) < 0),
        })
        patch_norm = norm[:, lay.n_prefix:]
        sizes = [s for b in self.batches for s in b.sizes]
        images = pa.table({
            "image_id": ids,
            "source_index": np.array([r.source_index for r in rows_in], dtype=np.int64),
            "source_id": pa.array([r.source_id for r in rows_in], pa.string()),
            "label": pa.array([r.label for r in rows_in], pa.int64()),
            "width": np.array([w for w, _ in sizes], dtype=np.int32),
            "height": np.array([h for _, h in sizes], dtype=np.int32),
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
        if not self.batches or self.batches[0].block_norm is None:
            return None
        lay = self.layout
        t, depth, n = lay.n_tokens, lay.depth, ids.size
        block_norm = self._cat("block_norm", (depth, t))  # [N, L, T]
        qkv = self._cat("qkv_norm", (depth, 3, t)).transpose(2, 0, 1, 3)  # [3, N, L, T]
        return pa.table({
            "image_id": np.repeat(ids, depth * t),
            "token": np.tile(np.arange(t, dtype=np.int32), n * depth),
            "block": np.tile(np.repeat(np.arange(depth, dtype=np.int16), t), n),
            "norm": block_norm.reshape(-1).astype(np.float32),
            "q_norm": qkv[0].reshape(-1).astype(np.float32),
            "k_norm": qkv[1].reshape(-1).astype(np.float32),
            "v_norm": qkv[2].reshape(-1).astype(np.float32),
        })

    def arrays(self, image_arrays: dict[str, ArraySpec]) -> dict[str, np.ndarray]:
        """Token arrays by local slot; every declared image array by row of ``images``, in its
        declared dtype."""
        out: dict[str, np.ndarray] = {"tokens": self.embeddings.view(), "pixels": self.cells.view()}
        for name, spec in image_arrays.items():  # aligned with the rows of `images`
            dtype = np.dtype(spec.dtype)
            missing = [b.rows[0].image_id for b in self.batches if name not in b.per_image]
            if missing:
                raise RuntimeError(f"the run declares image array {name!r} but the adapter did "
                                   f"not return it (batch of image {missing[0]})")
            parts = [b.per_image[name] for b in self.batches]
            out[name] = (np.concatenate(parts).astype(dtype, copy=False) if parts
                         else np.zeros((0, *spec.shape), dtype))
        return out
