"""Register-neuron rankings in the lake: LAKE/neurons/<run>.parquet, one file per run.

A ranking is derived from a run extracted with ``--record-mlp`` (its register-neuron statistics,
extract/_neuronstats.py) and its per-block norms; ``tokenlake neurons`` computes it
(tokenlake.analyze._neurons, where the scores are defined). Each ranking's choices are columns
(method, detect_block, highest_block, sparsity_filter) and, with the rest, JSON metadata under the
Parquet key ``tokenlake``. The file is written to ``<name>.tmp-<pid>-<uuid>``, fsynced and renamed into
place, so a reader sees the old ranking or the new one, never a partial file. The `neurons` SQL view
reads every ``neurons/*.parquet`` (temporary files do not end in .parquet).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tokenlake.store._errors import ContractError, LakeError

__all__ = ["NEURONS_SCHEMA", "neurons_sources", "neurons_view", "read_neurons", "write_neurons"]

NEURONS_SCHEMA = pa.schema([
    ("run", pa.string()),  # the --record-mlp run the ranking comes from
    ("method", pa.string()),  # 'jiang' | 'contrast'
    ("detect_block", pa.int16()),  # the block whose output norms define the outlier positions
    ("highest_block", pa.int16()),  # candidates: blocks <= this one
    ("sparsity_filter", pa.bool_()),
    ("rank", pa.int32()),  # 1 = best candidate; NULL for blocks > highest_block
    ("block", pa.int16()),
    ("neuron", pa.int32()),  # channel of the block's MLP hidden activation (fc2 input)
    ("score", pa.float64()),
    ("mean_abs_outlier", pa.float64()),  # pooled mean |activation| at outlier patch tokens
    ("mean_abs_normal", pa.float64()),  # pooled mean |activation| at the other patch tokens
    ("outlier_share", pa.float64()),  # share of the neuron's |activation| on outliers
    ("sparse_share", pa.float64()),  # share of images where it passes the sparsity test
    ("n_images", pa.int64()),  # images with >= 1 outlier patch token at detect_block
    ("n_outlier", pa.int64()),
    ("n_normal", pa.int64()),
])
_DUCK = {"run": "VARCHAR", "method": "VARCHAR", "detect_block": "SMALLINT",
         "highest_block": "SMALLINT", "sparsity_filter": "BOOLEAN", "rank": "INTEGER",
         "block": "SMALLINT", "neuron": "INTEGER", "score": "DOUBLE", "mean_abs_outlier": "DOUBLE",
         "mean_abs_normal": "DOUBLE", "outlier_share": "DOUBLE", "sparse_share": "DOUBLE",
         "n_images": "BIGINT", "n_outlier": "BIGINT", "n_normal": "BIGINT"}


def neurons_path(lake: str | Path, run: str) -> Path:
    return Path(lake) / "neurons" / f"{run}.parquet"


def write_neurons(lake: str | Path, run: str, table: pa.Table, *,
                  meta: dict[str, Any] | None = None) -> Path:
    """Replace the run's ranking atomically. ``table`` has NEURONS_SCHEMA's columns (any order)."""
    lake = Path(lake)
    if not (lake / "runs" / run / "manifest.json").exists():
        raise LakeError(f"no complete run {run!r} in {lake}")
    if set(table.column_names) != set(NEURONS_SCHEMA.names):
        raise ContractError(f"neurons: columns {table.column_names}, expected {NEURONS_SCHEMA.names}")
    table = table.select(NEURONS_SCHEMA.names).cast(NEURONS_SCHEMA)
    if set(table.column("run").to_pylist()) - {run}:
        raise ContractError(f"neurons: every row's run must be {run!r}")
    meta_bytes = {b"tokenlake": json.dumps(meta or {}, default=str).encode()}
    table = table.replace_schema_metadata(meta_bytes)
    final = neurons_path(lake, run)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def read_neurons(lake: str | Path, run: str) -> tuple[pa.Table, dict[str, Any]] | None:
    """(ranking: candidates by rank, then the unranked rows by score; its metadata), or None
    when the run has no ranking."""
    p = neurons_path(lake, run)
    if not p.exists():
        return None
    t = pq.read_table(p)
    meta = json.loads((t.schema.metadata or {}).get(b"tokenlake", b"{}"))
    order = [("rank", "ascending"), ("score", "descending")]  # NULL ranks sort last
    return t.replace_schema_metadata(None).sort_by(order), meta


def neurons_sources(lake: str | Path) -> list[Path]:
    """Every ranking file in LAKE/neurons/, listed here rather than globbed by DuckDB (the lake's
    path may hold glob characters); temporary files do not end in .parquet."""
    folder = Path(lake) / "neurons"
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".parquet"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [folder / n for n in names]


def neurons_select(lake: str | Path, sources: list[Path] | None = None,
                   broken: dict[str, str] | None = None) -> str:
    """The SELECT of the neurons view: one branch per ranking file of `sources` (default:
    neurons_sources). A file that cannot be read (pyarrow cannot read its schema, or it is in
    `broken`: str(path) -> why) answers with that error when a query reaches it; its `run` is the
    file's name, so `WHERE run = ...` on another run skips it.

    A ranking written before schema version 3 lacks the v3 columns: they read as NULL there (its
    ``score`` is the ``contrast`` score; its v2-only columns are not in the view)."""
    from tokenlake.store._sqlviews import empty_select, error_branch, paths_list_sql

    lake = Path(lake)
    columns = list(_DUCK.items())
    parts = []
    for f in neurons_sources(lake) if sources is None else sources:
        why = (broken or {}).get(str(f))
        if why is None:
            try:
                have = set(pq.read_schema(f).names)
            except (OSError, pa.ArrowException) as err:
                why = str(err)
        if why is not None:
            parts.append(error_branch(columns, f"tokenlake: the register-neuron ranking "
                                      f"neurons/{f.name} cannot be read: {why}",
                                      run=f.name.removesuffix(".parquet")))
            continue
        cols = ", ".join(f'"{n}"' if n in have else f'NULL::{t} AS "{n}"' for n, t in _DUCK.items())
        parts.append(f"SELECT {cols} FROM read_parquet({paths_list_sql([f])})")
    return "\nUNION ALL\n".join(parts or [empty_select(columns)])


def neurons_view(lake: str | Path, sources: list[Path] | None = None,
                 broken: dict[str, str] | None = None) -> str:
    """CREATE VIEW neurons over every ranking in LAKE/neurons/ (empty, typed, when none exists),
    as listed when the connection is made (Lake.sql makes a new one when neurons/ changes)."""
    return "CREATE OR REPLACE VIEW neurons AS " + neurons_select(lake, sources, broken)
