"""Lake: the read side — run summaries, SQL, and fast array gathers."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from tokenlake.store import _sqlviews
from tokenlake.store._errors import LakeError, UnknownRun
from tokenlake.store._finalnorm import TOKENS, apply_final_norm, read_final_norm
from tokenlake.store._io import read_json
from tokenlake.store._layout import ChunkFiles, RunLayout
from tokenlake.store._schema import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION
from tokenlake.store._validate import validate_run

if TYPE_CHECKING:  # duckdb loads with the first query (0.2 s an extraction need not pay)
    import duckdb

_MAX_MAPS = 512  # each np.memmap holds a file descriptor; bound them
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_version(meta: dict[str, Any], where: Path) -> dict[str, Any]:
    v = meta.get("schema_version")
    if v not in READABLE_SCHEMA_VERSIONS:
        raise LakeError(
            f"{where}: schema_version {v!r}, this tokenlake reads versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))} (writes {SCHEMA_VERSION})"
        )
    return meta


def open_lake(path: str | Path) -> Lake:
    """Open an existing lake directory for reading."""
    p = Path(path)
    if not p.is_dir():
        raise LakeError(f"no lake at {str(p)!r}: not a directory")
    return Lake(p)


class Lake:
    """Read access to a lake. Only files listed by committed shard markers are ever read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self._maps: OrderedDict[Path, np.memmap] = OrderedDict()
        self._chunk_files: dict[tuple[str, str], ChunkFiles] = {}
        self._layouts: dict[str, RunLayout] = {}
        self._con: duckdb.DuckDBPyConnection | None = None
        self._con_key: tuple[Any, ...] | None = None

    def __repr__(self) -> str:
        return f"Lake({str(self.path)!r})"

    # -- runs ----------------------------------------------------------------------------------

    def _run_names(self) -> list[str]:
        d = self.path / "runs"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def _manifests(self) -> dict[str, dict[str, Any]]:
        out = {}
        for r in self._run_names():
            p = self.path / "runs" / r / "manifest.json"
            if p.exists():
                out[r] = _check_version(read_json(p), p)
        return out

    def manifest(self, run: str) -> dict[str, Any]:
        p = self.path / "runs" / run / "manifest.json"
        if not _RUN_NAME.match(run) or not p.exists():
            complete = [
                r for r in self._run_names() if (self.path / "runs" / r / "manifest.json").exists()
            ]
            detail = (
                "it exists but is incomplete: no manifest.json"
                if (self.path / "runs" / run).is_dir()
                else ""
            )
            raise UnknownRun(run, complete, detail=detail)
        return _check_version(read_json(p), p)

    def run_config(self, run: str) -> dict[str, Any] | None:
        """The config a run was begun with (runs/RUN/config.json), complete or partial; None when
        no run of that name has one yet."""
        p = self.path / "runs" / run / "config.json"
        return read_json(p) if _RUN_NAME.match(run) and p.exists() else None

    def markers(self, run: str) -> dict[int, dict[str, Any]]:
        """Commit markers of a run's committed shards, by shard index."""
        d = self._run_dir(run) / "shards"
        out = {}
        for p in sorted(d.glob("s*.json")):
            if re.fullmatch(r"s\d{5,}", p.stem):
                out[int(p.stem[1:])] = read_json(p)
        return out

    def _run_dir(self, run: str) -> Path:
        d = self.path / "runs" / run
        if not _RUN_NAME.match(run) or not d.is_dir():
            raise UnknownRun(run, self._run_names())
        return d

    def layout(self, run: str) -> RunLayout:
        if run not in self._layouts:
            attrs = read_json(self._run_dir(run) / "arrays.zarr" / "zarr.json").get(
                "attributes", {}
            )
            if "tokenlake" not in attrs:
                raise LakeError(f"run {run!r}: arrays.zarr has no tokenlake layout attributes")
            _check_version(attrs["tokenlake"], self._run_dir(run) / "arrays.zarr")
            self._layouts[run] = RunLayout.from_json(attrs["tokenlake"]["layout"])
        return self._layouts[run]

    def runs(self, *, include_incomplete: bool = False) -> list[dict[str, Any]]:
        """One summary dict per run (complete runs only unless include_incomplete)."""
        out = []
        for r in self._run_names():
            d = self.path / "runs" / r
            complete = (d / "manifest.json").exists()
            if not complete and not include_incomplete:
                continue
            if complete:
                m = read_json(d / "manifest.json")
                n = {k: m[k] for k in ("n_images", "n_errors", "n_tokens")}
                done = total = m["n_shards"]
            else:
                m = read_json(d / "config.json") if (d / "config.json").exists() else {}
                mk = self.markers(r).values()
                n = {k: sum(x[k] for x in mk) for k in ("n_images", "n_errors", "n_tokens")}
                done = len(mk)
                try:
                    total = self.layout(r).n_shards
                except (LakeError, FileNotFoundError):
                    total = None
            out.append(
                {
                    "run": r,
                    "status": "complete" if complete else "partial",
                    "shards_committed": done,
                    "shards_total": total,
                    **n,
                    "bytes": sum(f.stat().st_size for f in d.rglob("*") if f.is_file()),
                    "model": _sqlviews.manifest_field(m, "model"),
                    "weights": _sqlviews.manifest_field(m, "weights"),
                    "random_weights": _sqlviews.manifest_field(m, "random_weights"),
                }
            )
        return out

    # -- SQL -----------------------------------------------------------------------------------

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A new confined DuckDB connection with the views over complete runs.

        External access is limited to the lake directory. Unlike `sql`, it does not check
        statement types, so in-memory CREATE or COPY into the lake directory remain possible.
        """
        return _sqlviews.connect(self.path, self._manifests())

    def sql(self, query: str, *, params: Any = None) -> pa.Table:
        """Run one read-only statement (SELECT / EXPLAIN SELECT) and return an Arrow table."""
        key = tuple(
            (r, (self.path / "runs" / r / "manifest.json").stat().st_mtime_ns)
            for r in self._run_names()
            if (self.path / "runs" / r / "manifest.json").exists()
        )
        if self._con is None or key != self._con_key:
            self._con, self._con_key = self.connect(), key
        _sqlviews.check_read_only(self._con, query)
        cur = self._con.cursor()
        try:
            return cur.sql(query, params=params).to_arrow_table()
        finally:
            cur.close()

    # -- arrays --------------------------------------------------------------------------------

    def gather(
        self, run: str, slots: Any, *, tokens: str = "pre", pixels: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Token embeddings at global `slots` (and pixels [n, P, P, 3] uint8).

        tokens="pre": [n, D] float16 as stored, the last block's output before the final norm.
        tokens="post": [n, D] float32, the model's output tokens: the run's saved final norm
        applied to the stored tokens (store/_finalnorm.py; what timm's forward_features returns,
        up to the fp16 rounding of the stored token)."""
        if tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")
        norm = self.final_norm(run) if tokens == "post" else None
        emb = self._read_rows(run, "tokens", slots)
        if norm is not None:
            emb = apply_final_norm(emb, norm)
        return (emb, self._read_rows(run, "pixels", slots)) if pixels else emb

    def final_norm(self, run: str) -> dict[str, Any]:
        """The run's final norm (type, dim, eps, weight, bias as float32 arrays).

        LakeError, naming what to re-extract, for runs written before tokenlake saved it."""
        norm = read_final_norm(self._run_dir(run))
        if norm is None:
            m = self.manifest(run)
            raise LakeError(
                f"run {run!r} has no saved final-norm parameters (final_norm.json): it was "
                f"written before tokenlake saved them (schema version {m.get('schema_version')}), "
                "so its output (post-norm) tokens cannot be computed. Re-extract it into a new "
                f"run, e.g. `{self.reextract_command(run)}`, or read its pre-norm tokens "
                "(tokens='pre', --tokens pre).")
        return norm

    def reextract_command(self, run: str) -> str:
        """The `tokenlake extract` line that redoes `run` with this tokenlake, into `RUN-v3`
        (for errors about what a run written by an older tokenlake lacks)."""
        m = self.manifest(run)
        cfg = m.get("config") or {}
        line = (f"tokenlake extract --lake {self.path} --model {m.get('model', '?')} --subset "
                f"{m.get('subset', '?')} --img-size {m.get('img_size', '?')} --policy "
                f"{m.get('policy', '?')}" + (" --weights random" if m.get("random_weights") else "")
                + f" --run {run}-v3")
        if cfg.get("outlier_ref"):
            line += f" --outlier-ref {cfg['outlier_ref']}"
        if cfg.get("keep_if_outlier"):
            line += f" --keep-if-outlier --n {cfg.get('n')}"
        return line

    def image_array(self, run: str, name: str, image_ids: Any) -> np.ndarray:
        """Rows of a per-image array (cls_post, patch_mean_post, ...) at `image_ids`; errors read as 0."""
        return self._read_rows(run, name, image_ids, kind="image")

    def _files(self, run: str, name: str, kind: str) -> ChunkFiles:
        lay = self.layout(run)
        if name not in lay.arrays:
            raise LakeError(f"run {run!r} has no array {name!r}; it has {sorted(lay.arrays)}")
        if lay.arrays[name].kind != kind:
            raise LakeError(
                f"array {name!r} of run {run!r} is a {lay.arrays[name].kind} array, not {kind}"
            )
        if (run, name) not in self._chunk_files:
            self._chunk_files[run, name] = ChunkFiles(self._run_dir(run) / "arrays.zarr" / name)
        return self._chunk_files[run, name]

    def _committed(self, run: str) -> set[int]:
        if (self._run_dir(run) / "manifest.json").exists():
            return set(range(self.manifest(run)["n_shards"]))
        return set(self.markers(run))

    def _memmap(self, path: Path, cf: ChunkFiles) -> np.memmap | None:
        mm = self._maps.get(path)
        if mm is not None:
            self._maps.move_to_end(path)
            return mm
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None  # never written: reads as the fill value 0
        shape = cf.chunk_shape
        if size != int(np.prod(shape)) * cf.dtype.itemsize:
            raise LakeError(
                f"{path}: chunk file has {size} bytes, expected a full uncompressed chunk"
            )
        mm = np.memmap(path, dtype=cf.dtype, mode="r", shape=shape)
        self._maps[path] = mm
        if len(self._maps) > _MAX_MAPS:
            self._maps.popitem(last=False)
        return mm

    def _read_rows(self, run: str, name: str, rows: Any, *, kind: str = "token") -> np.ndarray:
        cf = self._files(run, name, kind)
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu":
            raise LakeError(
                f"{'slots' if kind == 'token' else 'image_ids'} must be integers, got dtype {rows.dtype}"
            )
        flat = rows.reshape(-1).astype(np.int64, copy=False)
        out = np.zeros((flat.size, *cf.shape[1:]), dtype=cf.dtype.newbyteorder("="))
        if flat.size == 0:
            return out.reshape(*rows.shape, *cf.shape[1:])
        if flat.min() < 0 or flat.max() >= cf.shape[0]:
            raise LakeError(
                f"{name}: row index out of range [0, {cf.shape[0]}) "
                f"(got [{flat.min()}, {flat.max()}])"
            )
        per_shard = self.layout(run).arrays[name].rows_per_shard
        bad = set(np.unique(flat // per_shard).tolist()) - self._committed(run)
        if bad:
            raise LakeError(
                f"run {run!r}: rows requested from uncommitted shard(s) {sorted(bad)[:10]}"
            )
        r = cf.chunk_rows
        chunk, within = flat // r, flat % r
        order = np.argsort(chunk, kind="stable")
        uniq, starts = np.unique(chunk[order], return_index=True)
        ends = np.append(starts[1:], order.size)
        for c, s, e in zip(uniq.tolist(), starts.tolist(), ends.tolist()):
            mm = self._memmap(cf.path(c), cf)
            if mm is not None:
                idx = order[s:e]
                out[idx] = mm[within[idx]]
        return out.reshape(*rows.shape, *cf.shape[1:])

    def validate(self, run: str | None = None) -> list[str]:
        """Problems found (empty list == ok): re-hashes committed files and arrays against markers."""
        runs = [run] if run is not None else self._run_names()
        return [p for r in runs for p in validate_run(self, r)]
