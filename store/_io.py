"""Atomic, deterministic file writes. Every file of the lake goes through here."""

from __future__ import annotations

import hashlib
import json
import os
import re
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


# `<name>.tmp-<pid>-<uuid hex>`: what atomic_write writes before its rename
TEMP_NAME = re.compile(r"(?P<target>.+)\.tmp-(?P<pid>\d+)-[0-9a-z]+")


def temp_target(name: str) -> str | None:
    """The file a temporary file of atomic_write was going to become, or None for other names."""
    m = TEMP_NAME.fullmatch(name)
    return m.group("target") if m else None


def atomic_write(path: Path, data: bytes | memoryview | list[bytes | memoryview], *,
                 fsync: bool = True, dirs: set[Path] | None = None) -> None:
    """Write to `<name>.tmp-<pid>-<uuid>` then rename: readers see the old file or the whole new one.
    `data` may be a list of buffers, written in order (no concatenated copy).

    With `fsync` the file's data is flushed before the rename, and so are the directory entries
    that make it reachable after a power loss: the parent of every folder created on the way and,
    after the rename, the file's own folder. Those directories are fsynced here, or, when `dirs`
    is given, added to it for the caller to fsync once (`fsync_dirs`) before it commits (a shard's
    files before its marker)."""
    made = make_dirs(path.parent)
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
    if fsync:
        todo = {d.parent for d in made} | {path.parent}
        if dirs is None:
            fsync_dirs(todo)
        else:
            dirs |= todo


def make_dirs(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders missing when it looked, outermost first (created here or by
    a concurrent writer: either way their entries may not be durable yet)."""
    missing = []
    p = folder
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    missing.reverse()
    for d in missing:
        d.mkdir(exist_ok=True)
    return missing


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(paths: set[Path]) -> None:
    """fsync each directory once, deepest first."""
    for d in sorted(paths, key=lambda q: (-len(q.parts), str(q))):
        fsync_dir(d)


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
        write_page_checksum=True,  # CRC32 of every page: readers that verify them (pyarrow's
        # page_checksum_verification) refuse a damaged page instead of decoding it
    )
    return sink.getvalue().to_pybytes()


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, canonical_json(obj).encode())


def read_parquet(path: Path, **kw: Any) -> pa.Table:
    """pq.read_table, verifying the page checksums of files that have them."""
    return pq.read_table(path, page_checksum_verification=True, **kw)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
