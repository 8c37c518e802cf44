"""Output tokens from the lake: the saved final norm applied to the stored pre-norm tokens equals
timm's own `forward_features` (the model's output tokens), for a ViT, Swin-v2 and PVT-v2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tokenlake.cli.main import main
from tokenlake.extract import create_backbone, resolve_model, resolve_weights
from tokenlake.store import LakeError, RunConfigMismatch, open_lake, write_run
from tokenlake.store.testing import tiny_run

MODELS = {"dinov2_s_reg4": 56, "swinv2_t": 64, "pvt_b0": 64}


def _final_norm(model, alias):
    return model.stages[-1].norm if alias.startswith("pvt") else model.norm


@pytest.fixture(scope="module")
def lake(tmp_path_factory, image_helpers):
    """One run per family, from a weights file whose final norm has non-trivial parameters (a
    fresh LayerNorm is the identity affine map, which would hide a norm applied without them)."""
    imgs = tmp_path_factory.mktemp("imgs")
    image_helpers.write_flat_folder(imgs, n=3)
    path, wdir = tmp_path_factory.mktemp("lake"), tmp_path_factory.mktemp("weights")
    for alias, px in MODELS.items():
        model = create_backbone(resolve_model(alias), weights=resolve_weights("random"),
                                img_size=px)
        norm = _final_norm(model, alias)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.5 + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
        torch.save(model.state_dict(), wdir / f"{alias}.pth")
        assert main(["extract", "--lake", str(path), "--model", alias, "--data", str(imgs),
                     "--limit", "3", "--weights", str(wdir / f"{alias}.pth"), "--img-size",
                     str(px), "--decode-workers", "0", "--quiet", "--run", alias]) == 0
    return path, wdir


def _reference(alias: str, px: int, db, run: str, weights) -> np.ndarray:
    """[N, T, D] forward_features of the very pixels the lake stored (cells reassembled)."""
    t = db.sql("SELECT image_id, token, \"row\", col, slot FROM tokens WHERE run = ? "
               "AND kind = 'patch' ORDER BY image_id, token", params=[run]).to_pydict()
    _, cells = db.gather(run, np.asarray(t["slot"]), pixels=True)  # aligned cells
    n, c = len(set(t["image_id"])), cells.shape[1]
    pixels = np.zeros((n, px, px, 3), np.uint8)
    for k, (i, r, col) in enumerate(zip(t["image_id"], t["row"], t["col"])):
        pixels[i, r * c:(r + 1) * c, col * c:(col + 1) * c] = cells[k]
    model = create_backbone(resolve_model(alias), weights=resolve_weights(str(weights)),
                            img_size=px)
    cfg = db.manifest(run)["data_config"]
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        out = model.forward_features(x)
    if out.ndim == 4:  # Swin NHWC, PVT NCHW
        out = out.flatten(1, 2) if alias.startswith("swin") else out.flatten(2).transpose(1, 2)
    return out.numpy()


@pytest.mark.parametrize("alias", list(MODELS))
def test_post_tokens_are_forward_features(lake, alias):
    path, wdir = lake
    db = open_lake(path)
    slots = db.sql("SELECT slot FROM tokens WHERE run = ? ORDER BY image_id, token",
                   params=[alias]).column(0).to_numpy()
    post = db.gather(alias, slots, tokens="post")
    ref = _reference(alias, MODELS[alias], db, alias, wdir / f"{alias}.pth").reshape(post.shape)
    pre = db.gather(alias, slots).astype(np.float32)
    assert post.dtype == np.float32 and not np.allclose(post, pre, atol=1e-2)
    # the stored token is fp16: its rounding (relative 2^-11) passes through the norm's scaling
    # (measured: max |post - ref| ~3e-4 of max |ref|, mean ~1.3e-4 of mean |ref|)
    assert np.abs(post - ref).max() <= 1e-3 * np.abs(ref).max()
    assert np.abs(post - ref).mean() <= 3e-4 * np.abs(ref).mean()
    norm = db.final_norm(alias)
    assert norm["type"] == "layer_norm" and norm["dim"] == post.shape[1]
    assert db.manifest(alias)["final_norm"]["sha256"] and db.validate(alias) == []


def test_cls_post_image_array_equals_the_post_cls_token(lake):
    db = open_lake(lake[0])
    run = "dinov2_s_reg4"
    cls = db.sql("SELECT image_id, slot FROM tokens WHERE run = ? AND kind = 'cls' "
                 "ORDER BY image_id", params=[run]).to_pydict()
    post = db.gather(run, np.asarray(cls["slot"]), tokens="post")
    stored = db.image_array(run, "cls_post", np.asarray(cls["image_id"]))
    np.testing.assert_allclose(post, stored, atol=1e-3 * np.abs(stored).max())


def test_pvt_stores_the_aligned_cell_and_records_the_receptive_field(lake):
    db = open_lake(lake[0])
    lay = db.manifest("pvt_b0")["token_layout"]
    assert lay["pixel_offset"] == 0 and lay["rf_offset"] == -16 and lay["cell"] == 32


def test_run_without_final_norm_names_what_to_reextract(tmp_path):
    write_run(tmp_path, "old", **tiny_run(n_images=2))
    db = open_lake(tmp_path)
    assert db.gather("old", [0, 1]).dtype == np.float16  # pre tokens still read
    with pytest.raises(LakeError, match=r"no saved final-norm parameters.*tokenlake extract .*"
                                        r"--run old-v3.*--tokens pre"):
        db.gather("old", [0, 1], tokens="post")
    with pytest.raises(ValueError, match="tokens must be one of"):
        db.gather("old", [0], tokens="output")


def test_write_run_saves_and_checks_the_final_norm(tmp_path):
    kw = tiny_run(n_images=2)
    dim = kw["arrays"]["tokens"].shape[1]
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=dim).astype(np.float32), rng.normal(size=dim).astype(np.float32)
    norm = {"type": "layer_norm", "dim": dim, "eps": 1e-6, "weight": w, "bias": b}
    write_run(tmp_path / "lake", "x", **kw, final_norm=norm)
    db = open_lake(tmp_path / "lake")
    x = db.gather("x", [0, 1, 2]).astype(np.float64)
    expect = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-6) * w + b
    np.testing.assert_allclose(db.gather("x", [0, 1, 2], tokens="post"), expect, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(db.final_norm("x")["weight"], w)  # float32 saved exactly
    with pytest.raises(RunConfigMismatch, match="final-norm parameters"):
        write_run(tmp_path / "lake", "x", **kw, final_norm={**norm, "eps": 1e-5})
    # tampering is caught by validate
    f = tmp_path / "lake" / "runs" / "x" / "final_norm.json"
    d = json.loads(f.read_text())
    d["eps"] = 0.1
    f.write_text(json.dumps(d))
    assert any("final_norm.json changed" in p for p in open_lake(tmp_path / "lake").validate("x"))
    shutil.rmtree(tmp_path / "lake")
