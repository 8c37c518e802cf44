"""Register-neuron rankings in the lake: LAKE/neurons/<run>.parquet, one file per run.

A ranking is derived from a run extracted with ``--record-mlp`` (its ``mlp_acts`` image array) and
the run's outlier tokens; ``tokenlake neurons`` computes it (tokenlake.analyze._neurons, where the
score is defined). The file is written to ``<name>.tmp-<pid>-<uuid>``, fsynced and renamed into
place, so a reader sees the old ranking or the new one, never a partial file. The `neurons` SQL view
reads ``neurons/*.parquet`` (temporary files do not match the glob).
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

__all__ = ["NEURONS_SCHEMA", "neurons_view", "read_neurons", "write_neurons"]

NEURONS_SCHEMA = pa.schema([
    ("run", pa.string()),  # the --record-mlp run the ranking comes from
    ("rank", pa.int32()),  # 1 = the neuron whose activation concentrates most on outliers
    ("block", pa.int16()),
    ("neuron", pa.int32()),  # channel of the block's MLP hidden activation (fc2 input)
    ("score", pa.float64()),
    ("mean_outlier", pa.float64()),  # mean activation at outlier patch tokens
    ("mean_normal", pa.float64()),  # mean activation at the other patch tokens
    ("outlier_share", pa.float64()),  # share of the neuron's positive activation on outliers
    ("n_outlier", pa.int64()),
    ("n_normal", pa.int64()),
])
_DUCK = {"run": "VARCHAR", "rank": "INTEGER", "block": "SMALLINT", "neuron": "INTEGER",
         "score": "DOUBLE", "mean_outlier": "DOUBLE", "mean_normal": "DOUBLE",
         "outlier_share": "DOUBLE", "n_outlier": "BIGINT", "n_normal": "BIGINT"}


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
    """(ranking sorted by rank, its metadata), or None when the run has no ranking."""
    p = neurons_path(lake, run)
    if not p.exists():
        return None
    t = pq.read_table(p)
    meta = json.loads((t.schema.metadata or {}).get(b"tokenlake", b"{}"))
    return t.replace_schema_metadata(None).sort_by("rank"), meta


def neurons_view(lake: str | Path) -> str:
    """CREATE VIEW neurons over every ranking in LAKE/neurons/ (empty, typed, when none exists)."""
    lake = Path(lake)
    cols = ", ".join(f'"{n}"' for n in NEURONS_SCHEMA.names)
    if any((lake / "neurons").glob("*.parquet")):
        pattern = str(lake / "neurons" / "*.parquet").replace("'", "''")
        body = f"SELECT {cols} FROM read_parquet('{pattern}')"
    else:
        body = "SELECT " + ", ".join(f'NULL::{t} AS "{n}"' for n, t in _DUCK.items()) + " WHERE false"
    return f"CREATE VIEW neurons AS {body}"
