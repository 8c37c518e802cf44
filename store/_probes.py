"""Probe results in the lake: LAKE/probes/<run>/<probe>-<config_hash>/, committed atomically.

Layout of one result directory (the directory's presence == the result is complete):

    result.json      the probe's full result (metrics, every choice made, epochs run, chosen lr)
    config.json      the configuration that `config_hash` hashes
    result.parquet   the long-format rows of the `probe_results` view
    weights.pt ...   any further files the probe hands over (trained weights)

A result is written into `probes/.staging/<pid>-<uuid>/<probe>-<hash>/` and renamed into place, so a
killed probe leaves at most a staging folder that no reader looks at. The SQL view reads every
`probes/<run>/<result>/result.parquet` (the staging folder's are one level deeper: never read).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tokenlake.store._errors import LakeError
from tokenlake.store._io import parquet_bytes

__all__ = [
    "PROBE_RESULTS_SCHEMA",
    "probe_config_hash",
    "probe_result_dir",
    "probe_results_sources",
    "probe_results_view",
    "read_probe_result",
    "write_probe_result",
]

PROBE_RESULTS_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("probe", pa.string()),
        ("token_group", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("config_hash", pa.string()),
        ("created", pa.timestamp("us", tz="UTC")),
    ]
)
_DUCK = {
    "run": "VARCHAR", "probe": "VARCHAR", "token_group": "VARCHAR", "metric": "VARCHAR",
    "value": "DOUBLE", "config_hash": "VARCHAR", "created": "TIMESTAMPTZ",
}
_STAGING = ".staging"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def probe_config_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits of sha256 over the canonical JSON of a probe configuration."""
    return hashlib.sha256(b"tokenlake-probe-v1\0" + _canonical(dict(config))).hexdigest()[:12]


def probe_result_dir(lake: str | Path, run: str, probe: str, config_hash: str) -> Path:
    return Path(lake) / "probes" / run / f"{probe}-{config_hash}"


def read_probe_result(
    lake: str | Path, run: str, probe: str, config_hash: str
) -> dict[str, Any] | None:
    """The committed result.json of (run, probe, config_hash), or None when there is none."""
    p = probe_result_dir(lake, run, probe, config_hash) / "result.json"
    if not p.exists():
        return None
    return json.loads(p.read_text())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_probe_result(
    lake: str | Path,
    run: str,
    probe: str,
    config_hash: str,
    *,
    config: Mapping[str, Any],
    result: Mapping[str, Any],
    rows: Iterable[tuple[str, str, float]],
    files: Mapping[str, bytes | pa.Table] | None = None,
    force: bool = False,
) -> Path:
    """Commit one probe result atomically; returns its directory.

    rows: (token_group, metric, value) triples for the `probe_results` view. files: extra files
    of the result, raw bytes or an Arrow table (written as `<name>`, which must end in .parquet).
    Without `force`, an existing result of the same (run, probe, config_hash) is kept and the new
    one discarded.
    """
    lake = Path(lake)
    if not (lake / "runs" / run / "manifest.json").exists():
        raise LakeError(f"no complete run {run!r} in {lake}")
    final = probe_result_dir(lake, run, probe, config_hash)
    if final.exists() and not force:
        return final
    stage_root = lake / "probes" / _STAGING / f"{os.getpid()}-{uuid.uuid4().hex}"
    stage = stage_root / final.name
    stage.mkdir(parents=True)
    try:
        created = datetime.now(UTC)
        rows = list(rows)
        table = pa.table(
            {
                "run": [run] * len(rows),
                "probe": [probe] * len(rows),
                "token_group": [r[0] for r in rows],
                "metric": [r[1] for r in rows],
                "value": [float(r[2]) for r in rows],
                "config_hash": [config_hash] * len(rows),
                "created": [created] * len(rows),
            },
            schema=PROBE_RESULTS_SCHEMA,
        )
        pq.write_table(table, stage / "result.parquet")
        full = {"run": run, "probe": probe, "config_hash": config_hash,
                "created": created.isoformat(), **dict(result)}
        _write_bytes(stage / "result.json", json.dumps(full, indent=1, default=str).encode())
        _write_bytes(stage / "config.json", json.dumps(dict(config), indent=1, default=str).encode())
        for name, data in (files or {}).items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"bad result file name {name!r}")
            if isinstance(data, pa.Table):
                if not name.endswith(".parquet"):
                    raise ValueError(f"table {name!r}: a table result file is .parquet")
                data = parquet_bytes(data)
            _write_bytes(stage / name, data)
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            if not force:
                return final
            old = stage_root / "replaced"
            os.rename(final, old)
        os.rename(stage, final)
        return final
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)


def probe_results_sources(lake: str | Path) -> dict[str, list[Path]]:
    """Every committed result.parquet, by the run folder it sits in (`probes/<run>/*/`), listed
    here rather than globbed by DuckDB: the lake's path may hold glob characters."""
    root = Path(lake) / "probes"
    out: dict[str, list[Path]] = {}
    try:
        runs = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
    except (FileNotFoundError, NotADirectoryError):
        return out
    for run in runs:  # the staging folder's results are one level deeper: never listed
        found = sorted(e.name for e in os.scandir(root / run) if e.is_dir())
        files = [root / run / d / "result.parquet" for d in found]
        files = [f for f in files if f.is_file()]
        if files:
            out[run] = files
    return out


def probe_results_select(lake: str | Path, sources: dict[str, list[Path]] | None = None,
                         broken: dict[str, str] | None = None) -> str:
    """The SELECT of the probe_results view: one branch per run folder of `sources` (default:
    probe_results_sources); a folder in `broken` (folder -> why) answers with that error when a
    query reaches it (its `run` is a constant, so `WHERE run = ...` on another run skips it)."""
    from tokenlake.store._sqlviews import empty_select, error_branch, paths_list_sql

    lake = Path(lake)
    sources = probe_results_sources(lake) if sources is None else sources
    columns = list(_DUCK.items())
    cols = ", ".join(f'"{n}"' for n in PROBE_RESULTS_SCHEMA.names)
    parts = []
    for run, files in sources.items():
        if run in (broken or {}):
            parts.append(error_branch(columns, f"tokenlake: the probe results of run {run!r} "
                                      f"(probes/{run}/) cannot be read: {broken[run]}", run=run))
            continue
        parts.append(f"SELECT {cols} FROM read_parquet({paths_list_sql(files)})")
    return "\nUNION ALL\n".join(parts or [empty_select(columns)])


def probe_results_view(lake: str | Path, sources: dict[str, list[Path]] | None = None,
                       broken: dict[str, str] | None = None) -> str:
    """CREATE VIEW probe_results over every committed result.parquet of the lake, as listed when
    the connection is made (Lake.sql makes a new one when probes/ changes)."""
    return "CREATE OR REPLACE VIEW probe_results AS " + probe_results_select(lake, sources, broken)
