"""Lake: the read side — run summaries, SQL, and fast array gathers."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from tokenlake.store import _sqlviews
from tokenlake.store._errors import DamagedRun, LakeError, UnknownRun
from tokenlake.store._finalnorm import TOKENS, apply_final_norm, read_final_norm
from tokenlake.store._io import read_json
from tokenlake.store._layout import SHARD_NAME, ChunkFiles, RunLayout, shard_name, valid_name
from tokenlake.store._schema import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION
from tokenlake.store._validate import validate_run

if TYPE_CHECKING:  # duckdb loads with the first query (0.2 s an extraction need not pay)
    import duckdb

_MAX_MAPS = 512  # each np.memmap holds a file descriptor; bound them


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
        # (run, shard) -> {array: chunk indices its committed marker lists}
        self._listed: dict[tuple[str, int], dict[str, frozenset[int]]] = {}
        self._marker_sha: dict[str, dict[int, Any]] = {}
        self._con: _sqlviews.Views | None = None  # Lake.sql's connection and what it read
        self._con_key: tuple[Any, ...] | None = None

    def __repr__(self) -> str:
        return f"Lake({str(self.path)!r})"

    # -- runs ----------------------------------------------------------------------------------

    def _run_names(self) -> list[str]:
        d = self.path / "runs"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def _manifests(self) -> dict[str, dict[str, Any] | str]:
        """Each complete run's manifest, or why it cannot be read (for SQL: that run then answers
        with the reason, the others normally)."""
        out: dict[str, dict[str, Any] | str] = {}
        for r in self._run_names():
            p = self.path / "runs" / r / "manifest.json"
            if p.exists():
                try:
                    out[r] = _check_version(read_json(p), p)
                except (OSError, ValueError, LakeError, AttributeError) as err:
                    out[r] = f"its manifest.json cannot be read ({err})"
        return out

    def manifest(self, run: str) -> dict[str, Any]:
        p = self.path / "runs" / run / "manifest.json"
        if not valid_name(run) or not p.exists():
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
        return read_json(p) if valid_name(run) and p.exists() else None

    def markers(self, run: str) -> dict[int, dict[str, Any]]:
        """Commit markers of a run's committed shards, by shard index."""
        d = self._run_dir(run) / "shards"
        out = {}
        for p in sorted(d.glob("s*.json")):
            if SHARD_NAME.fullmatch(p.stem):
                out[int(p.stem[1:])] = read_json(p)
        return out

    def _run_dir(self, run: str) -> Path:
        d = self.path / "runs" / run
        if not valid_name(run) or not d.is_dir():
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

        Every relation is a view over the lake's files or constants, so nothing can be inserted,
        updated or deleted, and file access is limited to the lake directory. Unlike `sql`, it
        does not check statements, so in-memory CREATE or COPY into the lake directory remain
        possible. A damaged run answers with an error naming it where a query reaches it.
        """
        return _sqlviews.connect(self.path, self._manifests()).con

    def _sql_key(self) -> tuple[Any, ...]:
        """What Lake.sql's views were built from: every complete run's manifest and table folders
        (deleting or adding a file changes its folder's mtime), probes/ and its run folders, and
        neurons/. A new key makes a new connection."""

        def mtime(p: Path) -> int | None:
            try:
                return p.stat().st_mtime_ns
            except OSError:
                return None

        key: list[Any] = []
        for r in self._run_names():
            d = self.path / "runs" / r
            m = mtime(d / "manifest.json")
            if m is not None:
                key.append((r, m, *(mtime(d / t) for t in _sqlviews.RUN_TABLES)))
        probes = self.path / "probes"
        try:
            key.append(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(probes)))
        except OSError:
            key.append(None)
        key.append((mtime(probes), mtime(self.path / "neurons")))
        return tuple(key)

    def _views(self, *, fresh: bool = False) -> _sqlviews.Views:
        key = self._sql_key()
        if fresh or self._con is None or key != self._con_key:
            if self._con is not None:
                self._con.con.close()  # its temporary directory goes with it
                self._con = None
            self._con, self._con_key = _sqlviews.connect(self.path, self._manifests()), key
        return self._con

    def sql(self, query: str, *, params: Any = None) -> pa.Table:
        """Run one read-only statement (SELECT / EXPLAIN SELECT) and return an Arrow table.

        A query that reaches a damaged run (a file its manifest lists is missing or unreadable)
        raises DamagedRun naming it; queries that do not reach it answer normally. Before that is
        reported, the query runs once more on a connection rebuilt from the lake as it is now: a
        file may have been replaced, damaged or repaired under the open one."""
        import duckdb

        views = self._views()
        _sqlviews.check_read_only(views.con, query)
        for attempt in (0, 1):
            cur = views.con.cursor()
            try:
                return cur.sql(query, params=params).to_arrow_table()
            except duckdb.Error as err:
                msg = str(err)
                damaged = _sqlviews.DAMAGE_TAG in msg  # a damaged run's branch was reached
                found = None if damaged else views.lake_file(msg)
                if not damaged and found is None:
                    raise  # the query's own error (a typo, a missing column...)
                if attempt == 1:
                    if damaged:
                        raise _sqlviews.damaged_run(msg) from None
                    raise _sqlviews.damaged_file(self.path, *found, msg) from err
            finally:
                cur.close()
            views = self._views(fresh=True)
        raise AssertionError("unreachable")

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

    def _damaged(self, run: str, shard: int, what: str) -> DamagedRun:
        return DamagedRun(
            f"run {run!r}, shard {shard_name(shard)}: {what}. The lake is damaged; see what else "
            f"is with `tokenlake validate --lake {self.path} --runs {run}`, then re-extract the "
            "run or restore it from a copy", run=run)

    def _marker_hashes(self, run: str) -> dict[int, Any] | None:
        """shard index -> the marker_sha256 a complete run's manifest records; None while the run
        has no manifest."""
        if run not in self._marker_sha:
            if not (self._run_dir(run) / "manifest.json").exists():
                return None
            self._marker_sha[run] = {
                k: e.get("marker_sha256") if isinstance(e, dict) else None
                for k, e in enumerate(self.manifest(run).get("shards", []))}
        return self._marker_sha[run]

    def _listed_chunks(self, run: str, shard: int) -> dict[str, frozenset[int]]:
        """The chunks of each array that a committed shard's marker lists (cached: a marker is
        never rewritten). For a complete run the marker must match the manifest's hash of it."""
        key = (run, shard)
        if key not in self._listed:
            d = self._run_dir(run)
            sname = shard_name(shard)
            try:
                raw = (d / "shards" / f"{sname}.json").read_bytes()
            except FileNotFoundError:
                raise self._damaged(run, shard, f"its commit marker shards/{sname}.json is "
                                                "missing, yet the run's manifest lists the "
                                                "shard") from None
            hashes = self._marker_hashes(run)
            if hashes is not None and hashes.get(shard) != hashlib.sha256(raw).hexdigest():
                raise self._damaged(run, shard, f"its commit marker shards/{sname}.json does not "
                                                "match the hash the run's manifest records")
            try:
                arrays = json.loads(raw)["arrays"]
                self._listed[key] = {n: frozenset(int(c) for c in a["chunks"])
                                     for n, a in arrays.items()}
            except (ValueError, KeyError, TypeError) as e:
                raise self._damaged(run, shard, f"its commit marker shards/{sname}.json cannot "
                                                f"be read ({type(e).__name__}: {e})") from None
        return self._listed[key]

    def _memmap(self, path: Path, cf: ChunkFiles, run: str, name: str, chunk: int,
                shard: int) -> np.memmap:
        """The chunk file of a chunk the shard's marker lists: it must exist, whole."""
        mm = self._maps.get(path)
        if mm is not None:
            self._maps.move_to_end(path)
            return mm
        rel = path.relative_to(self.path / "runs" / run)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise self._damaged(run, shard, f"chunk {chunk} of array {name!r} ({rel}) is "
                                            "missing, though the shard's commit marker lists "
                                            "it") from None
        shape = cf.chunk_shape
        want = int(np.prod(shape)) * cf.dtype.itemsize
        if size != want:
            raise self._damaged(run, shard, f"chunk {chunk} of array {name!r} ({rel}) has "
                                            f"{size} bytes, a whole chunk has {want}")
        mm = np.memmap(path, dtype=cf.dtype, mode="r", shape=shape)
        self._maps[path] = mm
        if len(self._maps) > _MAX_MAPS:
            self._maps.popitem(last=False)
        return mm

    def _read_rows(self, run: str, name: str, rows: Any, *, kind: str = "token") -> np.ndarray:
        """Rows of an array. A row is read from its chunk file when its chunk is listed by the
        commit marker of the shard that owns it (the file must then exist, whole: LakeError
        otherwise); a row of a chunk no marker lists (never written: a token slot or image id
        the shard did not use) reads as 0, whatever file may lie there (SCHEMA.md, "Reading")."""
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
        layout = self.layout(run)
        per_shard = layout.arrays[name].rows_per_shard
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
            shard = c * r // per_shard
            if c not in self._listed_chunks(run, shard).get(name, ()):
                continue  # never written: reads as the fill value 0
            mm = self._memmap(cf.path(c), cf, run, name, c, shard)
            idx = order[s:e]
            out[idx] = mm[within[idx]]
        return out.reshape(*rows.shape, *cf.shape[1:])

    def validate(self, run: str | None = None, *, quick: bool = False) -> list[str]:
        """Problems found (empty list == ok): re-hashes committed files and arrays against their
        markers, and checks markers, manifest and subset against each other (store/_validate.py).
        quick: sizes, markers and manifests only, no hashing of data.

        LakeError when `run` is None and the folder holds no run (an empty or non-lake folder:
        nothing would be checked)."""
        if run is not None:
            return validate_run(self, run, quick=quick)
        runs = self._run_names()
        if not runs:
            if not any(self.path.iterdir()):
                what = "an empty folder"
            elif not any((self.path / d).is_dir() for d in ("runs", "subsets", "pixels")):
                what = "not a lake (no runs/ or subsets/ folder)"
            else:
                what = "a lake without runs"
            raise LakeError(f"nothing to validate in {self.path}: {what}; is --lake right?")
        return [p for r in runs for p in validate_run(self, r, quick=quick)]
