"""Token selection (SQL) and streaming of the selected embeddings (store gathers).

SQL picks the tokens; `Lake.gather` reads their embeddings (and pixels) by slot. Features are
held in memory when they fit in `cache_bytes`, otherwise every batch is gathered from the
memory-mapped chunks on demand (`TokenFeatures`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenlake.store import Lake

DEFAULT_CACHE_BYTES = 2 << 30  # hold features in memory up to 2 GiB, stream beyond
GATHER_CHUNK = 65536
DEFAULT_SEED = 42  # the paper: "All experiments use a random seed of 42"
# Which embedding a probe reads. The paper's probes read the model's output tokens ("extracting
# output tokens, unnormalized norms (before the final LayerNorm), and [CLS] tokens"): "post" is the
# stored token with the run's saved final norm applied; "pre" is the stored token itself.
TOKENS = ("post", "pre")
TOKENS_MEANING = {
    "post": "output tokens: the run's saved final norm applied to the stored tokens "
            "(Lake.gather tokens='post')",
    "pre": "stored tokens, before the final norm (Lake.gather tokens='pre')",
}


class ProbeError(ValueError):
    """A probe cannot run on this lake/run (no stored embeddings, no outliers, no labels, ...)."""


def merge_hp(probe: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The probe's defaults overridden by `given`; an unknown name is an error, never ignored."""
    unknown = set(given) - set(defaults)
    if unknown:
        raise TypeError(f"{probe}(): unknown hyper-parameter(s) {sorted(unknown)}")
    return {**defaults, **given}


def check_tokens(lake: Lake, run: str, tokens: str) -> str:
    """Validate `tokens`; for "post", fail now (the store's LakeError, which names the
    re-extraction) when the run has no saved final norm, rather than after minutes of SQL."""
    if tokens not in TOKENS:
        raise ProbeError(f"tokens must be one of {TOKENS}, got {tokens!r}")
    if tokens == "post":
        lake.final_norm(run)  # never a silent fallback to the pre-norm tokens
    return tokens


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
    def layout(self) -> dict[str, Any]:
        return _mfield(self.manifest, "token_layout") or {}

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


# Only tokens with a stored embedding come back: a 'sample' run of 200k images has ~270M patch
# rows, of which a few million are stored. The flag is the `outliers` view's rule, norm > the
# `thresholds` view's 98th percentile of the threshold run (the same DOUBLE comparison).
_PATCHES = """
SELECT image_id, token, "row", col, norm, slot, (norm > $threshold) AS outlier
FROM tokens
WHERE run = $run AND kind = 'patch' AND slot IS NOT NULL
ORDER BY image_id, token
"""
_COUNTS = """
SELECT count(*) AS n, count(*) FILTER (WHERE slot IS NULL) AS n_without_slot,
       count(*) FILTER (WHERE norm > $threshold) AS n_outliers
FROM tokens
WHERE run = $run AND kind = 'patch'
"""


def threshold_of(lake: Lake, threshold_run: str) -> float:
    """The outlier threshold a run's tokens are judged by: the 98th percentile of the patch norms
    of `threshold_run` (the `thresholds` view, as the `outliers` view computes it). The paper:
    "Outliers are defined as tokens exceeding the 98th percentile of the L2-norm distribution -
    calculated on a per-model basis"."""
    t = lake.sql("SELECT threshold FROM thresholds WHERE run = ?", params=[threshold_run])
    if t.num_rows == 0 or t.column(0)[0].as_py() is None:
        raise ProbeError(f"threshold run {threshold_run!r} has no patch tokens")
    return float(t.column(0)[0].as_py())


def patch_index(
    lake: Lake, run: str, *, need_outliers: bool = True, threshold_run: str | None = None,
) -> dict[str, np.ndarray]:
    """Patch tokens of `run` that have a stored slot, flagged outlier by the `outliers` view's rule:
    norm > the threshold of the run's threshold_run (or of `threshold_run` when given: a test run
    judged by its training run's rule).

    Returns numpy columns image_id, token, row, col, norm, slot, outlier, and the counts
    'n_without_slot' (patch tokens without a stored embedding), 'n_outliers_total' (stored or
    not) and the 'threshold'. Raises ProbeError when no patch embedding is stored or, with
    need_outliers, when the run has no (stored) outlier token.
    """
    if threshold_run is None:
        thr = lake.sql("SELECT threshold_run FROM runs WHERE run = ?", params=[run]).to_pylist()
        threshold_run = thr[0]["threshold_run"] if thr else run
    params = {"run": run, "threshold": threshold_of(lake, threshold_run)}
    counts = lake.sql(_COUNTS, params=params).to_pylist()[0]
    if counts["n"] == 0:
        raise ProbeError(f"run {run!r} has no patch tokens")
    t = lake.sql(_PATCHES, params=params)
    if t.num_rows == 0:
        pol = _mfield(lake.manifest(run), "policy")
        raise ProbeError(
            f"run {run!r} stores no patch-token embeddings (policy {pol!r}); position, "
            "reconstruct, classify (normal/outlier) and sweep need a run extracted with "
            "--policy all or sample"
        )
    out = {c: np.asarray(t.column(c).to_numpy(zero_copy_only=False)) for c in
           ("image_id", "token", "norm")}
    out["slot"] = t.column("slot").to_numpy().astype(np.int64)
    out["outlier"] = t.column("outlier").to_numpy(zero_copy_only=False).astype(bool)
    out["row"] = t.column("row").to_numpy().astype(np.int64)
    out["col"] = t.column("col").to_numpy().astype(np.int64)
    out["n_without_slot"] = np.int64(counts["n_without_slot"])
    out["n_outliers_total"] = np.int64(counts["n_outliers"])
    out["threshold"] = np.float64(params["threshold"])
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


def split_train_val(
    image_ids: np.ndarray, seed: int, val_fraction: float
) -> dict[str, np.ndarray]:
    """Seeded split of the distinct image ids into train / val (sorted id arrays), for probes whose
    test images come from another run. Same permutation as `split_images`."""
    ids = np.unique(image_ids)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(ids)
    n_val = max(1, round(val_fraction * ids.size))
    if ids.size - n_val < 1:
        raise ProbeError(f"too few images ({ids.size}) to hold out a validation part")
    return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}


class TokenFeatures:
    """Embeddings (and optionally pixels) of a list of slots: in memory if they fit, else streamed.

    `get(idx)` returns float32 embeddings [len(idx), D] (and uint8 pixels) for positions `idx` into
    `slots`. In streaming mode each call is one `Lake.gather` over the memory-mapped chunks.
    `tokens` ("post" | "pre") is passed to `Lake.gather`. `cells(positions)`, when given, supplies
    the pixels instead of the stored cell under each slot (PVT's receptive-field-centred cells).
    """

    def __init__(
        self, lake: Lake, run: str, slots: np.ndarray, *, tokens: str, pixels: bool = False,
        cells: Callable[[np.ndarray], np.ndarray] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.lake, self.run, self.slots, self.pixels = lake, run, np.asarray(slots, np.int64), pixels
        self.tokens, self.cells = tokens, cells
        lay = lake.layout(run).arrays
        # post tokens are float32 in memory, the stored ones float16
        row = int(np.prod(lay["tokens"].shape)) * (4 if tokens == "post" else 2)
        if pixels:
            if "pixels" not in lay:
                raise ProbeError(f"run {run!r} has no pixels array")
            row += int(np.prod(lay["pixels"].shape))
        self.cached = self.slots.size * row <= cache_bytes
        self._emb = self._pix = None
        if self.cached:
            embs, pixs = [], []
            for s in range(0, self.slots.size, GATHER_CHUNK):
                emb, pix = self._read(np.arange(s, min(s + GATHER_CHUNK, self.slots.size)))
                embs.append(emb)
                pixs.append(pix)
            self._emb = (np.concatenate(embs) if embs else np.zeros(
                (0, *lay["tokens"].shape), np.float32 if tokens == "post" else np.float16))
            if pixels:
                self._pix = np.concatenate(pixs) if pixs else np.zeros(
                    (0, *lay["pixels"].shape), np.uint8)

    def _read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        stored_pixels = self.pixels and self.cells is None
        got = self.lake.gather(self.run, self.slots[idx], tokens=self.tokens,
                               pixels=stored_pixels)
        emb, pix = got if stored_pixels else (got, None)
        if self.pixels and self.cells is not None:
            pix = self.cells(idx)
        return emb, pix  # float16 (pre) or float32 (post); get() hands out float32

    def __len__(self) -> int:
        return int(self.slots.size)

    def get(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.cached:
            emb, pix = self._emb[idx], (self._pix[idx] if self.pixels else None)
        else:
            emb, pix = self._read(idx)
        return emb.astype(np.float32, copy=False), pix


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
