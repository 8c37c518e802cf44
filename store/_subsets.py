"""Image subsets: which inputs a run reads, stored once per lake and never rewritten (runs record
their checksum: a subset rewritten under them would rename their image_ids silently)."""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock

from tokenlake.store._errors import LakeError
from tokenlake.store._io import atomic_write, parquet_bytes, read_parquet
from tokenlake.store._layout import check_name
from tokenlake.store._schema import TABLE_SCHEMAS, conform


def subset_path(lake: str | Path, name: str) -> Path:
    return Path(lake) / "subsets" / f"{check_name(name, 'subset')}.parquet"


def write_subset(lake: str | Path, name: str, table: Any) -> Path:
    """Write subsets/<name>.parquet (atomically) and return its path. Subsets are write-once:
    writing the same rows again is a no-op (the file is left as it is), other rows are refused
    (LakeError) since runs made from the subset record its checksum."""
    t = conform(table, "subset")
    p = subset_path(lake, name)
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p.with_suffix(".lock"))):  # two writers of one name: one writes, one compares
        if p.exists():
            old, new = table_checksum(read_subset(lake, name)), table_checksum(t)
            if old != new:
                raise LakeError(
                    f"subset {name!r} already exists with other rows ({p}: checksum "
                    f"{old[:12]}…, these rows {new[:12]}…). Subsets are write-once: runs made "
                    "from it record its checksum. Choose another --name, or, if no run uses it, "
                    f"delete {p} first")
            return p
        atomic_write(p, parquet_bytes(t))
    return p


def read_subset(lake: str | Path, name: str) -> pa.Table:
    p = subset_path(lake, name)
    if not p.exists():
        known = sorted(q.stem for q in (Path(lake) / "subsets").glob("*.parquet"))
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; subsets: {known}"
        raise LakeError(f"unknown subset {name!r}{hint}")
    return read_parquet(p, schema=TABLE_SCHEMAS["subset"])


def table_checksum(t: pa.Table) -> str:
    """sha256 of a subset's content (names, order and values), independent of Parquet encoding."""
    t = conform(t, "subset")
    h = hashlib.sha256(b"tokenlake-subset-v1\0")
    for name in t.column_names:
        col = t.column(name).combine_chunks()
        h.update(name.encode() + b"\0")
        h.update(np.asarray(pc.is_valid(col)).tobytes())
        if pa.types.is_integer(col.type):
            h.update(np.asarray(col.fill_null(0), dtype="<i8").tobytes())
        else:
            vals = col.fill_null("")
            h.update(np.asarray(pc.binary_length(vals), dtype="<i8").tobytes())
            h.update("".join(vals.to_pylist()).encode())
    return h.hexdigest()


def subset_checksum(lake: str | Path, name: str) -> str:
    """Content checksum of subsets/<name>.parquet, as recorded in run manifests."""
    return table_checksum(read_subset(lake, name))
