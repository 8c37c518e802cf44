"""RunWriter: shard-at-a-time writes with an atomic commit protocol (see SCHEMA.md)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr
from filelock import FileLock, Timeout
from zarr.codecs import BytesCodec

from tokenlake.store._errors import ContractError, LakeError, RunConfigMismatch, RunExists
from tokenlake.store._finalnorm import FINAL_NORM_FILE, final_norm_entry, write_final_norm
from tokenlake.store._io import (
    atomic_write,
    canonical_json,
    fsync_dirs,
    make_dirs,
    parquet_bytes,
    read_json,
    temp_target,
    write_json,
)
from tokenlake.store._layout import (
    SHARD_NAME,
    ArraySpec,
    ChunkFiles,
    RunLayout,
    check_name,
    shard_name,
)
from tokenlake.store._schema import SCHEMA_VERSION, TABLE_SCHEMAS, check_token_kinds, conform

TABLE_DIRS = ("images", "tokens", "errors", "blocks")
RUN_FILES = ("config.json", "manifest.json", FINAL_NORM_FILE)  # written under run.lock
# Manifest keys the store computes; a caller may not set them to something else.
STORE_KEYS = (
    "schema_version",
    "run",
    "layout",
    "shards",
    "n_shards",
    "shard_size",
    "n_images",
    "n_errors",
    "n_tokens",
    "n_slots",
    "n_rejected",
    "bytes",
    "final_norm",
)


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(p)
            else:
                out += diff_keys(old[k], new[k], p)
        return out
    return [] if old == new else [prefix or "<root>"]


@dataclass
class _Prepared:
    shard: int
    tables: dict[str, pa.Table]
    token_arrays: dict[str, np.ndarray]
    image_arrays: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (local rows, data)
    n_slots: int
    n_rejected: int


class RunWriter:
    """Writes one run shard by shard; any number of processes may share a run, one per shard."""

    def __init__(
        self,
        lake: str | Path,
        run: str,
        *,
        config: Mapping[str, Any],
        shard_size: int,
        n_shards: int,
        tokens_per_image: int,
        arrays: Mapping[str, ArraySpec],
    ) -> None:
        self.lake = Path(lake).resolve()
        self.run = check_name(run, "run")
        self.dir = self.lake / "runs" / run
        for name, spec in arrays.items():
            check_name(name, "array")
            if not isinstance(spec, ArraySpec):
                raise ContractError(
                    f"arrays[{name!r}] must be an ArraySpec, got {type(spec).__name__}"
                )
        self.specs = dict(arrays)
        self.layout = RunLayout.compute(
            shard_size=shard_size,
            n_shards=n_shards,
            tokens_per_image=tokens_per_image,
            arrays=self.specs,
        )
        try:
            self.config = json.loads(canonical_json(dict(config)))
        except (TypeError, ValueError) as e:
            raise ContractError(f"config must be JSON-serialisable: {e}") from None
        fsync_dirs({d.parent for d in make_dirs(self.dir / "shards")})
        self._locks: dict[int, FileLock] = {}
        with FileLock(str(self.dir / "run.lock")):
            self._sweep_run_files()
            self._init_run()
        self._chunks = {n: ChunkFiles(self.dir / "arrays.zarr" / n) for n in self.specs}

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def _init_run(self) -> None:
        group_dir = self.dir / "arrays.zarr"
        cfg_path = self.dir / "config.json"
        attrs = (
            read_json(group_dir / "zarr.json").get("attributes", {})
            if (group_dir / "zarr.json").exists()
            else {}
        )
        old_layout = attrs.get("tokenlake", {}).get("layout")
        diffs = []
        if cfg_path.exists():
            diffs += diff_keys(read_json(cfg_path), self.config)
        if old_layout is not None:
            diffs += ["layout." + k for k in diff_keys(old_layout, self.layout.to_json())]
        if self.manifest_path.exists() and (diffs or not cfg_path.exists()):
            raise RunExists(
                f"run {self.run!r} is already complete and was made with a different config/layout "
                f"(differing keys: {diffs or ['config.json missing']}); use --run NEW_NAME or delete runs/{self.run}"
            )
        if diffs:
            raise RunConfigMismatch(
                f"run {self.run!r} exists with a different config; differing keys: {diffs}. "
                f"Resuming would mix two configs in one run: use --run NEW_NAME or delete runs/{self.run}"
            )
        if old_layout is None:
            group = zarr.open_group(group_dir, mode="a")
            for name, a in self.layout.arrays.items():
                group.create_array(
                    name,
                    shape=(a.n_rows, *a.shape),
                    chunks=(a.chunk_rows, *a.shape),
                    dtype=a.dtype,
                    compressors=None,
                    filters=None,
                    serializer=BytesCodec(endian="little"),
                    fill_value=0,
                    overwrite=True,
                )
            # Attributes last: their presence says every array exists.
            group.attrs.update(
                {"tokenlake": {"schema_version": SCHEMA_VERSION, "layout": self.layout.to_json()}}
            )
            _fsync_tree(group_dir)  # zarr writes its metadata without fsync
        if not cfg_path.exists():
            atomic_write(cfg_path, canonical_json(self.config).encode())

    # -- shard state ---------------------------------------------------------------------------

    def marker_path(self, shard: int) -> Path:
        return self.dir / "shards" / f"{shard_name(shard)}.json"

    def shard_done(self, shard: int) -> bool:
        return self.marker_path(shard).exists()

    def committed(self) -> set[int]:
        names = (p.stem for p in (self.dir / "shards").glob("s*.json"))
        return {int(n[1:]) for n in names if SHARD_NAME.fullmatch(n)}

    def _lock(self, shard: int) -> FileLock:
        if shard not in self._locks:
            self._locks[shard] = FileLock(str(self.dir / "shards" / f"{shard_name(shard)}.lock"))
        return self._locks[shard]

    @contextmanager
    def claim(self, shard: int) -> Iterator[bool]:
        """Hold the shard's lock; yields True if the caller should write it, False if already committed."""
        self._check_index(shard)
        with self._lock(shard):
            self._sweep_shard(shard)
            yield not self.shard_done(shard)

    def _check_index(self, shard: int) -> None:
        if not 0 <= shard < self.layout.n_shards:
            raise ContractError(
                f"shard index {shard} out of range: run {self.run!r} has "
                f"{self.layout.n_shards} shards (0..{self.layout.n_shards - 1})"
            )

    # -- writing -------------------------------------------------------------------------------

    def write_shard(
        self,
        shard: int,
        *,
        images: Any,
        tokens: Any,
        errors: Any,
        arrays: Mapping[str, np.ndarray],
        blocks: Any | None = None,
        n_rejected: int = 0,
    ) -> dict[str, Any]:
        """Validate and write one shard, then its marker. Returns the marker.

        tokens.slot is local: the row in arrays['tokens'/'pixels'] ([n_slots, ...]).
        Image arrays are aligned with the rows of `images`: row k belongs to images.image_id[k].
        """
        self._check_index(shard)
        p = self._prepare(shard, images, tokens, errors, arrays, blocks, n_rejected)
        with self._lock(shard):
            if self.shard_done(shard):
                raise LakeError(
                    f"shard {shard_name(shard)} of run {self.run!r} is already committed; "
                    f"use `with writer.claim({shard}) as todo:` to skip committed shards"
                )
            self._sweep_shard(shard)
            return self._write(p)

    # -- leftovers -----------------------------------------------------------------------------

    def _shard_temp_places(self, shard: int) -> list[tuple[Path, str]]:
        """(folder, file name) of every file a writer of `shard` renames into place."""
        sname = shard_name(shard)
        places = [(self.dir / t, f"{sname}.parquet") for t in TABLE_DIRS]
        places.append((self.dir / "shards", f"{sname}.json"))
        for name in self.layout.arrays:
            for g in self.layout.shard_chunks(name, shard):
                path = self._chunks[name].path(g)
                places.append((path.parent, path.name))
        return places

    def _sweep_shard(self, shard: int) -> list[Path]:
        """Delete the temporary files of `shard` left by a killed writer. The caller holds the
        shard's lock (or the shard is committed): no live writer owns them."""
        gone = []
        for folder, target in self._shard_temp_places(shard):
            for q in folder.glob(glob.escape(target) + ".tmp-*"):
                if temp_target(q.name) == target:
                    q.unlink(missing_ok=True)
                    gone.append(q)
        return gone

    def _sweep_run_files(self) -> list[Path]:
        """Temporary files of config.json, manifest.json, final_norm.json; under run.lock."""
        gone = []
        for target in RUN_FILES:
            for q in self.dir.glob(glob.escape(target) + ".tmp-*"):
                if temp_target(q.name) == target:
                    q.unlink(missing_ok=True)
                    gone.append(q)
        return gone

    def sweep_temp(self) -> list[Path]:
        """Delete every temporary file (`*.tmp-<pid>-<id>`, left by a writer killed before its
        rename) that no live writer owns: those of committed shards, those of other shards whose
        lock is free (taken while deleting), and the run's own files (under run.lock). Returns
        the paths deleted. Runs when a run is committed; `claim` sweeps its shard."""
        with FileLock(str(self.dir / "run.lock")):
            return self._sweep_all()

    def _sweep_all(self) -> list[Path]:
        by_shard: dict[int, list[Path]] = {}
        for folder, _, files in os.walk(self.dir):
            here = Path(folder)
            for f in files:
                if temp_target(f) is None:
                    continue
                shard = self._temp_shard(here / f)
                if shard is not None:
                    by_shard.setdefault(shard, []).append(here / f)
        gone = self._sweep_run_files()
        committed = self.committed()
        for shard in sorted(by_shard):
            if shard in committed:
                gone += self._sweep_shard(shard)
                continue
            # a fresh lock object (its own file descriptor): it fails while any writer holds the
            # shard, this process's other threads and this thread included
            lock = FileLock(str(self.dir / "shards" / f"{shard_name(shard)}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # a live writer holds it: its files are in use
            try:
                gone += self._sweep_shard(shard)
            finally:
                lock.release()
        return gone

    def _temp_shard(self, path: Path) -> int | None:
        """The shard whose writer wrote this temporary file, or None (a run-level file, or a
        file tokenlake does not write)."""
        rel = path.relative_to(self.dir).parts
        target = temp_target(path.name) or ""
        if len(rel) == 2 and rel[0] in (*TABLE_DIRS, "shards"):
            stem = target.split(".", 1)[0]
            return int(stem[1:]) if SHARD_NAME.fullmatch(stem) else None
        if len(rel) >= 5 and rel[0] == "arrays.zarr" and rel[1] in self.layout.arrays \
                and rel[2] == "c" and rel[3].isdigit():
            shard = self.layout.chunk_shard(rel[1], int(rel[3]))
            return shard if shard < self.layout.n_shards else None
        return None

    def _prepare(
        self,
        shard: int,
        images: Any,
        tokens: Any,
        errors: Any,
        arrays: Mapping[str, np.ndarray],
        blocks: Any | None,
        n_rejected: int,
    ) -> _Prepared:
        ss, sname = self.layout.shard_size, shard_name(shard)
        lo, hi = shard * ss, (shard + 1) * ss
        images = conform(images, "images")
        tokens = conform(tokens, "tokens")
        errors = conform(
            errors if errors is not None else TABLE_SCHEMAS["errors"].empty_table(), "errors"
        )
        blocks = conform(blocks, "blocks") if blocks is not None else None
        img_ids = images.column("image_id").to_numpy()
        err_ids = errors.column("image_id").to_numpy()
        for what, ids in (("images", img_ids), ("errors", err_ids)):
            bad = ids[(ids < lo) | (ids >= hi)]
            if bad.size:
                raise ContractError(
                    f"{what}.image_id: {bad.size} id(s) outside shard {sname}'s range [{lo}, {hi}) "
                    f"(e.g. {bad[:5].tolist()}); image_id // shard_size ({ss}) must equal the shard index"
                )
            if np.unique(ids).size != ids.size:
                raise ContractError(f"{what}.image_id: duplicate ids in shard {sname}")
        both = np.intersect1d(img_ids, err_ids)
        if both.size:
            raise ContractError(f"image_id(s) {both[:5].tolist()} appear in both images and errors")
        if n_rejected < 0 or img_ids.size + err_ids.size + n_rejected > ss:
            raise ContractError(
                f"shard {sname}: {img_ids.size} images + {err_ids.size} errors + "
                f"{n_rejected} rejected exceeds shard_size {ss}"
            )
        self._check_arrays(arrays, len(images))
        tokens = self._check_tokens(tokens, images)
        n_slots = self._check_slots(tokens, arrays)
        if blocks is not None:
            missing = ~np.isin(blocks.column("image_id").to_numpy(), img_ids)
            if missing.any():
                raise ContractError(
                    f"blocks.image_id: {int(missing.sum())} row(s) reference images not in `images`"
                )
            blocks = blocks.sort_by(
                [("image_id", "ascending"), ("block", "ascending"), ("token", "ascending")]
            )
        slot = pc.add(
            tokens.column("slot"), pa.scalar(shard * self.layout.slot_capacity, pa.int64())
        )
        tokens = tokens.set_column(
            tokens.schema.get_field_index("slot"), tokens.schema.field("slot"), slot
        )
        tables = {
            "images": images.sort_by("image_id"),
            "tokens": tokens,
            "errors": errors.sort_by("image_id"),
        }
        if blocks is not None:
            tables["blocks"] = blocks
        token_arrays, image_arrays = {}, {}
        for name, a in arrays.items():
            if self.specs[name].kind == "token":
                token_arrays[name] = np.asarray(a)
            else:
                image_arrays[name] = (img_ids - lo, np.asarray(a))
        return _Prepared(shard, tables, token_arrays, image_arrays, n_slots, int(n_rejected))

    def _check_arrays(self, arrays: Mapping[str, np.ndarray], n_images: int) -> None:
        extra = sorted(set(arrays) - set(self.specs))
        if extra:
            raise ContractError(
                f"arrays: unknown array(s) {extra}; this run declares {sorted(self.specs)}"
            )
        missing = sorted(n for n, s in self.specs.items() if n not in arrays and s.kind == "image")
        if missing:
            raise ContractError(f"arrays: missing image array(s) {missing}")
        n_slots = set()
        for name, a in arrays.items():
            spec, a = self.specs[name], np.asarray(arrays[name])
            if not np.can_cast(a.dtype, spec.dtype, "safe"):
                raise ContractError(
                    f"arrays[{name!r}]: dtype {a.dtype}, expected {spec.dtype} "
                    f"(only lossless casts are done)"
                )
            if a.ndim != 1 + len(spec.shape) or tuple(a.shape[1:]) != spec.shape:
                raise ContractError(
                    f"arrays[{name!r}]: shape {a.shape}, expected (n, {', '.join(map(str, spec.shape))})"
                )
            if spec.kind == "image" and a.shape[0] != n_images:
                raise ContractError(
                    f"arrays[{name!r}]: {a.shape[0]} rows but `images` has {n_images}; "
                    f"image arrays are aligned with the rows of `images`"
                )
            if spec.kind == "token":
                n_slots.add(a.shape[0])
        if len(n_slots) > 1:
            raise ContractError(f"token arrays disagree on the number of slots: {sorted(n_slots)}")

    def _check_tokens(self, tokens: pa.Table, images: pa.Table) -> pa.Table:
        check_token_kinds(tokens)
        tid, tok = tokens.column("image_id").to_numpy(), tokens.column("token").to_numpy()
        if tid.size > 1 and not np.all(
            (np.diff(tid) > 0) | ((np.diff(tid) == 0) & (np.diff(tok) > 0))
        ):
            tokens = tokens.sort_by([("image_id", "ascending"), ("token", "ascending")])
            tid, tok = tokens.column("image_id").to_numpy(), tokens.column("token").to_numpy()
        img_ids = images.column("image_id").to_numpy()
        n_tok = dict(zip(img_ids.tolist(), images.column("n_tokens").to_numpy().tolist()))
        ids, starts, counts = np.unique(tid, return_index=True, return_counts=True)
        unknown = ids[~np.isin(ids, img_ids)]
        if unknown.size:
            raise ContractError(
                f"tokens.image_id: {unknown.size} id(s) not in `images` (e.g. {unknown[:5].tolist()})"
            )
        got = dict(zip(ids.tolist(), counts.tolist()))
        wrong = [(i, got.get(i, 0), n) for i, n in n_tok.items() if got.get(i, 0) != n]
        if wrong:
            i, g, n = wrong[0]
            raise ContractError(
                f"tokens: {len(wrong)} image(s) whose token rows do not match images.n_tokens "
                f"(e.g. image_id {i}: {g} rows, n_tokens {n})"
            )
        expected = np.arange(tid.size) - np.repeat(starts, counts)
        if not np.array_equal(tok, expected):
            raise ContractError(
                "tokens.token: each image must have tokens 0..n_tokens-1 exactly once"
            )
        return tokens

    def _check_slots(self, tokens: pa.Table, arrays: Mapping[str, np.ndarray]) -> int:
        token_arrays = [n for n in arrays if self.specs[n].kind == "token"]
        n_slots = np.asarray(arrays[token_arrays[0]]).shape[0] if token_arrays else 0
        slots = tokens.column("slot").drop_null().to_numpy()
        if slots.size and not token_arrays:
            raise ContractError("tokens.slot is set but no token arrays (e.g. 'tokens') were given")
        if slots.size:
            if slots.min() < 0 or slots.max() >= n_slots:
                raise ContractError(
                    f"tokens.slot: values must be local rows of the token arrays, in [0, {n_slots}); "
                    f"got range [{slots.min()}, {slots.max()}]"
                )
            if np.unique(slots).size != slots.size:
                raise ContractError("tokens.slot: two tokens share a slot")
        missing = sorted(n for n, s in self.specs.items() if s.kind == "token" and n not in arrays)
        if missing and slots.size:
            raise ContractError(f"arrays: missing token array(s) {missing}")
        if n_slots > self.layout.slot_capacity:
            raise ContractError(
                f"{n_slots} slots exceed the per-shard capacity {self.layout.slot_capacity} "
                f"(shard_size {self.layout.shard_size} x tokens_per_image "
                f"{self.layout.tokens_per_image}, rounded up to whole chunks)"
            )
        return int(n_slots)

    def _write(self, p: _Prepared) -> dict[str, Any]:
        sname = shard_name(p.shard)
        files = {}
        dirs: set[Path] = set()  # the folders of the shard's files, fsynced before the marker
        for table, t in p.tables.items():
            data = parquet_bytes(t)
            rel = f"{table}/{sname}.parquet"
            atomic_write(self.dir / rel, data, dirs=dirs)
            files[table] = {
                "name": rel,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "n_rows": t.num_rows,
            }
        arrays = {}
        for name, a in p.token_arrays.items():
            arrays[name] = self._write_rows(name, p.shard, np.arange(a.shape[0]), a, dirs)
        for name, (rows, a) in p.image_arrays.items():
            arrays[name] = self._write_rows(name, p.shard, rows, a, dirs)
        ss, cap = self.layout.shard_size, self.layout.slot_capacity
        marker = {
            "schema_version": SCHEMA_VERSION,
            "run": self.run,
            "shard": sname,
            "index": p.shard,
            "image_id_range": [p.shard * ss, (p.shard + 1) * ss],
            "slot_range": [p.shard * cap, p.shard * cap + p.n_slots],
            "n_images": p.tables["images"].num_rows,
            "n_errors": p.tables["errors"].num_rows,
            "n_tokens": p.tables["tokens"].num_rows,
            "n_slots": p.n_slots,
            "n_rejected": p.n_rejected,
            "files": files,
            "arrays": arrays,
        }
        # every file of the shard, and every folder entry leading to it, is durable before the
        # marker (the commit) is written; write_json fsyncs shards/ after the marker's rename
        fsync_dirs(dirs)
        write_json(self.marker_path(p.shard), marker)
        return marker

    def _write_rows(
        self, name: str, shard: int, local: np.ndarray, data: np.ndarray, dirs: set[Path]
    ) -> dict[str, Any]:
        """Write whole chunks holding `data[k]` at shard-local row `local[k]`; other rows are 0."""
        a, cf = self.layout.arrays[name], self._chunks[name]
        r, base = a.chunk_rows, shard * a.rows_per_shard
        chunk_of = local // r
        h = hashlib.sha256()
        chunks = []
        # rows 0..n-1 in order (every token array, and image arrays of full shards): whole chunks
        # are written straight from `data`, without a zeroed copy
        in_order = data.dtype == cf.dtype and data.flags.c_contiguous and np.array_equal(
            local, np.arange(local.size))
        for c in np.unique(chunk_of).tolist():
            if in_order and (c + 1) * r <= local.size:
                raw = memoryview(data[c * r:(c + 1) * r]).cast("B")
            else:
                sel = chunk_of == c
                buf = np.zeros((r, *a.shape), dtype=cf.dtype)
                buf[local[sel] - c * r] = data[sel]
                raw = memoryview(buf).cast("B")
            h.update(raw)
            g = (base // r) + c
            atomic_write(cf.path(g), raw, dirs=dirs)
            chunks.append(g)
        rows = (base + local) if local.size else np.zeros(0, np.int64)
        return {
            "kind": a.kind,
            "n_rows": int(local.size),
            "rows": [int(rows.min()), int(rows.max()) + 1] if local.size else [base, base],
            "chunks": chunks,
            "sha256": h.hexdigest(),
        }

    def write_final_norm(self, norm: Mapping[str, Any]) -> dict[str, Any]:
        """Save the model's final norm (store/_finalnorm.py) with the run, once; every later call
        (another worker, a resume) must bring the same parameters."""
        with FileLock(str(self.dir / "run.lock")):
            return write_final_norm(self.dir, dict(norm))

    # -- commit --------------------------------------------------------------------------------

    def commit(self, manifest: Mapping[str, Any], *, n_shards: int | None = None) -> Path:
        """Write manifest.json (last, atomically) once every shard is committed.

        ``n_shards`` ends a run early: a run that stops once enough inputs passed a filter
        (keep-if-outlier) commits only its first ``n_shards`` shards.
        """
        total = self.layout.n_shards if n_shards is None else n_shards
        if not 0 < total <= self.layout.n_shards:
            raise ContractError(f"n_shards must be in 1..{self.layout.n_shards}, got {total}")
        with FileLock(str(self.dir / "run.lock")):
            if self.manifest_path.exists():
                self._sweep_all()
                return self.manifest_path
            missing = sorted(set(range(total)) - self.committed())
            if missing:
                shown = ", ".join(shard_name(i) for i in missing[:10]) + (
                    ", ..." if len(missing) > 10 else ""
                )
                raise LakeError(
                    f"cannot commit run {self.run!r}: {len(missing)} of {total} "
                    f"shard(s) not committed: {shown}"
                )
            m = build_manifest(self, manifest, total)
            write_json(self.manifest_path, m)  # fsyncs the run folder after the rename
            self._sweep_all()
        return self.manifest_path


def build_manifest(w: RunWriter, user: Mapping[str, Any], n_shards: int) -> dict[str, Any]:
    shards, totals = (
        [],
        dict.fromkeys(("n_images", "n_errors", "n_tokens", "n_slots", "n_rejected"), 0),
    )
    nbytes = 0
    for i in range(n_shards):
        raw = w.marker_path(i).read_bytes()
        mk = json.loads(raw)
        for k in totals:
            totals[k] += mk[k]
        nbytes += sum(f["bytes"] for f in mk["files"].values())
        for name, arr in mk["arrays"].items():
            a = w.layout.arrays[name]
            nbytes += len(arr["chunks"]) * a.chunk_rows * w.specs[name].row_bytes
        shards.append(
            {
                "shard": mk["shard"],
                "index": i,
                **{k: mk[k] for k in totals},
                "files": {t: f["name"] for t, f in mk["files"].items()},
                "marker_sha256": hashlib.sha256(raw).hexdigest(),
            }
        )
    store = {
        "schema_version": SCHEMA_VERSION,
        "run": w.run,
        "layout": w.layout.to_json(),
        "shards": shards,
        "n_shards": n_shards,
        "shard_size": w.layout.shard_size,
        **totals,
        "bytes": nbytes,
    }
    fn = w.dir / FINAL_NORM_FILE
    if fn.exists():
        data = fn.read_bytes()
        kind = json.loads(data)
        store["final_norm"] = final_norm_entry(data, kind["type"], kind["dim"])
    m = json.loads(canonical_json(dict(user)))
    clash = [k for k in STORE_KEYS if k in m and m[k] != store.get(k)]
    if clash:
        raise ContractError(
            f"manifest: key(s) {clash} are computed by the store and differ from the values given"
        )
    m.update(store)
    return m


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (a freshly created zarr group: metadata only)."""
    folders = {root, root.parent}
    for folder, _, files in os.walk(root):
        folders.add(Path(folder))
        for f in files:
            fd = os.open(Path(folder) / f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dirs(folders)
