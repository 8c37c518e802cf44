"""Token policies, keep-if-outlier, local weight files, per-block norms and other inputs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tokenlake.cli.main import main
from tokenlake.extract import _plan
from tokenlake.extract._models import file_sha256
from tokenlake.extract._neuronstats import (
    PINNED_SETS,
    PINNED_SHARE,
    check_pinned_memory,
    mlp_bytes_per_image,
)
from tokenlake.extract._plan import ExtractRequest, numerics, plan
from tokenlake.extract._preprocess import DataConfig, normalise
from tokenlake.store import open_lake

REF = "dinov2_s_reg4-56-tiny-random"
COMMON = ["--weights", "random", "--img-size", "56", "--batch-size", "4", "--shard-size", "4",
          "--decode-workers", "0", "--quiet"]


def _extract(lake, *extra, model="dinov2_s_reg4", subset="tiny") -> int:
    return main(["extract", "--lake", str(lake), "--model", model, "--subset", subset, *COMMON,
                 *extra])


@pytest.fixture(scope="module")
def lake(tmp_path_factory, image_helpers):
    root = tmp_path_factory.mktemp("imgs")
    image_helpers.write_imagefolder(root, per_class=5)
    path = tmp_path_factory.mktemp("lake")
    assert main(["subset", "--lake", str(path), "--name", "tiny", "--data", str(root)]) == 0
    assert _extract(path) == 0
    return path


def _ref_tokens(db):
    return db.sql(f"SELECT t.image_id, t.token, t.kind, t.norm, t.slot, th.threshold FROM tokens t, "
                  f"thresholds th WHERE t.run = '{REF}' AND th.run = '{REF}' "
                  "ORDER BY image_id, token").to_pandas()


def test_sample_policy_keeps_prefix_outliers_and_k_normals(lake):
    assert _extract(lake, "--policy", "sample", "--outlier-ref", REF, "--normals-per-image", "3",
                    "--run", "sampled") == 0
    db = open_lake(lake)
    ref = _ref_tokens(db)
    got = db.sql("SELECT image_id, token, norm, slot FROM tokens WHERE run = 'sampled' "
                 "ORDER BY image_id, token").to_pandas()
    np.testing.assert_allclose(got.norm, ref.norm, rtol=1e-5)  # norms kept for every token
    threshold = ref.threshold.iloc[0]
    assert db.manifest("sampled")["threshold"] == pytest.approx(threshold)
    for image_id, rows in ref.groupby("image_id"):
        stored = set(got[(got.image_id == image_id) & got.slot.notna()].token)
        prefix = set(rows[rows.kind != "patch"].token)
        outliers = set(rows[(rows.kind == "patch") & (rows.norm > threshold)].token)
        assert prefix | outliers <= stored
        assert len(stored - prefix - outliers) == 3
    # the stored embeddings are the reference run's embeddings of the same tokens
    both = got[got.slot.notna()].merge(ref, on=["image_id", "token"], suffixes=("", "_ref"))
    np.testing.assert_allclose(db.gather("sampled", both.slot.astype(np.int64)).astype(np.float32),
                               db.gather(REF, both.slot_ref.astype(np.int64)).astype(np.float32),
                               rtol=1e-3, atol=1e-3)


def test_summary_policy_stores_no_token_embeddings(lake):
    assert _extract(lake, "--policy", "summary", "--run", "summary") == 0
    db = open_lake(lake)
    row = db.sql("SELECT count(*) AS n, count(slot) AS stored FROM tokens "
                 "WHERE run = 'summary'").to_pylist()[0]
    assert row["n"] > 0 and row["stored"] == 0
    ids = db.sql("SELECT image_id FROM images WHERE run = 'summary' ORDER BY 1").column(0).to_numpy()
    np.testing.assert_allclose(db.image_array("summary", "cls_post", ids),
                               db.image_array(REF, "cls_post", ids), rtol=1e-5)


def test_keep_if_outlier_stops_at_n_kept_images_and_counts_rejects(lake):
    db = open_lake(lake)
    ref = _ref_tokens(db)
    has = (ref[ref.kind == "patch"].assign(o=lambda t: t.norm > t.threshold)
           .groupby("image_id").o.any())
    want = list(has[has].index[:3])
    rejected = int((~has[has.index < want[-1]]).sum())
    assert _extract(lake, "--keep-if-outlier", "--n", "3", "--outlier-ref", REF, "--policy",
                    "sample", "--run", "kept") == 0
    got = db.sql("SELECT image_id FROM images WHERE run = 'kept' ORDER BY 1").column(0).to_pylist()
    assert got == want
    man = db.manifest("kept")
    assert man["n_rejected"] == rejected and man["n_images"] == 3
    assert db.validate("kept") == []


def test_local_weights_file_is_loaded_and_hashed(lake, tmp_path):
    torch.manual_seed(7)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56).eval()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    assert main(["extract", "--lake", str(lake), "--model", "dinov2_s_reg4", "--subset", "tiny",
                 "--weights", str(path), "--img-size", "56", "--decode-workers", "0", "--quiet",
                 "--run", "fromfile"]) == 0
    db = open_lake(lake)
    man = db.manifest("fromfile")
    assert man["weights_sha256"] == file_sha256(path) and man["random_weights"] is False
    tok = db.sql("SELECT slot, norm FROM tokens WHERE run = 'fromfile' AND image_id = "
                 "(SELECT min(image_id) FROM images WHERE run = 'fromfile') ORDER BY token").to_pandas()
    _, cells = db.gather("fromfile", tok.slot.to_numpy(), pixels=True)
    pixels = cells[5:].reshape(4, 4, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(1, 56, 56, 3)
    cfg = DataConfig(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in man["data_config"].items()})
    with torch.no_grad():
        pre = model.forward_intermediates(normalise(torch.from_numpy(pixels), cfg), indices=[11],
                                          norm=False, intermediates_only=True,
                                          return_prefix_tokens=True)[0]
    norms = torch.cat([pre[1], pre[0].flatten(2).transpose(1, 2)], 1)[0].norm(dim=-1).numpy()
    np.testing.assert_allclose(tok.norm.to_numpy(), norms, rtol=1e-4)


def test_blocks_all_records_every_block_with_its_qkv(lake):
    assert _extract(lake, "--blocks", "all", "--run", "blocks") == 0
    db = open_lake(lake)
    stats = db.sql("SELECT count(*) AS n, count(DISTINCT block) AS blocks, count(q_norm) AS q "
                   "FROM blocks WHERE run = 'blocks'").to_pylist()[0]
    n_tok = db.sql("SELECT count(*) FROM tokens WHERE run = 'blocks'").column(0)[0].as_py()
    assert stats == {"n": 12 * n_tok, "blocks": 12, "q": 12 * n_tok}  # q/k/v on every block
    diff = db.sql("SELECT max(abs(b.norm - t.norm)) AS d FROM blocks b JOIN tokens t USING "
                  "(run, image_id, token) WHERE run = 'blocks' AND b.block = 11").column(0)[0]
    assert diff.as_py() < 1e-4


def test_data_saved_to_disk_with_limit(tmp_path, image_helpers):
    import datasets

    files = [tmp_path / f"{i}.png" for i in range(5)]
    for i, f in enumerate(files):
        from PIL import Image

        Image.fromarray(image_helpers.smooth_rgb(width=40 + i, height=30, seed=i)).save(f)
    ds = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "label": [0, 1, 0, 1, 1]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=["a", "b"])}))
    ds.save_to_disk(tmp_path / "saved")
    lake = tmp_path / "lake"
    assert main(["extract", "--lake", str(lake), "--model", "pvt_b0", "--data",
                 str(tmp_path / "saved"), "--limit", "3", "--weights", "random", "--img-size", "64",
                 "--decode-workers", "0", "--quiet"]) == 0
    db = open_lake(lake)
    rows = db.sql("SELECT label, width FROM images ORDER BY image_id").to_pylist()
    assert rows == [{"label": 0, "width": 40}, {"label": 1, "width": 41}, {"label": 0, "width": 42}]


def test_real_photographs(tmp_path, imagenet_sample):
    lake = tmp_path / "lake"
    assert main(["extract", "--lake", str(lake), "--model", "pvt_b0", "--data", str(imagenet_sample),
                 "--limit", "8", "--weights", "random", "--decode-workers", "1", "--quiet"]) == 0
    db = open_lake(lake)
    assert db.sql("SELECT count(*) FROM images").column(0)[0].as_py() == 8
    assert db.sql("SELECT count(*) FROM tokens").column(0)[0].as_py() == 8 * 49
    assert db.validate() == []


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["subset", "--lake", str(tmp_path / "l"), "--name", "x", "--data",
                 str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# -- numerics: what the run's config says, and thresholds from runs that rounded otherwise ------


def _lake_copy(lake, tmp_path) -> Path:
    """A copy of the module's lake whose runs a test may edit."""
    return Path(shutil.copytree(lake, tmp_path / "lake"))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_config_records_device_type_and_numerics(lake):
    config = open_lake(lake).manifest(REF)["config"]
    assert (config["compute_dtype"], config["device_type"]) == ("float32", "cpu")
    assert config["numerics"].startswith("fp32 blocks, fp32 reductions: blocks in float32 with TF32 off; ")
    assert "autocast and TF32 off" in config["numerics"]
    assert numerics("bfloat16").startswith("bf16 blocks, fp32 reductions: blocks in "
                                                   "bfloat16 (torch.autocast); ")


def test_threshold_from_another_compute_dtype_is_refused(lake, capsys):
    assert _extract(lake, "--policy", "sample", "--outlier-ref", REF, "--precision", "bf16",
                    "--run", "bf16-sampled") == 2
    err = capsys.readouterr().err
    assert f"--outlier-ref {REF} was extracted with float32 blocks on cpu" in err
    assert "this run computes bfloat16 blocks on cpu" in err
    assert "--precision bf16 --device cpu" in err  # what to extract the reference with
    assert not (lake / "runs" / "bf16-sampled").exists()


@pytest.mark.parametrize("recorded", ["config", "manifest device only", "nothing"])
def test_threshold_from_another_device_type_is_refused(lake, tmp_path, capsys, recorded):
    """The reference's device type comes from its config (device_type), else from the manifest's
    `device` (runs begun before tokenlake recorded device_type); recording neither is refused."""
    copy = _lake_copy(lake, tmp_path)

    def as_if_on_a_gpu(man: dict) -> None:
        if recorded == "config":
            man["config"]["device_type"] = "cuda"
            return
        del man["config"]["device_type"]
        if recorded == "nothing":
            del man["device"]
        else:
            man["device"] = "cuda:0"

    _edit_json(copy / "runs" / REF / "manifest.json", as_if_on_a_gpu)
    for flags in (["--policy", "sample"], ["--keep-if-outlier", "--n", "2", "--policy", "sample"]):
        assert _extract(copy, *flags, "--outlier-ref", REF, "--run", "s") == 2
        err = capsys.readouterr().err
        if recorded == "nothing":
            assert f"--outlier-ref {REF}: that run records no device" in err
        else:
            assert ("extracted with float32 blocks on cuda; this run computes float32 blocks on "
                    "cpu") in err
        assert "--device cpu" in err


def test_run_begun_before_numerics_were_recorded_is_still_complete(lake, tmp_path, capsys):
    """A run whose config lacks device_type/numerics (an older tokenlake) is found complete, not
    refused as "made with a different config"; its config is left as it was."""
    copy = _lake_copy(lake, tmp_path)

    def strip(config: dict) -> None:
        for key in ("device_type", "numerics"):
            del config[key]

    _edit_json(copy / "runs" / REF / "config.json", strip)
    _edit_json(copy / "runs" / REF / "manifest.json", lambda man: strip(man["config"]))
    manifest = (copy / "runs" / REF / "manifest.json").read_text()
    capsys.readouterr()
    assert main(["extract", "--lake", str(copy), "--model", "dinov2_s_reg4", "--subset", "tiny",
                 *COMMON[:-1]]) == 0
    out = capsys.readouterr()
    assert "already complete" in out.out + out.err
    assert (copy / "runs" / REF / "manifest.json").read_text() == manifest
    assert "numerics" not in json.loads((copy / "runs" / REF / "config.json").read_text())


# -- --record-mlp: the pinned host memory its arrays need, checked when the run is planned -------

def _giant() -> dict:
    """DINOv2-G at 518 px as timm builds it (weightless): blocks, MLP neurons (fc2's inputs: the
    SwiGLU's gated half), patches."""
    from tokenlake.extract._models import meta_backbone, resolve_model

    model = meta_backbone(resolve_model("dinov2_g"), 518)
    return {"depth": len(model.blocks), "hidden": model.blocks[0].mlp.fc2.in_features,
            "n_patches": model.patch_embed.num_patches}


def test_record_mlp_memory_for_dinov2_g():
    giant = _giant()
    assert giant == {"depth": 40, "hidden": 4096, "n_patches": 1369}
    # mlp_abs_outlier [L, L, H], mlp_n_outlier [L], four [L, H] arrays: 4 bytes each
    stats = 40 * 40 * 4096 * 4 + 40 * 4 + 4 * 40 * 4096 * 4
    acts = 40 * 4096 * 1369 * 2  # mlp_acts [L, H, Np] float16
    assert mlp_bytes_per_image(**giant, acts=False) == stats
    assert mlp_bytes_per_image(**giant, acts=True) == stats + acts
    assert 14e9 < 32 * acts < 15e9  # the "~14 GB of pinned memory per set at batch 32"
    host = 128 * 2**30  # a quarter may be pinned: 32 GiB for two batches in flight
    fits = int(host * PINNED_SHARE) // (PINNED_SETS * (stats + acts))
    assert fits == 35
    check_pinned_memory(**giant, acts=True, batch_size=fits, host_bytes=host)
    with pytest.raises(ValueError, match=r"--record-mlp --mlp-acts at --batch-size 64 needs "
                                         r"56\.9 GiB of pinned host memory .* rerun with "
                                         r"--batch-size 35$"):
        check_pinned_memory(**giant, acts=True, batch_size=64, host_bytes=host)
    with pytest.raises(ValueError, match="--batch-size 36 needs"):
        check_pinned_memory(**giant, acts=True, batch_size=fits + 1, host_bytes=host)
    check_pinned_memory(**giant, acts=False, batch_size=32, host_bytes=host)  # 1.7 GiB
    with pytest.raises(ValueError, match="even at --batch-size 1: drop --mlp-acts"):
        check_pinned_memory(**giant, acts=True, batch_size=1, host_bytes=2**30)


def test_record_mlp_batch_too_large_for_pinned_memory_is_refused_when_planned(lake, tmp_path,
                                                                               monkeypatch):
    """On a CUDA device the plan refuses, with the batch size that fits, before a model exists;
    local workers share the machine's memory."""
    copy = _lake_copy(lake, tmp_path)
    _edit_json(copy / "runs" / REF / "manifest.json",
               lambda man: man["config"].update(device_type="cuda"))  # a GPU run's threshold
    monkeypatch.setattr(_plan, "host_memory_bytes", lambda: 16 * 2**20)  # 4 MiB may be pinned
    request = ExtractRequest(lake=str(copy), model="dinov2_s_reg4", subset="tiny",
                             weights="random", img_size=56, record_mlp=True, outlier_ref=REF,
                             device="cuda", precision="fp32", batch_size=4)
    per_image = mlp_bytes_per_image(12, 1536, 16, acts=False)  # ViT-S/14 at 56 px: 1.2 MB
    assert 2 * per_image < 4 * 2**20 < 2 * 2 * per_image
    with pytest.raises(ValueError, match="--record-mlp at --batch-size 4 needs .* rerun with "
                                         "--batch-size 1$"):
        plan(request)
    assert plan(replace(request, batch_size=1)).config["device_type"] == "cuda"
    with pytest.raises(ValueError, match=r"\(2 processes x 2 batches in flight x 1 images .* "
                                         "even at --batch-size 1: use fewer --workers"):
        plan(replace(request, batch_size=1, workers=2))
    # on the CPU the arrays are copied to pageable memory: nothing pinned, nothing checked
    _edit_json(copy / "runs" / REF / "manifest.json",
               lambda man: man["config"].update(device_type="cpu"))
    assert plan(replace(request, device="cpu")).config["record_mlp"]
