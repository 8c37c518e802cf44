"""Atomic, deterministic file writes. Every file of the lake goes through here."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tokenlake.store._schema import DICTIONARY_COLUMNS

# ~128k rows keeps row-group statistics useful for pushdown without tiny pages.
ROW_GROUP_SIZE = 131_072


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, *, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes | memoryview | list[bytes | memoryview], *,
                 fsync: bool = True) -> None:
    """Write to `<name>.tmp-<pid>-<uuid>` then rename: readers see the old file or the whole new one.
    `data` may be a list of buffers, written in order (no concatenated copy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.writelines(data if isinstance(data, list) else [data])
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise deterministically: identical tables give identical bytes (no timestamps in parquet)."""
    table = table.replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    dict_cols = [c for c in table.column_names if c in DICTIONARY_COLUMNS]
    pq.write_table(
        table,
        sink,
        row_group_size=ROW_GROUP_SIZE,
        compression="zstd",
        use_dictionary=dict_cols,
        write_statistics=True,
        store_schema=True,
    )
    return sink.getvalue().to_pybytes()


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, canonical_json(obj).encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
