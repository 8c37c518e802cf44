"""The pixel store: a subset decoded and resized once per resize recipe, as raw uint8 shards.

Decoding JPEGs is slower than a small model's forward pass, so every model with the same input
recipe (size, interpolation, crop) reads these shards instead of decoding again. Layout:

    LAKE/pixels/<name>/recipe.json          subset, subset checksum, size, interpolation, crop,
                                            shard size, decoder
    LAKE/pixels/<name>/shards/<shard>.npy   uint8 [inputs in the shard, S, S, 3]; rows of failed inputs are 0
    LAKE/pixels/<name>/shards/<shard>.parquet  position, width, height, reason (NULL when usable),
                                            decoder ('torchvision' | 'pil', NULL when failed)
    LAKE/pixels/<name>/shards/<shard>.json  marker, written last (byte counts and sha256 of both files)
    LAKE/pixels/<name>/shards/<shard>.lock  advisory lock held while the shard is written

Row k of shard i is input position i * shard_size + k of the subset (the run's image_id).

The recipe's decoder says which decoder built the store: "pil" (every row decoded by PIL) or
"torchvision" (JPEGs decoded by torchvision, on a GPU where there is one; other inputs by PIL, and
the row's `decoder` says which). Their pixels differ by a few grey levels, so they are different
recipes; a torchvision store's name ends in "-tv". Stores written before the decoder existed have
no `decoder` key or column: they are PIL stores, and `recipe()` / `meta()` say so.

A writer killed mid-shard leaves `*.tmp-<pid>-<id>` files; writing a shard (under its lock) deletes
that shard's, and starting a build (`create`) those of committed shards. Reading a shard checks its
files' sizes against the marker (not their hashes: `validate` does).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock

from tokenlake.store._errors import ContractError, LakeError
from tokenlake.store._io import atomic_write, read_parquet, sha256_file, temp_target
from tokenlake.store._layout import SHARD_NAME, shard_name

META_SCHEMA = pa.schema([
    ("position", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
    ("reason", pa.string()), ("decoder", pa.string()),
])
_DECODER_SUFFIX = {"pil": "", "torchvision": "-tv"}


def pixel_store_name(subset: str, recipe: dict[str, Any]) -> str:
    crop = round(recipe["crop_pct"] * 1000)
    decoder = recipe.get("decoder", "pil")
    suffix = _DECODER_SUFFIX.get(decoder, f"-{decoder}")  # PIL stores keep their old names
    return (f"{subset}-{recipe['img_size']}-{recipe['interpolation']}-{recipe['crop_mode']}{crop}"
            f"{suffix}")


def _npy_parts(array: np.ndarray) -> list[memoryview]:
    """The bytes `np.save` writes for `array`, as (header, the array's own buffer): no copy."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return [header.getbuffer(), memoryview(array.reshape(-1))]  # uint8: bytes


class PixelStore:
    """Reads and writes one pixel store; any number of processes, one writer per shard."""

    def __init__(self, lake: str | Path, name: str) -> None:
        self.dir = Path(lake) / "pixels" / name
        self.name = name
        self._maps: dict[int, np.ndarray] = {}
        self._meta: dict[int, pa.Table] = {}

    # -- recipe ------------------------------------------------------------------------------

    def recipe(self) -> dict[str, Any] | None:
        """The recipe on disk; a store from before the decoder key is a PIL store."""
        path = self.dir / "recipe.json"
        if not path.exists():
            return None
        recipe = json.loads(path.read_text())
        recipe.setdefault("decoder", "pil")
        return recipe

    def create(self, recipe: dict[str, Any]) -> None:
        """Start (or rejoin) the store; refuses a recipe that differs from the one on disk."""
        old = self.recipe()
        if old is not None and old != recipe:
            diff = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
            raise LakeError(f"pixel store {self.name!r} exists with a different recipe "
                            f"(keys {diff}); delete {self.dir} to rebuild it")
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        if old is None:
            atomic_write(self.dir / "recipe.json", json.dumps(recipe, sort_keys=True).encode())
        self.sweep_temp()

    def sweep_temp(self) -> list[Path]:
        """Delete the temporary files of committed shards (a writer killed before its rename:
        no live writer owns a committed shard's), and the recipe's once it exists. Uncommitted
        shards' are deleted by their next writer, under the shard's lock. Returns the paths."""
        gone = []
        committed = self.committed()
        for q in (self.dir / "shards").glob("*.tmp-*"):
            stem = (temp_target(q.name) or "").split(".", 1)[0]
            if SHARD_NAME.fullmatch(stem) and int(stem[1:]) in committed:
                q.unlink(missing_ok=True)
                gone.append(q)
        if (self.dir / "recipe.json").exists():  # written once, before any shard
            for q in self.dir.glob("recipe.json.tmp-*"):
                if temp_target(q.name) == "recipe.json":
                    q.unlink(missing_ok=True)
                    gone.append(q)
        return gone

    def _sweep_shard(self, shard: int) -> None:
        """Temporary files of `shard`; the caller holds its lock."""
        base = self.dir / "shards" / shard_name(shard)
        for suffix in (".npy", ".parquet", ".json"):
            target = base.name + suffix
            for q in base.parent.glob(target + ".tmp-*"):
                if temp_target(q.name) == target:
                    q.unlink(missing_ok=True)

    @property
    def n_shards(self) -> int:
        r = self.recipe()
        return -(-r["n"] // r["shard_size"]) if r else 0

    def committed(self) -> set[int]:
        return {int(p.stem[1:]) for p in (self.dir / "shards").glob("s*.json")
                if SHARD_NAME.fullmatch(p.stem)}

    def is_complete(self) -> bool:
        return self.recipe() is not None and self.committed() >= set(range(self.n_shards))

    # -- writing -----------------------------------------------------------------------------

    def write_shard(self, shard: int, *, pixels: np.ndarray, meta: pa.Table) -> dict[str, Any]:
        r = self.recipe()
        size = r["img_size"]
        lo = shard * r["shard_size"]
        n = min(r["shard_size"], r["n"] - lo)
        if pixels.dtype != np.uint8 or pixels.shape != (n, size, size, 3):
            raise ContractError(f"pixel shard {shard}: expected uint8 {(n, size, size, 3)}, got "
                                f"{pixels.dtype} {pixels.shape}")
        missing = sorted(set(META_SCHEMA.names) - set(meta.column_names))
        if missing:
            raise ContractError(f"pixel shard {shard}: meta lacks columns {missing}")
        meta = meta.select(META_SCHEMA.names).cast(META_SCHEMA)
        if meta.column("position").to_pylist() != list(range(lo, lo + n)):
            raise ContractError(f"pixel shard {shard}: meta.position must be {lo}..{lo + n - 1}")
        failed = [r is not None for r in meta.column("reason").to_pylist()]
        if failed != [d is None for d in meta.column("decoder").to_pylist()]:
            raise ContractError(f"pixel shard {shard}: meta.decoder must be NULL exactly where "
                                "reason is not (the decoder of every usable row)")
        base = self.dir / "shards" / shard_name(shard)
        table = io.BytesIO()
        pq.write_table(meta, table, write_page_checksum=True)
        parts = {".npy": _npy_parts(pixels), ".parquet": [table.getbuffer()]}
        files = {}
        with FileLock(str(base.with_suffix(".lock"))):
            self._sweep_shard(shard)  # a killed writer's leftovers: no live writer owns them now
            for suffix, buffers in parts.items():
                digest = hashlib.sha256()
                for buffer in buffers:
                    digest.update(buffer)
                # no fsync: the store is a cache of decodable inputs, checked by sha256 on
                # validate, and the per-file fsyncs cost more than the decoding of a shard
                atomic_write(base.with_suffix(suffix), buffers, fsync=False)
                files[suffix] = {"bytes": sum(b.nbytes for b in buffers),
                                 "sha256": digest.hexdigest()}
            n_errors = n - meta.column("reason").null_count
            marker = {"shard": shard_name(shard), "n": n, "n_errors": n_errors, "files": files}
            atomic_write(base.with_suffix(".json"), json.dumps(marker, sort_keys=True).encode())
        return marker

    # -- reading -----------------------------------------------------------------------------

    def _shard(self, shard: int) -> tuple[np.ndarray, pa.Table]:
        if shard not in self._maps:
            base = self.dir / "shards" / shard_name(shard)
            if not base.with_suffix(".json").exists():
                raise LakeError(f"pixel store {self.name!r}: shard {shard} is not committed")
            marker = json.loads(base.with_suffix(".json").read_text())
            for suffix, want in marker["files"].items():
                path = base.with_suffix(suffix)
                size = path.stat().st_size if path.exists() else None
                if size != want["bytes"]:
                    raise LakeError(
                        f"pixel store {self.name!r}, shard {shard_name(shard)}: {path.name} "
                        f"{'is missing' if size is None else f'has {size} bytes'}, its marker "
                        f"says {want['bytes']}. Delete {self.dir} and rebuild it (`tokenlake "
                        "pixels`)")
            pixels = np.load(base.with_suffix(".npy"), mmap_mode="r")
            self._meta[shard] = read_parquet(base.with_suffix(".parquet"))
            self._maps[shard] = pixels  # last: reader threads take its presence for both
        return self._maps[shard], self._meta[shard]

    def meta(self, shard: int) -> pa.Table:
        """A committed shard's rows (META_SCHEMA); stores from before the decoder column get one
        ('pil' for usable rows: those stores were all decoded by PIL)."""
        meta = self._shard(shard)[1]
        if "decoder" not in meta.column_names:
            usable = pc.is_null(meta.column("reason"))
            decoder = pc.if_else(usable, pa.scalar("pil"), pa.scalar(None, pa.string()))
            meta = meta.append_column("decoder", decoder)
        return meta.select(META_SCHEMA.names)

    def read(self, position: int) -> tuple[np.ndarray | None, int, int, str | None]:
        """(pixels [S, S, 3] or None, width, height, reason) of one input position."""
        pixels, size, (reason,) = self.read_many(np.array([position]))
        return (None if reason is not None else pixels[0]), int(size[0, 0]), int(size[0, 1]), reason

    def read_many(self, positions: np.ndarray, out: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Input positions [n] -> (pixels [n, S, S, 3] (zeros for failed rows), the original
        (width, height) [n, 2], reasons); copied into `out` when given (e.g. pinned memory)."""
        side = self.recipe_cached["img_size"]
        out = np.empty((positions.size, side, side, 3), np.uint8) if out is None else out
        size = np.zeros((positions.size, 2), np.int64)
        reasons: list[str | None] = []
        step = self.recipe_cached["shard_size"]
        cuts = np.flatnonzero(np.diff(positions // step)) + 1  # where the next shard begins
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, positions.size]):
            shard = int(positions[lo]) // step
            pixels, meta = self._shard(shard)
            k = positions[lo:hi] - shard * step
            in_order = (np.diff(k) == 1).all()
            # a slice of the memory map when in order; numpy's copy releases the GIL, so reader
            # threads run in parallel
            np.copyto(out[lo:hi], pixels[k[0]:k[-1] + 1] if in_order else pixels[k])
            size[lo:hi, 0] = meta.column("width").to_numpy()[k]
            size[lo:hi, 1] = meta.column("height").to_numpy()[k]
            reasons += meta.column("reason").take(pa.array(k)).to_pylist()
        return out, size, reasons

    @property
    def recipe_cached(self) -> dict[str, Any]:
        if not hasattr(self, "_recipe"):
            self._recipe = self.recipe()
        return self._recipe

    def validate(self) -> list[str]:
        problems = []
        for shard in sorted(self.committed()):
            base = self.dir / "shards" / shard_name(shard)
            marker = json.loads(base.with_suffix(".json").read_text())
            for suffix, want in marker["files"].items():
                if not base.with_suffix(suffix).exists():
                    problems.append(f"pixels/{self.name}/{base.name}{suffix}: missing")
                elif sha256_file(base.with_suffix(suffix)) != want["sha256"]:
                    problems.append(f"pixels/{self.name}/{base.name}{suffix}: checksum mismatch")
        return problems
