"""The torchvision pixel-store decoder (run here on the CPU): PIL's pixels within a grey level or
two at the same geometry, PIL's rejections, a separate recipe that extraction must ask for."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tokenlake.cli.main import main
from tokenlake.extract import resolve_model
from tokenlake.extract._models import meta_backbone
from tokenlake.extract._pixelstore import build_pixel_store, find_pixel_store
from tokenlake.extract._preprocess import DataConfig, data_config
from tokenlake.extract._tvdecode import TorchvisionDecoder, pil_row, read_input
from tokenlake.store import PixelStore, open_lake

MODEL, PX = "dinov2_s_reg4", 56  # bicubic, crop_pct 1.0: a 112 px square image is halved
TOLERANCE = 2.0  # mean absolute difference from PIL per image, in grey levels


def _planted(path, *, side: int = 112, square: tuple[int, int, int] = (28, 56, 28)) -> None:
    """A dim, textured square image with one bright square at rows/cols [top, top+size) x [left, ...)."""
    top, left, size = square
    rng = np.random.default_rng(0)
    arr = rng.integers(20, 60, (side, side, 3), dtype=np.uint8)
    arr[top:top + size, left:left + size] = (250, 240, 230)
    Image.fromarray(arr).save(path, quality=95)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, image_helpers):
    """A flat folder mixing plain JPEGs with inputs torchvision must not take."""
    root = tmp_path_factory.mktemp("mixed")
    _planted(root / "a_planted.jpg")
    image_helpers.write_rgb_jpeg(root, "b_rgb.jpg", width=80, height=60, seed=1)
    image_helpers.write_gray_jpeg(root, "c_gray.jpg")
    Image.fromarray(image_helpers.smooth_rgb(width=50, height=40, seed=2)).save(root / "d_rgb.png")
    image_helpers.write_cmyk_jpeg(root, "e_cmyk.jpg")
    image_helpers.write_truncated_jpeg(root, "f_truncated.jpg")
    image_helpers.write_exif_rotated(root, "g_exif6.jpg")
    image_helpers.write_empty(root, "h_empty.jpg")
    image_helpers.write_text(root, "i_text.jpg")
    return root


EXPECTED_DECODER = {  # by file, in the subset's (sorted) order
    "a_planted.jpg": "torchvision", "b_rgb.jpg": "torchvision", "c_gray.jpg": "torchvision",
    "d_rgb.png": "pil", "e_cmyk.jpg": "pil", "f_truncated.jpg": None, "g_exif6.jpg": "pil",
    "h_empty.jpg": None, "i_text.jpg": None,
}


def _cfg():
    return data_config(meta_backbone(resolve_model(MODEL), PX), img_size=PX)


def _pixels(lake, *extra) -> int:
    return main(["pixels", "--lake", str(lake), "--subset", "mix", "--model", MODEL, "--img-size",
                 str(PX), "--shard-size", "3", "--quiet", *extra])


@pytest.fixture(scope="module")
def lake(tmp_path_factory, folder):
    """Both stores of the mixed subset: PIL's (2 processes) and torchvision's (on the CPU)."""
    path = tmp_path_factory.mktemp("lake")
    assert main(["subset", "--lake", str(path), "--name", "mix", "--data", str(folder)]) == 0
    assert _pixels(path, "--workers", "2") == 0
    assert _pixels(path, "--decoder", "torchvision", "--device", "cpu") == 0
    return path


def _stores(lake) -> tuple[PixelStore, PixelStore]:
    cfg = _cfg()
    return (find_pixel_store(str(lake), "mix", cfg, decoder="pil"),
            find_pixel_store(str(lake), "mix", cfg, decoder="torchvision"))


def test_torchvision_pixels_match_pil_within_two_grey_levels_at_the_same_place(folder):
    items = [read_input(str(p)) for p in sorted(folder.iterdir())]
    for cfg in (_cfg(),  # pure scaling
                DataConfig(48, "bilinear", 0.875, "center", (0.5,) * 3, (0.5,) * 3),  # + crop
                DataConfig(48, "bicubic", 0.9, "border", (0.5,) * 3, (0.5,) * 3)):  # + padding
        decoder = TorchvisionDecoder(cfg, device="cpu", batch_size=2)
        out = decoder(items)
        assert out.pixels.shape == (len(items), cfg.img_size, cfg.img_size, 3)
        for k, item in enumerate(items):
            pil, width, height, reason = pil_row(item, decoder.resize)
            assert (out.width[k], out.height[k], out.reason[k]) == (width, height, reason)
            if pil is not None:
                diff = np.abs(out.pixels[k].astype(np.int16) - pil).mean()
                assert diff < TOLERANCE, (k, cfg, diff)
                bright_tv = out.pixels[k].min(-1) > 150
                bright_pil = pil.min(-1) > 150
                assert (bright_tv ^ bright_pil).sum() <= 0.02 * bright_pil.size, (k, cfg)
    # the planted square (rows and cols 28..84 of 112 px, cols from 56) lands at half scale
    out = TorchvisionDecoder(_cfg(), device="cpu")(items[:1]).pixels[0]
    assert out.shape == (PX, PX, 3)
    assert out[16:26, 30:40].min() > 200  # inside, away from the resampled edge
    outside = np.ones((PX, PX), bool)
    outside[12:30, 26:44] = False
    assert out[outside].max() < 100


def test_rows_say_which_decoder_and_rejections_match_pil(lake):
    pil_store, tv_store = _stores(lake)
    assert pil_store is not None and tv_store is not None
    assert tv_store.name == pil_store.name + "-tv"
    assert tv_store.recipe()["decoder"] == "torchvision" and pil_store.recipe()["decoder"] == "pil"
    files = sorted(EXPECTED_DECODER)
    tv = [tv_store.meta(s) for s in range(tv_store.n_shards)]
    pil = [pil_store.meta(s) for s in range(pil_store.n_shards)]
    tv_decoder = [d for t in tv for d in t.column("decoder").to_pylist()]
    assert dict(zip(files, tv_decoder)) == EXPECTED_DECODER
    pil_decoder = [d for t in pil for d in t.column("decoder").to_pylist()]
    assert pil_decoder == ["pil" if d else None for d in tv_decoder]
    for position in range(len(files)):
        a, b = pil_store.read(position), tv_store.read(position)
        assert a[1:] == b[1:]  # width, height, reason
        if a[0] is not None:
            assert np.abs(a[0].astype(np.int16) - b[0]).mean() < TOLERANCE
    reasons = [tv_store.read(i)[3] for i in range(len(files))]
    assert sorted(r for r in reasons if r) == ["empty file", "not an image", "truncated"]
    assert tv_store.validate() == [] and pil_store.validate() == []


def test_torchvision_build_resumes_after_a_lost_shard(lake):
    _, store = _stores(lake)
    shards = store.dir / "shards"
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    times = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    (shards / "s00001.json").unlink()
    (shards / "s00001.npy").unlink()
    assert not store.is_complete()
    assert find_pixel_store(str(lake), "mix", _cfg(), decoder="torchvision") is None
    assert _pixels(lake, "--decoder", "torchvision", "--device", "cpu") == 0
    after = {p.name: p.read_bytes() for p in shards.iterdir()}
    assert after == before  # the same bytes again: a deterministic decode
    rewritten = {n for n, t in times.items() if (shards / n).stat().st_mtime_ns != t}
    assert rewritten == {"s00001.json", "s00001.npy", "s00001.parquet"}
    assert store.is_complete() and store.validate() == []


def test_find_never_mixes_decoders(tmp_path, folder):
    lake = str(tmp_path)
    assert main(["subset", "--lake", lake, "--name", "mix", "--data", str(folder)]) == 0
    cfg = _cfg()
    built = build_pixel_store(lake, "mix", cfg, shard_size=4, quiet=True, decoder="torchvision",
                              device="cpu", workers=2)
    assert find_pixel_store(lake, "mix", cfg, decoder="pil") is None
    assert find_pixel_store(lake, "mix", cfg, decoder="torchvision").name == built.name
    pil = build_pixel_store(lake, "mix", cfg, shard_size=4, quiet=True, workers=1)
    assert find_pixel_store(lake, "mix", cfg).name == pil.name != built.name
    assert find_pixel_store(lake, "mix", cfg, decoder="torchvision").name == built.name
    with pytest.raises(ValueError, match="pil, torchvision"):
        build_pixel_store(lake, "mix", cfg, decoder="nvjpeg")
    with pytest.raises(ValueError, match="pil, torchvision"):
        find_pixel_store(lake, "mix", cfg, decoder="PIL")


def test_datasets_holding_bytes_decode_the_same(tmp_path, folder):
    """Hub datasets give bytes, not paths: a dataset saved with embedded bytes stands in."""
    import datasets

    files = sorted(folder.iterdir())
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": None} for f in files]},
        features=datasets.Features({"image": datasets.Image(decode=False)}))
    ds.save_to_disk(tmp_path / "saved")
    lake = str(tmp_path / "lake")
    assert main(["subset", "--lake", lake, "--name", "mix", "--data", str(tmp_path / "saved")]) == 0
    cfg = _cfg()
    tv = build_pixel_store(lake, "mix", cfg, shard_size=4, quiet=True, decoder="torchvision",
                           device="cpu", workers=2)
    pil = build_pixel_store(lake, "mix", cfg, shard_size=4, quiet=True, workers=2)
    decoders = [d for s in range(tv.n_shards) for d in tv.meta(s).column("decoder").to_pylist()]
    assert decoders == [EXPECTED_DECODER[f.name] for f in files]
    for position in range(len(files)):
        a, b = pil.read(position), tv.read(position)
        assert a[1:] == b[1:]
        if a[0] is not None:
            assert np.abs(a[0].astype(np.int16) - b[0]).mean() < TOLERANCE


def test_stores_from_before_the_decoder_column_are_pil_stores(tmp_path, folder):
    lake = str(tmp_path)
    assert main(["subset", "--lake", lake, "--name", "mix", "--data", str(folder)]) == 0
    cfg = _cfg()
    store = build_pixel_store(lake, "mix", cfg, shard_size=4, quiet=True, workers=1)
    want = [store.read(i) for i in range(len(EXPECTED_DECODER))]
    recipe = json.loads((store.dir / "recipe.json").read_text())
    del recipe["decoder"]  # as written before decoders existed
    (store.dir / "recipe.json").write_text(json.dumps(recipe, sort_keys=True))
    for path in (store.dir / "shards").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["decoder"]), path)
        marker = json.loads(path.with_suffix(".json").read_text())  # its marker, as then written
        marker["files"][".parquet"] = {"bytes": path.stat().st_size,
                                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        path.with_suffix(".json").write_text(json.dumps(marker, sort_keys=True))
    old = find_pixel_store(lake, "mix", cfg)
    assert old is not None and old.name == store.name
    assert find_pixel_store(lake, "mix", cfg, decoder="torchvision") is None
    got = [old.read(i) for i in range(len(EXPECTED_DECODER))]
    for (a, *ra), (b, *rb) in zip(want, got):
        assert ra == rb and (a is None) == (b is None) and (a is None or np.array_equal(a, b))
    assert old.meta(0).column("decoder").to_pylist() == [
        None if r[3] else "pil" for r in want[:4]]
    build_pixel_store(lake, "mix", cfg, shard_size=4, quiet=True, workers=1)  # same recipe: no-op


def _extract(lake, run, *extra) -> int:
    return main(["extract", "--lake", str(lake), "--model", MODEL, "--subset", "mix",
                 "--weights", "random", "--img-size", str(PX), "--batch-size", "4",
                 "--shard-size", "5", "--decode-workers", "0", "--quiet", "--run", run, *extra])


def test_extraction_with_torchvision_needs_its_store(tmp_path, folder, capsys):
    assert main(["subset", "--lake", str(tmp_path), "--name", "mix", "--data", str(folder)]) == 0
    assert _pixels(tmp_path, "--workers", "1") == 0  # a PIL store does not stand in for it
    assert _extract(tmp_path, "tv", "--decoder", "torchvision") == 2
    err = capsys.readouterr().err
    assert "no complete torchvision pixel store" in err
    assert "tokenlake pixels" in err and "--decoder torchvision" in err
    assert not (tmp_path / "runs" / "tv").exists()


def test_extraction_reads_the_torchvision_store_and_records_it(lake):
    assert _extract(lake, "tv", "--decoder", "torchvision") == 0
    assert _extract(lake, "pil") == 0
    db = open_lake(lake)
    tv, pil = db.manifest("tv"), db.manifest("pil")
    assert tv["config"]["decoder"] == "torchvision" and "decoder" not in pil["config"]
    _, tv_store = _stores(lake)
    assert tv["pixel_source"] == f"pixel store {tv_store.name}"
    assert pil["pixel_source"] == f"pixel store {tv_store.name.removesuffix('-tv')}"
    # the run's patch pixels are the torchvision store's, cell by cell
    cells = db.sql("SELECT image_id, row, col, slot FROM tokens WHERE run = 'tv' AND kind = 'patch' "
                   "ORDER BY image_id, token")
    image, row, col, slot = (cells.column(c).to_numpy() for c in range(4))
    got = db.gather("tv", slot, pixels=True)[1]  # [n, 14, 14, 3]
    for k in np.unique(image):
        want = tv_store.read(int(k))[0]
        for i in np.flatnonzero(image == k):
            r, c = int(row[i]) * 14, int(col[i]) * 14
            np.testing.assert_array_equal(got[i], want[r:r + 14, c:c + 14])
    errors = db.sql("SELECT reason FROM errors WHERE run = 'tv' ORDER BY image_id")
    assert errors.column(0).to_pylist() == ["truncated", "empty file", "not an image"]
