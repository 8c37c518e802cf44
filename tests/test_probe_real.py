"""Probes on a real extraction (PVT-v2-b0, random weights, generated labelled images): the
centred cells against the preprocessed image, the pooled [CLS] before and after the final norm."""

from __future__ import annotations

import numpy as np
import pytest

from tokenlake import probes
from tokenlake.cli.main import main
from tokenlake.extract._preprocess import token_cells
from tokenlake.probes import _cells, _data, _imagefeats
from tokenlake.store import open_lake

PX, GRID = 128, 4


@pytest.fixture(scope="module")
def lake(tmp_path_factory, image_helpers):
    root = tmp_path_factory.mktemp("real")
    image_helpers.write_imagefolder(root / "imgs", per_class=10)
    assert main(["extract", "--lake", str(root / "lake"), "--model", "pvt_b0", "--data",
                 str(root / "imgs"), "--limit", "40", "--weights", "random", "--img-size",
                 str(PX), "--decode-workers", "0", "--quiet", "--run", "pvt"]) == 0
    return root / "lake"


def test_centred_cells_of_a_real_pvt_run(lake):
    db = open_lake(lake)
    info = _data.run_info(db, "pvt")
    assert info.layout["pixel_offset"] == 0 and info.layout["rf_offset"] == -16
    idx = _data.patch_index(db, "pvt", need_outliers=False)
    _, aligned = db.gather("pvt", idx["slot"], pixels=True)
    images = np.zeros((idx["image_id"].max() + 1, PX, PX, 3), np.uint8)  # the model's input
    for k, (i, r, c) in enumerate(zip(idx["image_id"], idx["row"], idx["col"])):
        images[i, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = aligned[k]
    read = _cells.centred_reader(db, "pvt", _cells.neighbour_slots(idx, info.grid), 16, 32)
    cut = token_cells(images, grid=(GRID, GRID), cell=32, offset=-16)
    np.testing.assert_array_equal(read(np.arange(idx["slot"].size)),
                                  cut[idx["image_id"], idx["row"] * GRID + idx["col"]])
    r = probes.reconstruct(lake, "pvt", target="centred", quiet=True, max_epochs=2)
    assert r["choices"]["target"]["derived_from_neighbours"] is True


def test_pooled_cls_before_and_after_the_final_norm(lake):
    """Swin/PVT have no [CLS]: "post" reads cls_post, the mean of the output tokens; "pre" the
    mean of the stored tokens. Both checked against the tokens themselves."""
    db = open_lake(lake)
    info = _data.run_info(db, "pvt")
    idx = _data.patch_index(db, "pvt", need_outliers=False)
    images = np.unique(idx["image_id"])
    per = idx["slot"].reshape(images.size, GRID * GRID)
    post, src_post = _imagefeats.cls_features(db, "pvt", info, idx, images, "post")
    pre, src_pre = _imagefeats.cls_features(db, "pvt", info, idx, images, "pre")
    np.testing.assert_allclose(post, db.gather("pvt", per, tokens="post").mean(1),
                               atol=1e-3 * np.abs(post).max())
    np.testing.assert_allclose(pre, db.gather("pvt", per).astype(np.float32).mean(1), rtol=1e-6)
    assert "average-pooled output token" in src_post and "pre-norm patch tokens" in src_pre
    for tokens in ("post", "pre"):
        r = probes.classify(lake, "pvt", tokens=tokens, quiet=True, max_epochs=2)
        assert r["config"]["tokens"] == tokens and r["choices"]["test"]["n_images"] >= 1
