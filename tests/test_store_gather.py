"""gather / image_array read exactly what was written, and agree with zarr-python."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tokenlake.store import LakeError, open_lake, write_run
from tokenlake.store.testing import tiny_run


@pytest.fixture
def written(tmp_path):
    r = tiny_run(n_images=21, error_ids=(5, 17), dim=16, seed=3)
    write_run(tmp_path, "g", shard_size=4, **r)
    return open_lake(tmp_path), r


def _global_slots(lk, r):
    """Map the dense source slots to the lake's global slots through the tokens table."""
    t = lk.sql("SELECT image_id, token, slot FROM tokens ORDER BY image_id, token")
    src = r["tokens"].sort_by([("image_id", "ascending"), ("token", "ascending")])
    return src.column("slot").to_numpy(), t.column("slot").to_numpy()


def test_gather_matches_source_and_zarr(written, tmp_path):
    lk, r = written
    src, glob = _global_slots(lk, r)
    assert len(np.unique(glob // lk.layout("g").slot_capacity)) == 6  # slots span every shard
    rng = np.random.default_rng(0)
    pick = rng.choice(len(src), size=200, replace=True)
    emb, pix = lk.gather("g", glob[pick], pixels=True)
    assert emb.dtype == np.float16 and pix.dtype == np.uint8
    np.testing.assert_array_equal(emb, r["arrays"]["tokens"][src[pick]])
    np.testing.assert_array_equal(pix, r["arrays"]["pixels"][src[pick]])
    g = zarr.open_group(tmp_path / "runs" / "g" / "arrays.zarr", mode="r")
    np.testing.assert_array_equal(emb, g["tokens"].get_orthogonal_selection((glob[pick],)))
    np.testing.assert_array_equal(pix, g["pixels"].get_orthogonal_selection((glob[pick],)))
    # An unwritten slot inside a committed shard reads as the fill value.
    cap = lk.layout("g").slot_capacity
    assert not lk.gather("g", [cap - 1]).any()


def test_image_array_matches_source(written, tmp_path):
    lk, r = written
    ids = r["images"].column("image_id").to_numpy()
    order = np.random.default_rng(1).permutation(len(ids))
    for name in ("cls_post", "patch_mean_post", "registers_post"):
        got = lk.image_array("g", name, ids[order])
        np.testing.assert_array_equal(got, r["arrays"][name][order])
        z = zarr.open_array(tmp_path / "runs" / "g" / "arrays.zarr" / name, mode="r")
        np.testing.assert_array_equal(got, z.get_orthogonal_selection((ids[order],)))
    assert not lk.image_array("g", "cls_post", [5, 17]).any()  # errored inputs read as 0


def test_gather_errors(written):
    lk, _ = written
    with pytest.raises(LakeError, match="out of range"):
        lk.gather("g", [10**9])
    with pytest.raises(LakeError, match="integers"):
        lk.gather("g", [1.5])
    with pytest.raises(LakeError, match="no array 'nope'"):
        lk.image_array("g", "nope", [0])
    with pytest.raises(LakeError, match="token array"):
        lk.image_array("g", "tokens", [0])
