"""Per-image features of the classification probe (paper Table 3), and the checks on a test run.

The paper: "Per image, a [CLS], random normal, or random outlier token is selected." and, for
Swin/PVT, "we employ average pooling over the spatial dimension [...] The pooled token will be
referred to as [CLS] token". Outlier flags always come from the pre-norm norm column, the
paper's definition ("Outliers are defined as tokens exceeding the 98th percentile of the L2-norm
distribution"); the features are the `tokens` ("post" | "pre") embeddings.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from tokenlake.probes import _data
from tokenlake.store import Lake

# what must be equal for two runs to be of one model seen the same way
SAME_MODEL = ("timm_name", "weights", "weights_sha256", "img_size", "preprocess")
POOL_CHUNK = 1024  # images per gather when average-pooling pre-norm patch tokens


def eligible_images(lk: Lake, run: str, idx: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted image ids, labels) of the labelled images of `run` with >= 1 stored outlier and
    >= 1 stored normal patch (the paper trains "using 200,000 images containing at least one
    outlier token"; a normal token must exist to be picked)."""
    img_ids, labels = _data.image_labels(lk, run)
    has_out = np.unique(idx["image_id"][idx["outlier"]])
    has_norm = np.unique(idx["image_id"][~idx["outlier"]])
    images = np.intersect1d(np.intersect1d(has_out, has_norm), img_ids)
    return images, labels[np.searchsorted(img_ids, images)]


def pick(image_id: np.ndarray, mask: np.ndarray, images: np.ndarray, rng) -> np.ndarray:
    """Index (into the patch index) of one uniformly drawn token per image among `mask` tokens."""
    cand = np.flatnonzero(mask)
    ids = image_id[cand]  # sorted by image_id already (SQL ORDER BY)
    starts = np.searchsorted(ids, images, side="left")
    counts = np.searchsorted(ids, images, side="right") - starts
    if (counts == 0).any():
        raise AssertionError("image without candidates")  # filtered before
    return cand[starts + (rng.random(images.size) * counts).astype(np.int64)]


def _pooled_pre(lk: Lake, run: str, info: _data.RunInfo, idx, images) -> np.ndarray:
    """Mean of every pre-norm patch token of each image: the pooled [CLS] before the final norm."""
    need = info.grid[0] * info.grid[1]
    sel = np.isin(idx["image_id"], images)
    counts = np.bincount(np.searchsorted(images, idx["image_id"][sel]), minlength=images.size)
    if (counts != need).any():
        pol = _data._mfield(info.manifest, "policy")
        raise _data.ProbeError(
            f"run {run!r} has no [CLS] token and stores {int((counts != need).sum())} of its "
            f"images without all {need} patch embeddings (policy {pol!r}): the pre-norm pooled "
            "token (mean of the patch tokens) cannot be formed. Use the output tokens "
            "(tokens='post', --tokens post), whose pooled token is stored as cls_post")
    slots = idx["slot"][sel].reshape(images.size, need)
    out = np.empty((images.size, info.dim), np.float32)
    for s in range(0, images.size, POOL_CHUNK):
        emb = lk.gather(run, slots[s:s + POOL_CHUNK], tokens="pre").astype(np.float32)
        out[s:s + POOL_CHUNK] = emb.mean(1)
    return out


def cls_features(lk: Lake, run: str, info: _data.RunInfo, idx, images: np.ndarray,
                 tokens: str) -> tuple[np.ndarray, str]:
    """The [CLS] feature of each image: (float32 [n, D], where it came from)."""
    if tokens == "post":  # the output [CLS]; for Swin/PVT the average-pooled output token
        if "cls_post" not in info.arrays:
            raise _data.ProbeError(f"run {run!r} has no image array cls_post (output [CLS])")
        source = ("cls_post: the output [CLS] token (after the final norm); for Swin/PVT the "
                  "average-pooled output token")
        return lk.image_array(run, "cls_post", images).astype(np.float32), source
    cls = lk.sql("SELECT image_id, slot FROM tokens WHERE run = ? AND kind = 'cls' "
                 "ORDER BY image_id, token", params=[run])
    if cls.num_rows == 0:  # Swin/PVT: pool the pre-norm patch tokens as the model pools
        source = ("mean of the image's pre-norm patch tokens (no [CLS] token: the pooled token "
                  "before the final norm)")
        return _pooled_pre(lk, run, info, idx, images), source
    ids = cls.column("image_id").to_numpy()
    slot = cls.column("slot").fill_null(-1).to_numpy()
    first = np.searchsorted(ids, images)
    ok = (first < ids.size) & (ids[np.minimum(first, ids.size - 1)] == images)
    ok &= slot[np.minimum(first, ids.size - 1)] >= 0
    if not ok.all():
        raise _data.ProbeError(
            f"run {run!r}: {int((~ok).sum())} image(s) have no stored pre-norm [CLS] embedding; "
            "use the output [CLS] (tokens='post', --tokens post)")
    return (lk.gather(run, slot[first], tokens="pre").astype(np.float32),
            "tokens: the [CLS] token's stored embedding, before the final norm")


def image_features(lk: Lake, run: str, info: _data.RunInfo, idx, images: np.ndarray, *,
                   tokens: str, rng) -> tuple[dict[str, np.ndarray], str]:
    """{cls, normal, outlier: float32 [n, D]} for `images` (sorted), and the CLS source."""
    picked = {"outlier": pick(idx["image_id"], idx["outlier"], images, rng),
              "normal": pick(idx["image_id"], ~idx["outlier"], images, rng)}
    x = {g: lk.gather(run, idx["slot"][p], tokens=tokens).astype(np.float32)
         for g, p in picked.items()}
    x["cls"], source = cls_features(lk, run, info, idx, images, tokens)
    return x, source


def check_test_run(lk: Lake, run: str, test_run: str) -> None:
    """ProbeError unless `test_run` is another run of the same model (manifest SAME_MODEL fields)
    whose images share no source_id with `run`'s."""
    if test_run == run:
        raise _data.ProbeError(f"test_run is the training run {run!r}; omit it to split the run")
    a, b = lk.manifest(run), lk.manifest(test_run)
    diff = {k: (_data._mfield(a, k), _data._mfield(b, k)) for k in SAME_MODEL
            if _data._mfield(a, k) != _data._mfield(b, k)}
    if diff:
        raise _data.ProbeError(
            f"test run {test_run!r} is not of the model of training run {run!r}: "
            + "; ".join(f"{k} {va!r} vs {vb!r}" for k, (va, vb) in diff.items()))
    both = lk.sql(
        "SELECT count(*) AS n, min(a.source_id) AS example FROM images AS a JOIN images AS b "
        "ON a.source_id = b.source_id WHERE a.run = ? AND b.run = ?", params=[run, test_run]
    ).to_pylist()[0]
    if both["n"]:
        raise _data.ProbeError(
            f"test run {test_run!r} shares {both['n']} image(s) with training run {run!r} "
            f"(by images.source_id, e.g. {both['example']!r}): a test image must be unseen")


def listing(lk: Lake, run: str, images: np.ndarray) -> tuple[pa.Table, str]:
    """The tested images (image_id, source_id, label; the store writes them with the result) and
    the sha256 of their sorted source_ids, so two results can be compared on the very same
    images."""
    t = lk.sql("SELECT image_id, source_id, label FROM images WHERE run = ? ORDER BY image_id",
               params=[run])
    t = t.filter(pa.array(np.isin(t.column("image_id").to_numpy(), images)))
    ids = sorted(t.column("source_id").to_pylist())
    return t, hashlib.sha256("\n".join(ids).encode()).hexdigest()


def tested(run: str, images: np.ndarray, held_out: str, digest: str) -> dict[str, Any]:
    return {"run": run, "n_images": int(images.size), "held_out": held_out,
            "file": "test_images.parquet", "source_ids_sha256": digest}
