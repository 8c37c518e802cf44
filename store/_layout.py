"""Array specs, the chunk-aligned slot layout, and the raw chunk files of arrays.zarr."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tokenlake.store._errors import ContractError, LakeError
from tokenlake.store._io import read_json

CHUNK_BYTES = 16 * 2**20  # upper bound for one chunk file
# names of runs, subsets and arrays: the whole string must match (no trailing newline)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHARD_NAME = re.compile(r"s\d{5,}")


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ContractError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' "
                            "(starting with a letter or digit)")
    return name


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def shard_name(index: int) -> str:
    return f"s{index:05d}"


@dataclass(frozen=True, kw_only=True)
class ArraySpec:
    """One array of arrays.zarr: per-row `shape`, numpy `dtype`, and `kind`.

    kind='token': rows are token slots (`tokens.slot`); kind='image': rows are image_ids.
    """

    shape: tuple[int, ...]
    dtype: str
    kind: Literal["token", "image"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        if self.kind not in ("token", "image"):
            raise ContractError(f"ArraySpec.kind must be 'token' or 'image', got {self.kind!r}")
        if any(s <= 0 for s in self.shape):
            raise ContractError(f"ArraySpec.shape must be positive, got {self.shape}")

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, kw_only=True)
class ArrayLayout:
    kind: str
    shape: list[int]  # per-row shape
    dtype: str
    chunk_rows: int
    rows_per_shard: int  # slot capacity (token arrays) or shard_size (image arrays)
    n_rows: int  # first dimension of the zarr array


@dataclass(frozen=True, kw_only=True)
class RunLayout:
    shard_size: int
    n_shards: int
    tokens_per_image: int
    slot_chunk_rows: int  # R: rows per chunk of every token array (0 if none)
    slot_capacity: int  # cap: slots owned by each shard, a multiple of R (0 if no token arrays)
    arrays: dict[str, ArrayLayout] = field(default_factory=dict)

    @classmethod
    def compute(
        cls, *, shard_size: int, n_shards: int, tokens_per_image: int, arrays: dict[str, ArraySpec]
    ) -> RunLayout:
        if shard_size <= 0 or n_shards <= 0 or tokens_per_image < 0:
            raise ContractError(
                f"shard_size and n_shards must be positive and tokens_per_image >= 0, "
                f"got {shard_size=}, {n_shards=}, {tokens_per_image=}"
            )
        token_specs = {n: s for n, s in arrays.items() if s.kind == "token"}
        r = cap = 0
        if token_specs:
            if tokens_per_image <= 0:
                raise ContractError(
                    "tokens_per_image must be positive when token arrays are stored"
                )
            # One R for all token arrays so a slot maps to the same chunk index in each of them.
            per_shard = shard_size * tokens_per_image
            widest = max(s.row_bytes for s in token_specs.values())
            r = 1 << max(0, math.floor(math.log2(max(1, CHUNK_BYTES // widest))))
            r = min(r, 1 << math.floor(math.log2(per_shard)))
            cap = math.ceil(per_shard / r) * r
        out = {}
        for name, s in sorted(arrays.items()):
            if s.kind == "token":
                rows, per = r, cap
            else:
                # Chunks must not straddle shards, so chunk_rows divides shard_size.
                budget = max(1, CHUNK_BYTES // s.row_bytes)
                rows = next(d for d in range(min(shard_size, budget), 0, -1) if shard_size % d == 0)
                per = shard_size
            out[name] = ArrayLayout(
                kind=s.kind,
                shape=list(s.shape),
                dtype=s.dtype,
                chunk_rows=rows,
                rows_per_shard=per,
                n_rows=per * n_shards,
            )
        return cls(
            shard_size=shard_size,
            n_shards=n_shards,
            tokens_per_image=tokens_per_image,
            slot_chunk_rows=r,
            slot_capacity=cap,
            arrays=out,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def shard_chunks(self, name: str, shard: int) -> range:
        """Indices of the chunks of array `name` that belong to `shard` (each chunk belongs to
        exactly one shard)."""
        a = self.arrays[name]
        first = shard * a.rows_per_shard // a.chunk_rows
        return range(first, first + a.rows_per_shard // a.chunk_rows)

    def chunk_shard(self, name: str, chunk: int) -> int:
        a = self.arrays[name]
        return chunk * a.chunk_rows // a.rows_per_shard

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunLayout:
        arrays = {k: ArrayLayout(**v) for k, v in d["arrays"].items()}
        return cls(**{**d, "arrays": arrays})


class ChunkFiles:
    """Raw chunk files of one uncompressed zarr v3 array, located from its zarr.json."""

    def __init__(self, array_dir: Path) -> None:
        meta = read_json(array_dir / "zarr.json")
        self.dir = array_dir
        codecs = meta.get("codecs", [])
        if meta.get("zarr_format") != 3 or len(codecs) != 1 or codecs[0]["name"] != "bytes":
            raise LakeError(
                f"{array_dir}: expected an uncompressed zarr v3 array (single 'bytes' codec)"
            )
        endian = codecs[0].get("configuration", {}).get("endian", "little")
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
        self.shape = tuple(meta["shape"])
        self.chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        if self.chunk_shape[1:] != self.shape[1:]:
            raise LakeError(
                f"{array_dir}: chunks must span whole rows, got chunk shape {self.chunk_shape}"
            )
        enc = meta["chunk_key_encoding"]
        sep = enc.get("configuration", {}).get(
            "separator", "/" if enc["name"] == "default" else "."
        )
        self._prefix = ["c"] if enc["name"] == "default" else []
        self._sep = sep
        self._tail = ["0"] * (len(self.shape) - 1)
        self.chunk_rows = self.chunk_shape[0]

    def path(self, chunk: int) -> Path:
        key = self._sep.join([*self._prefix, str(chunk), *self._tail])
        return self.dir.joinpath(*key.split("/"))
