"""Token policies, keep-if-outlier, local weight files, per-block norms and other inputs."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from tokenlake.cli.main import main
from tokenlake.extract._models import file_sha256
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
