"""Reconstruction targets (probes/_cells.py): the aligned cell, or PVT's receptive-field-centred
cell assembled from stored aligned cells; old PVT runs and missing neighbours refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenlake import probes
from tokenlake.cli import _probe_cmd
from tokenlake.extract._preprocess import token_cells
from tokenlake.probes import ProbeError, _cells, _data
from tokenlake.store import open_lake
from tokenlake.store.testing import probe_run

SMALL = {"max_epochs": 4, "lrs": (1e-2,)}
PVT = {"family": "pvt", "rf_offset": -16}  # a run written now: aligned cells, rf 16 px up-left


def _images(db, run, grid, cell):
    """The images whose aligned cells the run stored, reassembled [N, H, W, 3]."""
    t = db.sql("SELECT image_id, \"row\", col, slot FROM tokens WHERE run = ? AND kind = 'patch' "
               "ORDER BY image_id, token", params=[run]).to_pydict()
    _, cells = db.gather(run, np.asarray(t["slot"]), pixels=True)
    img = np.zeros((max(t["image_id"]) + 1, grid * cell, grid * cell, 3), np.uint8)
    for k, (i, r, c) in enumerate(zip(t["image_id"], t["row"], t["col"])):
        img[i, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = cells[k]
    return img


def test_centred_cells_equal_the_cells_cut_from_the_image(tmp_path):
    """PVT geometry (32 px cells, receptive field 16 px up-left): the centred cell assembled from
    a token's and its neighbours' aligned cells is the image's cell cut at offset -16."""
    probe_run(n_images=3, grid=3, patch=32, layout=PVT, seed=1).write(tmp_path, "pvt")
    db = open_lake(tmp_path)
    info = _data.run_info(db, "pvt")
    plan = _cells.plan_cells(db, "pvt", info, "centred")
    assert plan.derive and plan.rf_offset == -16
    idx = _data.patch_index(db, "pvt", need_outliers=False)
    read = _cells.centred_reader(db, "pvt", _cells.neighbour_slots(idx, info.grid), 16, 32)
    got = read(np.arange(idx["slot"].size))
    images = _images(db, "pvt", 3, 32)
    cut = token_cells(images, grid=(3, 3), cell=32, offset=-16)
    expect = cut[idx["image_id"], idx["row"] * 3 + idx["col"]]
    np.testing.assert_array_equal(got, expect)
    assert not got[idx["row"] == 0][:, :16].any()  # above the image: zeros


def test_centred_cells_of_an_image_the_grid_overhangs():
    """A 90 x 90 image under a 3 x 3 grid of 32 px cells (PVT at a size that is no multiple of
    32): the aligned cells are zero past the image, and so are the assembled centred cells."""
    img = np.random.default_rng(0).integers(1, 256, (2, 90, 90, 3), dtype=np.uint8)
    aligned = token_cells(img, grid=(3, 3), cell=32, offset=0).reshape(-1, 32, 32, 3)
    image_id, patch = np.divmod(np.arange(18), 9)
    idx = {"image_id": image_id, "row": patch // 3, "col": patch % 3, "slot": np.arange(18)}
    quads = _cells.neighbour_slots(idx, (3, 3))
    stack = np.where((quads >= 0)[..., None, None, None], aligned[np.maximum(quads, 0)], 0)
    got = _cells.assemble_centred(stack.astype(np.uint8), 16)
    cut = token_cells(img, grid=(3, 3), cell=32, offset=-16).reshape(-1, 32, 32, 3)
    np.testing.assert_array_equal(got, cut)


def test_pvt_targets_aligned_by_default_centred_on_request(tmp_path):
    """The planted tokens carry their aligned pixels, so the aligned cells reconstruct well and
    the centred ones (three quarters from the neighbours) do not."""
    probe_run(n_images=150, grid=4, patch=4, layout={**PVT, "rf_offset": -2}).write(tmp_path, "pvt")
    hp = {"batch_size": 64}  # ~900 training tokens: enough steps to converge
    aligned = probes.reconstruct(tmp_path, "pvt", quiet=True, **hp)
    centred = probes.reconstruct(tmp_path, "pvt", target="centred", quiet=True, **hp)
    assert aligned["config"]["target"] == "aligned" and centred["config"]["target"] == "centred"
    assert aligned["choices"]["target"]["derived_from_neighbours"] is False
    assert centred["choices"]["target"]["derived_from_neighbours"] is True
    a, c = aligned["metrics"]["normal"], centred["metrics"]["normal"]
    assert a["l2"] < 0.25 * a["mean_patch_l2"]  # measured 0.11
    # measured 0.50: the quarter from the token itself and the zeros above/left of the image
    # are predictable, the neighbours' three quarters are not
    assert c["l2"] > 0.35 * c["mean_patch_l2"] and c["l2"] > 4 * a["l2"]


def test_vit_targets_coincide(tmp_path):
    probe_run(n_images=40, grid=4).write(tmp_path, "vit")
    a = probes.reconstruct(tmp_path, "vit", quiet=True, **SMALL)
    c = probes.reconstruct(tmp_path, "vit", target="centred", quiet=True, **SMALL)
    assert a["metrics"] == c["metrics"] and c["config"]["target"] == "centred"
    assert "aligned = centred" in c["choices"]["target"]["cells"]
    assert c["choices"]["target"]["derived_from_neighbours"] is False


def test_old_pvt_run_stores_centred_cells_and_refuses_aligned(tmp_path):
    probe_run(n_images=40, grid=4, patch=4,
              layout={"family": "pvt", "pixel_offset": -2}).write(tmp_path, "oldpvt")
    with pytest.raises(ProbeError, match=r"pixel_offset -2.*tokenlake extract .*--run oldpvt-v3"
                                         r".*--target centred"):
        probes.reconstruct(tmp_path, "oldpvt", quiet=True)
    r = probes.reconstruct(tmp_path, "oldpvt", target="centred", quiet=True, **SMALL)
    assert r["choices"]["target"]["derived_from_neighbours"] is False
    assert r["choices"]["target"]["cells"].startswith("stored cells, centred")


def test_centred_cells_need_the_neighbours_stored(tmp_path):
    probe_run(n_images=40, grid=4, patch=4, unstored=0.3,
              layout={**PVT, "rf_offset": -2}).write(tmp_path, "sampled")
    with pytest.raises(ProbeError, match="lack a stored up/left neighbour.*--target aligned"):
        probes.reconstruct(tmp_path, "sampled", target="centred", quiet=True, **SMALL)
    assert probes.reconstruct(tmp_path, "sampled", quiet=True, **SMALL)["metrics"]["normal"]["n"]
    with pytest.raises(ProbeError, match="target must be one of"):
        probes.reconstruct(tmp_path, "sampled", target="shifted", quiet=True)


def test_cli_target(tmp_path, capsys):
    probe_run(n_images=30, grid=4, patch=4, layout={**PVT, "rf_offset": -2}).write(tmp_path, "pvt")
    rc = _probe_cmd.main(["probe", "reconstruct", "--lake", str(tmp_path), "--run", "pvt",
                          "--target", "centred", "--quiet", "--max-epochs", "2", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["config"]["target"] == "centred"
    assert res["choices"]["target"]["derived_from_neighbours"] is True
