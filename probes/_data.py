"""Token selection (SQL) and streaming of the selected embeddings (store gathers).

SQL picks the tokens; `Lake.gather` reads their embeddings (and pixels) by slot. Features are
held in memory when they fit in `cache_bytes`, otherwise every batch is gathered from the
memory-mapped chunks on demand (`TokenFeatures`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenlake.store import Lake

DEFAULT_CACHE_BYTES = 2 << 30  # hold features in memory up to 2 GiB, stream beyond
GATHER_CHUNK = 65536


class ProbeError(ValueError):
    """A probe cannot run on this lake/run (no stored embeddings, no outliers, no labels, ...)."""


def merge_hp(probe: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The probe's defaults overridden by `given`; an unknown name is an error, never ignored."""
    unknown = set(given) - set(defaults)
    if unknown:
        raise TypeError(f"{probe}(): unknown hyper-parameter(s) {sorted(unknown)}")
    return {**defaults, **given}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _mfield(m: dict[str, Any], key: str) -> Any:
    if key in m:
        return m[key]
    cfg = m.get("config")
    return cfg.get(key) if isinstance(cfg, dict) else None


@dataclass(frozen=True)
class RunInfo:
    run: str
    manifest: dict[str, Any]
    grid: tuple[int, int]  # (rows, cols) of the patch grid
    cell: int | None  # pixels per token side (P), None without a pixels array
    dim: int | None  # embedding width D of arrays.tokens
    arrays: frozenset[str]
    random_weights: bool
    threshold_run: str
    fingerprint: str  # changes whenever the run's committed data changes

    @property
    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        dc = _mfield(self.manifest, "data_config") or {}
        if "mean" not in dc or "std" not in dc:
            raise ProbeError(
                f"run {self.run!r}: manifest has no data_config mean/std, needed to normalise "
                "pixels as the model's input"
            )
        return np.asarray(dc["mean"], np.float32), np.asarray(dc["std"], np.float32)


def run_info(lake: Lake, run: str) -> RunInfo:
    m = lake.manifest(run)
    lay = lake.layout(run)
    tl = _mfield(m, "token_layout") or {}
    if "grid" in tl:
        grid = (int(tl["grid"][0]), int(tl["grid"][1]))
    else:
        t = lake.sql(
            'SELECT max("row") + 1 AS gh, max(col) + 1 AS gw FROM tokens '
            "WHERE run = ? AND kind = 'patch'", params=[run]
        ).to_pylist()[0]
        if t["gh"] is None:
            raise ProbeError(f"run {run!r} has no patch tokens")
        grid = (int(t["gh"]), int(t["gw"]))
    thr = lake.sql("SELECT threshold_run FROM runs WHERE run = ?", params=[run]).to_pylist()
    fp = hashlib.sha256(
        "|".join(str(s.get("marker_sha256")) for s in m.get("shards", [])).encode()
    ).hexdigest()[:16]
    arrays = lay.arrays
    return RunInfo(
        run=run, manifest=m, grid=grid,
        cell=int(arrays["pixels"].shape[0]) if "pixels" in arrays else None,
        dim=int(arrays["tokens"].shape[0]) if "tokens" in arrays else None,
        arrays=frozenset(arrays), random_weights=bool(_mfield(m, "random_weights")),
        threshold_run=thr[0]["threshold_run"] if thr else run, fingerprint=fp,
    )


_PATCHES = """
SELECT t.image_id, t.token, t."row", t.col, t.norm, t.slot, (o.token IS NOT NULL) AS outlier
FROM tokens AS t
LEFT JOIN (SELECT image_id, token FROM outliers WHERE run = $run) AS o USING (image_id, token)
WHERE t.run = $run AND t.kind = 'patch'
ORDER BY t.image_id, t.token
"""


def patch_index(lake: Lake, run: str, *, need_outliers: bool = True) -> dict[str, np.ndarray]:
    """Patch tokens of `run` that have a stored slot, with the outlier flag of the `outliers` view.

    Returns numpy columns image_id, token, row, col, norm, slot, outlier (+ counts of dropped tokens
    under key 'n_without_slot'). Raises ProbeError when no patch embedding is stored or, with
    need_outliers, when the run has no (stored) outlier token.
    """
    t = lake.sql(_PATCHES, params={"run": run})
    if t.num_rows == 0:
        raise ProbeError(f"run {run!r} has no patch tokens")
    cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in
            ("image_id", "token", "row", "col", "norm", "outlier")}
    slot = t.column("slot")
    has = ~np.asarray(slot.is_null().to_numpy(zero_copy_only=False))
    if not has.any():
        pol = _mfield(lake.manifest(run), "policy")
        raise ProbeError(
            f"run {run!r} stores no patch-token embeddings (policy {pol!r}); position, "
            "reconstruct, classify (normal/outlier) and sweep need a run extracted with "
            "--policy all or sample"
        )
    out = {k: np.asarray(v)[has] for k, v in cols.items()}
    out["slot"] = slot.fill_null(-1).to_numpy()[has].astype(np.int64)
    out["outlier"] = out["outlier"].astype(bool)
    out["row"], out["col"] = out["row"].astype(np.int64), out["col"].astype(np.int64)
    out["n_without_slot"] = np.int64((~has).sum())
    out["n_outliers_total"] = np.int64(np.asarray(cols["outlier"]).astype(bool).sum())
    if need_outliers and not out["outlier"].any():
        detail = (
            f"{int(out['n_outliers_total'])} outlier(s) exist but none has a stored embedding"
            if out["n_outliers_total"] else "no patch token is above the threshold of "
            "its threshold_run"
        )
        raise ProbeError(f"run {run!r} has no usable outlier tokens: {detail}")
    return out


def image_labels(lake: Lake, run: str) -> tuple[np.ndarray, np.ndarray]:
    """(image_id, label) of the run's labelled images; ProbeError when none is labelled."""
    t = lake.sql(
        "SELECT image_id, label FROM images WHERE run = ? AND label IS NOT NULL ORDER BY image_id",
        params=[run],
    )
    if t.num_rows == 0:
        raise ProbeError(f"run {run!r} has no image labels (images.label is NULL everywhere)")
    return t.column("image_id").to_numpy(), t.column("label").to_numpy().astype(np.int64)


def split_images(
    image_ids: np.ndarray, seed: int, fractions: tuple[float, float, float]
) -> dict[str, np.ndarray]:
    """Seeded split of the distinct image ids into train / val / test (sorted id arrays)."""
    ids = np.unique(image_ids)
    if ids.size < 3:
        raise ProbeError(f"need at least 3 images to split train/val/test, got {ids.size}")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(ids)
    n_val = max(1, round(fractions[1] * ids.size))
    n_test = max(1, round(fractions[2] * ids.size))
    n_train = ids.size - n_val - n_test
    if n_train < 1:
        raise ProbeError(f"too few images ({ids.size}) for split {fractions}")
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train:n_train + n_val]),
        "test": np.sort(perm[n_train + n_val:]),
    }


class TokenFeatures:
    """Embeddings (and optionally pixels) of a list of slots: in memory if they fit, else streamed.

    `get(idx)` returns float32 embeddings [len(idx), D] (and uint8 pixels) for positions `idx` into
    `slots`. In streaming mode each call is one `Lake.gather` over the memory-mapped chunks.
    """

    def __init__(
        self, lake: Lake, run: str, slots: np.ndarray, *, pixels: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.lake, self.run, self.slots, self.pixels = lake, run, np.asarray(slots, np.int64), pixels
        lay = lake.layout(run).arrays
        row = int(np.prod(lay["tokens"].shape)) * 2
        if pixels:
            if "pixels" not in lay:
                raise ProbeError(f"run {run!r} has no pixels array")
            row += int(np.prod(lay["pixels"].shape))
        self.cached = self.slots.size * row <= cache_bytes
        self._emb = self._pix = None
        if self.cached:
            embs, pixs = [], []
            for s in range(0, self.slots.size, GATHER_CHUNK):
                got = lake.gather(run, self.slots[s:s + GATHER_CHUNK], pixels=pixels)
                if pixels:
                    embs.append(got[0])
                    pixs.append(got[1])
                else:
                    embs.append(got)
            self._emb = np.concatenate(embs) if embs else np.zeros((0, *lay["tokens"].shape),
                                                                    np.float16)
            if pixels:
                self._pix = np.concatenate(pixs)

    def __len__(self) -> int:
        return int(self.slots.size)

    def get(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.cached:
            return self._emb[idx].astype(np.float32), (self._pix[idx] if self.pixels else None)
        got = self.lake.gather(self.run, self.slots[idx], pixels=self.pixels)
        if self.pixels:
            return got[0].astype(np.float32), got[1]
        return got.astype(np.float32), None


def batch_indices(
    idx: np.ndarray, batch_size: int, *, shuffle: bool, rng: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """Chunks of `idx` (shuffled with `rng` when asked): the iterator the trainers consume."""
    if shuffle:
        idx = rng.permutation(idx)
    for s in range(0, idx.size, batch_size):
        yield idx[s:s + batch_size]


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (std floored) of training features."""
    x = x.astype(np.float64)
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd < 1e-6, 1.0, sd)
    return mu.astype(np.float32), sd.astype(np.float32)


def fit_standardizer(feats: TokenFeatures, idx: np.ndarray, seed: int, max_rows: int = 65536):
    """Standardisation statistics from (at most `max_rows` seeded) training rows."""
    rng = np.random.default_rng([seed, 0x57D])
    pick = idx if idx.size <= max_rows else np.sort(rng.choice(idx, max_rows, replace=False))
    x, _ = feats.get(pick)
    return standardizer(x)


def torch_batches(
    feats: TokenFeatures, idx: np.ndarray, *, batch_size: int, device: torch.device,
    mu: torch.Tensor, sd: torch.Tensor, targets, shuffle: bool = False,
    rng: np.random.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """(standardised features, *targets(b, pixels)) on `device`, for chunks b of `idx`."""
    for b in batch_indices(idx, batch_size, shuffle=shuffle, rng=rng):
        x, pix = feats.get(b)
        x = (torch.from_numpy(x).to(device, non_blocking=True) - mu) / sd
        yield (x, *targets(b, pix))


class ArrayFeatures(TokenFeatures):
    """In-memory features [N, F] (per-image vectors) behind the TokenFeatures interface."""

    def __init__(self, x: np.ndarray) -> None:
        self._emb, self._pix, self.pixels, self.cached = x, None, False, True
        self.slots = np.arange(len(x))


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0xE90C, epoch])
