"""Named input recipes (--preprocess) and compute precision (--precision): what Table 4 needs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from tokenlake.cli.main import main
from tokenlake.extract import resolve_model
from tokenlake.extract._models import meta_backbone
from tokenlake.extract._preprocess import Resizer, data_config
from tokenlake.store import open_lake


def test_dinov2_eval_is_dinov2s_official_transform(image_helpers):
    """facebookresearch/dinov2 make_classification_eval_transform: Resize(256, BICUBIC) then
    CenterCrop(224), written out with torchvision here."""
    model = meta_backbone(resolve_model("dinov2_s"), 224)
    official = transforms.Compose([transforms.Resize(256, interpolation=transforms.
                                                     InterpolationMode.BICUBIC),
                                   transforms.CenterCrop(224)])
    for w, h in ((500, 375), (333, 500), (224, 224)):
        img = Image.fromarray(image_helpers.smooth_rgb(width=w, height=h, seed=w))
        ours = Resizer(data_config(model, img_size=224, preprocess="dinov2-eval"))(img)
        np.testing.assert_array_equal(ours, np.asarray(official(img)))
        # timm's own DINOv2 recipe at 224 crops nothing: a different picture of the same image
        plain = Resizer(data_config(model, img_size=224))(img)
        assert w == h or not np.array_equal(plain, ours)
    cfg = data_config(model, img_size=224, preprocess="dinov2-eval")
    assert (cfg.mean, cfg.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="--preprocess must be one of"):
        data_config(model, img_size=224, preprocess="dinov3")


@pytest.fixture(scope="module")
def lake(tmp_path_factory, image_helpers):
    imgs = tmp_path_factory.mktemp("imgs")
    image_helpers.write_flat_folder(imgs, n=3)
    path = tmp_path_factory.mktemp("lake")
    assert main(["subset", "--lake", str(path), "--name", "s", "--data", str(imgs)]) == 0
    base = ["extract", "--lake", str(path), "--subset", "s", "--model", "dinov2_s",
            "--img-size", "56", "--weights", "random", "--decode-workers", "0", "--quiet"]
    assert main(base) == 0
    assert main([*base, "--preprocess", "dinov2-eval"]) == 0
    assert main([*base, "--precision", "bf16", "--run", "bf16"]) == 0
    return path


def test_recipe_and_precision_are_part_of_the_run(lake):
    db = open_lake(lake)
    plain, ev = db.manifest("dinov2_s-56-s-random"), db.manifest("dinov2_s-56-s-dinov2eval-random")
    assert "preprocess" not in plain["config"] and plain["preprocess"] == "model"
    assert ev["config"]["preprocess"] == ev["preprocess"] == "dinov2-eval"
    assert ev["data_config"]["crop_pct"] == 0.875 and plain["data_config"]["crop_pct"] == 1.0
    assert plain["native_img_size"] == 518 and plain["img_size"] == 56
    assert plain["config"]["compute_dtype"] == "float32"  # the CPU default
    assert db.manifest("bf16")["config"]["compute_dtype"] == "bfloat16"


def test_dinov2_eval_run_sees_other_pixels(lake):
    db = open_lake(lake)
    q = "SELECT norm FROM tokens WHERE run = ? ORDER BY image_id, token"
    a = db.sql(q, params=["dinov2_s-56-s-random"]).column(0).to_numpy()
    b = db.sql(q, params=["dinov2_s-56-s-dinov2eval-random"]).column(0).to_numpy()
    assert a.shape == b.shape and not np.allclose(a, b)


def test_bf16_blocks_change_the_numbers_a_little(lake):
    db = open_lake(lake)
    q = "SELECT norm FROM tokens WHERE run = ? ORDER BY image_id, token"
    a = db.sql(q, params=["dinov2_s-56-s-random"]).column(0).to_numpy()
    b = db.sql(q, params=["bf16"]).column(0).to_numpy()
    rel = np.abs(a - b) / a
    assert 0 < rel.max() < 0.05  # bf16 rounding (8 bits of mantissa), not another network


def test_resuming_with_another_precision_is_refused(lake, capsys):
    code = main(["extract", "--lake", str(lake), "--subset", "s", "--model", "dinov2_s",
                 "--img-size", "56", "--weights", "random", "--decode-workers", "0", "--quiet",
                 "--precision", "fp32", "--run", "bf16"])
    assert code == 2 and "compute_dtype" in capsys.readouterr().err
