"""The pixel store: decoded once, read by extraction, giving exactly the lake a decode gives."""

from __future__ import annotations

import numpy as np
import pytest

from tokenlake.cli.main import main
from tokenlake.store import PixelStore, open_lake


def _extract(lake, run) -> int:
    return main(["extract", "--lake", str(lake), "--model", "dinov2_s_reg4", "--subset", "tiny",
                 "--weights", "random", "--img-size", "56", "--batch-size", "4", "--shard-size",
                 "5", "--decode-workers", "0", "--quiet", "--run", run])


@pytest.fixture(scope="module")
def lake(tmp_path_factory, image_helpers):
    root = tmp_path_factory.mktemp("imgs")
    image_helpers.write_imagefolder(root, per_class=3)
    path = tmp_path_factory.mktemp("lake")
    assert main(["subset", "--lake", str(path), "--name", "tiny", "--data", str(root)]) == 0
    assert _extract(path, "decoded") == 0
    assert main(["pixels", "--lake", str(path), "--subset", "tiny", "--model", "dinov2_s_reg4",
                 "--img-size", "56", "--workers", "2", "--shard-size", "4", "--quiet"]) == 0
    assert _extract(path, "stored") == 0
    return path


def test_extraction_reads_the_store_and_writes_the_same_lake(lake):
    db = open_lake(lake)
    assert db.manifest("decoded")["pixel_source"].startswith("decoded")
    assert db.manifest("stored")["pixel_source"].startswith("pixel store tiny-56-")
    for table, key in (("images", "image_id"), ("tokens", "image_id, token"),
                       ("errors", "image_id")):
        q = "SELECT * EXCLUDE (run) FROM {t} WHERE run = '{r}' ORDER BY {k}"
        a = db.sql(q.format(t=table, r="decoded", k=key))
        b = db.sql(q.format(t=table, r="stored", k=key))
        assert a.equals(b), table
    slots = db.sql("SELECT slot FROM tokens WHERE run = 'decoded' ORDER BY image_id, token")
    s = slots.column(0).to_numpy()
    for run in ("decoded", "stored"):
        assert db.gather(run, s, pixels=True)[1].shape[0] == s.size
    np.testing.assert_array_equal(db.gather("decoded", s, pixels=True)[1],
                                  db.gather("stored", s, pixels=True)[1])
    np.testing.assert_array_equal(db.gather("decoded", s), db.gather("stored", s))


def test_store_keeps_every_input_and_validates(lake):
    (name,) = [p.name for p in (lake / "pixels").iterdir()]
    store = PixelStore(lake, name)
    assert store.is_complete() and store.validate() == []
    reasons = [store.read(i)[3] for i in range(store.recipe()["n"])]
    assert sorted(r for r in reasons if r) == ["empty file", "not an image", "truncated"]
    shard = next((store.dir / "shards").glob("*.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert store.validate() and "checksum" in store.validate()[0]


def test_default_shard_size_gives_every_worker_several_shards():
    from tokenlake.extract._pixelstore import default_shard_size

    assert default_shard_size(5000, workers=16, decoder="pil") == 79  # 64 shards, not 20
    assert default_shard_size(200_000, workers=16, decoder="pil") == 256
    assert default_shard_size(10, workers=2, decoder="pil") == 16
    assert default_shard_size(5000, workers=16, decoder="torchvision") == 256


def test_an_unfinished_store_keeps_its_shard_size(tmp_path, image_helpers):
    from tokenlake.extract._models import meta_backbone, resolve_model
    from tokenlake.extract._pixelstore import build_pixel_store
    from tokenlake.extract._preprocess import data_config

    image_helpers.write_imagefolder(tmp_path / "imgs", per_class=3)
    lake = tmp_path / "lake"
    assert main(["subset", "--lake", str(lake), "--name", "s", "--data", str(tmp_path / "imgs")]) == 0
    cfg = data_config(meta_backbone(resolve_model("pvt_b0"), 64), img_size=64)
    built = build_pixel_store(str(lake), "s", cfg, shard_size=4, workers=1, quiet=True)
    marker = sorted((built.dir / "shards").glob("*.json"))[1]
    marker.unlink()  # an interrupted build: shard 1 is missing
    resumed = build_pixel_store(str(lake), "s", cfg, workers=2, quiet=True)  # default would be 16
    assert resumed.recipe()["shard_size"] == 4 and resumed.is_complete()
