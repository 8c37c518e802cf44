"""The pixel store: a subset decoded and resized once per resize recipe, as raw uint8 shards.

Decoding JPEGs is slower than a small model's forward pass, so every model with the same input
recipe (size, interpolation, crop) reads these shards instead of decoding again. Layout:

    LAKE/pixels/<name>/recipe.json          subset, subset checksum, size, interpolation, crop, shard size
    LAKE/pixels/<name>/shards/<shard>.npy   uint8 [inputs in the shard, S, S, 3]; rows of failed inputs are 0
    LAKE/pixels/<name>/shards/<shard>.parquet  position, width, height, reason (NULL when usable)
    LAKE/pixels/<name>/shards/<shard>.json  marker, written last (byte counts and sha256 of both files)

Row k of shard i is input position i * shard_size + k of the subset (the run's image_id).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenlake.store._errors import ContractError, LakeError
from tokenlake.store._io import atomic_write, sha256_file
from tokenlake.store._writer import shard_name

META_SCHEMA = pa.schema([
    ("position", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
    ("reason", pa.string()),
])


def pixel_store_name(subset: str, recipe: dict[str, Any]) -> str:
    crop = round(recipe["crop_pct"] * 1000)
    return f"{subset}-{recipe['img_size']}-{recipe['interpolation']}-{recipe['crop_mode']}{crop}"


class PixelStore:
    """Reads and writes one pixel store; any number of processes, one writer per shard."""

    def __init__(self, lake: str | Path, name: str) -> None:
        self.dir = Path(lake) / "pixels" / name
        self.name = name
        self._maps: dict[int, np.ndarray] = {}
        self._meta: dict[int, pa.Table] = {}

    # -- recipe ------------------------------------------------------------------------------

    def recipe(self) -> dict[str, Any] | None:
        path = self.dir / "recipe.json"
        return json.loads(path.read_text()) if path.exists() else None

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

    @property
    def n_shards(self) -> int:
        r = self.recipe()
        return -(-r["n"] // r["shard_size"]) if r else 0

    def committed(self) -> set[int]:
        return {int(p.stem[1:]) for p in (self.dir / "shards").glob("s*.json")}

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
        meta = meta.select(META_SCHEMA.names).cast(META_SCHEMA)
        if meta.column("position").to_pylist() != list(range(lo, lo + n)):
            raise ContractError(f"pixel shard {shard}: meta.position must be {lo}..{lo + n - 1}")
        base = self.dir / "shards" / shard_name(shard)
        blobs = {".npy": io.BytesIO(), ".parquet": io.BytesIO()}
        np.save(blobs[".npy"], pixels, allow_pickle=False)
        pq.write_table(meta, blobs[".parquet"])
        files = {}
        for suffix, blob in blobs.items():
            data = blob.getbuffer()
            # no fsync: the store is a cache of decodable inputs, checked by sha256 on validate,
            # and the per-file fsyncs cost more than the decoding of a shard
            atomic_write(base.with_suffix(suffix), data, fsync=False)
            files[suffix] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
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
            self._maps[shard] = np.load(base.with_suffix(".npy"), mmap_mode="r")
            self._meta[shard] = pq.read_table(base.with_suffix(".parquet"))
        return self._maps[shard], self._meta[shard]

    def read(self, position: int) -> tuple[np.ndarray | None, int, int, str | None]:
        """(pixels [S, S, 3] or None, width, height, reason) of one input position."""
        step = self.recipe_cached["shard_size"]
        pixels, meta = self._shard(position // step)
        k = position % step
        reason = meta.column("reason")[k].as_py()
        w, h = meta.column("width")[k].as_py(), meta.column("height")[k].as_py()
        return (None if reason is not None else np.array(pixels[k])), w, h, reason

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
                if sha256_file(base.with_suffix(suffix)) != want["sha256"]:
                    problems.append(f"pixels/{self.name}/{base.name}{suffix}: checksum mismatch")
        return problems
