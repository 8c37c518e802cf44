"""Which images a subset holds, and in which order.

A subset is a seeded draw without replacement: the first ``n`` entries of
``numpy.random.default_rng(seed).permutation(num_rows)`` ("5,000 images drawn with seed 42" is
``draw_subset(source, n=5000, seed=42)``). The drawn order is kept, not sorted: for subsets
filled during extraction (keep-if-outlier, ``train200k``) extraction walks the rows in this order
until it has kept enough, so the order is part of the subset. ``n=None`` takes every row in
source order. The result depends only on (num_rows, n, seed) and numpy's PCG64 stream, which
numpy keeps stable across versions for ``default_rng``.

Storage is the store module's business (``tokenlake.store.write_subset``); this returns a table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tokenlake.extract._sources import Source

__all__ = ["SUBSET_SCHEMA", "draw_subset"]

SUBSET_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("label", pa.int64()),
    ]
)


def draw_subset(
    source: Source, *, n: int | None, seed: int = 42, limit: int | None = None
) -> pa.Table:
    """Draw ``n`` rows of ``source`` (all if None) with ``seed``; keep the first ``limit`` of them."""
    total = source.num_rows
    if n is None:
        indices = np.arange(total, dtype=np.int64)
    else:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > total:
            raise ValueError(
                f"cannot draw n={n} images without replacement: {source.spec!r} "
                f"(split {source.split!r}) has only {total} rows; lower n or pass n=None for all"
            )
        indices = np.random.default_rng(seed).permutation(total)[:n].astype(np.int64)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        indices = indices[:limit]

    ids, labels = source.ids_and_labels(indices.tolist())
    k = len(indices)
    return pa.table(
        {
            "source": pa.array([source.spec] * k, pa.string()),
            "split": pa.array([source.split] * k, pa.string()),
            "source_index": pa.array(indices, pa.int64()),
            "source_id": pa.array(ids, pa.string()),
            "label": pa.array(labels, pa.int64()),
        },
        schema=SUBSET_SCHEMA,
    )
