"""The torchvision pixel-store decoder (run here on the CPU): PIL's pixels within a grey level or
two at the same geometry, PIL's rejections, a separate recipe that extraction must ask for."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tokenlake.cli.main import main
from tokenlake.extract import resolve_model
from tokenlake.extract._models import meta_backbone
from tokenlake.extract._pixelstore import build_pixel_store, find_pixel_store
from tokenlake.extract._preprocess import DataConfig, data_config
from tokenlake.extract._tvdecode import (
    DEFAULT_MEMORY_BUDGET,
    TorchvisionDecoder,
    device_bytes,
    pil_row,
    read_input,
    sniff,
    split_by_memory,
)
from tokenlake.extract.testing import smooth_rgb
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


# -- colours nvjpeg gets wrong, device memory, and torchvision misbehaving ---------------------

def _rgb_stored_jpegs() -> dict[str, bytes]:
    """A JPEG stored as RGB with an Adobe marker (transform 0; what libjpeg writes for
    `keep_rgb`), and the same without that marker: component ids 'R', 'G', 'B', no JFIF."""
    buf = io.BytesIO()
    Image.fromarray(smooth_rgb(width=64, height=48, seed=3)).save(buf, "JPEG", quality=95,
                                                                  keep_rgb=True)
    adobe = buf.getvalue()
    at = adobe.index(b"\xff\xee")  # the APP14 segment: marker, 2-byte length, "Adobe" ...
    assert adobe[at + 4:at + 9] == b"Adobe"
    length = int.from_bytes(adobe[at + 2:at + 4], "big")
    return {"adobe": adobe, "rgb_ids": adobe[:at] + adobe[at + 2 + length:]}


def test_jpegs_stored_as_rgb_go_to_pil():
    jpegs = _rgb_stored_jpegs()
    ids = Image.open(io.BytesIO(jpegs["rgb_ids"]))
    assert "adobe" not in ids.info and "jfif" not in ids.info
    assert [layer[0] for layer in ids.layer] == [ord("R"), ord("G"), ord("B")]
    assert Image.open(io.BytesIO(jpegs["adobe"])).info["adobe_transform"] == 0
    plain = _plain_jpegs(1)[0]
    assert sniff(plain) is not None  # JFIF, YCbCr: torchvision's
    items = [jpegs["adobe"], jpegs["rgb_ids"], plain]
    assert [sniff(x) is None for x in items] == [True, True, False]
    decoder = TorchvisionDecoder(_cfg(), device="cpu")
    out = decoder(items)
    assert out.decoder == ["pil", "pil", "torchvision"]
    assert out.fallbacks == {"header": 2} and decoder.fallbacks == {"header": 2}
    for k in (0, 1):  # PIL reads both as RGB, as libjpeg does
        pil, *_ = pil_row(items[k], decoder.resize)
        np.testing.assert_array_equal(out.pixels[k], pil)
        assert pil.mean() > 20  # not a black image


_PLAIN: list = []


def _plain_jpegs(n: int, *, side: int = 64) -> list[bytes]:
    """`n` plain JPEGs (JFIF, YCbCr), each a little different."""
    while len(_PLAIN) < n:
        buf = io.BytesIO()
        arr = smooth_rgb(width=side + len(_PLAIN), height=side, seed=len(_PLAIN))
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        _PLAIN.append(buf.getvalue())
    return _PLAIN[:n]


def test_groups_stay_within_the_memory_budget():
    assert split_by_memory([4, 4, 4, 4, 4], 8) == [[0, 1], [2, 3], [4]]
    assert split_by_memory([10, 1, 1], 8) == [[0], [1, 2]]  # over budget alone: a group of one
    assert split_by_memory([], 8) == []
    photo = device_bytes(4000, 3000, size=224, crop_pct=0.875)  # a 12-MP photo
    assert 200e6 < photo < 300e6  # 256 of them: tens of GB, so a chunk is split
    assert len(split_by_memory([photo] * 256, DEFAULT_MEMORY_BUDGET)) >= 64
    upscaled = device_bytes(20, 10, size=224)  # the resize makes a small image big
    assert upscaled > 3 * 4 * 224 * 224
    with pytest.raises(ValueError, match="memory_budget"):
        TorchvisionDecoder(_cfg(), device="cpu", memory_budget=0)


def _fake_decode(monkeypatch, behave):
    """torchvision's decode_jpeg replaced: `behave(data, real)` with data a list of encoded
    tensors or one; records the batch sizes asked for."""
    import torchvision.io

    real, calls = torchvision.io.decode_jpeg, []

    def decode_jpeg(data, **kw):
        calls.append(len(data) if isinstance(data, list) else 1)
        return behave(data, lambda d: real(d, **kw))

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    return calls


def _oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_a_small_budget_decodes_in_small_groups(monkeypatch):
    items = _plain_jpegs(6)
    calls = _fake_decode(monkeypatch, lambda data, real: real(data))
    per_image = device_bytes(64, 64, size=PX)
    decoder = TorchvisionDecoder(_cfg(), device="cpu", memory_budget=int(2.5 * per_image) + 64)
    out = decoder(items)
    assert calls == [2, 2, 2]
    assert out.decoder == ["torchvision"] * 6 and not out.fallbacks
    whole = TorchvisionDecoder(_cfg(), device="cpu")(items)
    np.testing.assert_array_equal(out.pixels, whole.pixels)  # grouping changes no pixel


def test_out_of_memory_halves_the_group_then_falls_back_to_pil(monkeypatch):
    items = _plain_jpegs(5)
    expected = TorchvisionDecoder(_cfg(), device="cpu")(items)

    def only_pairs(data, real):  # a device that holds two images at a time
        if isinstance(data, list) and len(data) > 2:
            raise _oom()
        return real(data)

    calls = _fake_decode(monkeypatch, only_pairs)
    out = TorchvisionDecoder(_cfg(), device="cpu")(items)
    assert calls == [5, 2, 3, 1, 2]  # 5 -> 2 + 3, 3 -> 1 + 2
    assert out.decoder == ["torchvision"] * 5
    assert out.fallbacks == {"oom_split": 2}
    np.testing.assert_array_equal(out.pixels, expected.pixels)

    def never(data, real):
        raise RuntimeError("nvjpegDecodeBatched failed: out of memory")  # nvjpeg's own words

    _fake_decode(monkeypatch, never)
    decoder = TorchvisionDecoder(_cfg(), device="cpu")
    out = decoder(items)
    assert out.decoder == ["pil"] * 5 and out.reason == [None] * 5
    assert out.fallbacks == {"oom_split": 4, "oom_pil": 5}
    for k, item in enumerate(items):
        np.testing.assert_array_equal(out.pixels[k], pil_row(item, decoder.resize)[0])


def test_out_of_memory_while_resizing_is_retried_too(monkeypatch):
    items = _plain_jpegs(4)
    decoder = TorchvisionDecoder(_cfg(), device="cpu")
    resize = decoder.steps[0]

    def small_batches_only(x):  # [g, 3, H, W]
        if x.shape[0] > 1:
            raise _oom()
        return resize(x)

    decoder.steps[0] = small_batches_only
    same = [_plain_jpegs(1)[0]] * 4  # one shape: a single resize batch
    out = decoder(same)
    assert out.decoder == ["torchvision"] * 4 and out.fallbacks == {"oom_split": 3}
    with pytest.raises(RuntimeError, match="kernel bug"):  # other errors are not swallowed
        decoder.steps[0] = lambda x: (_ for _ in ()).throw(RuntimeError("kernel bug"))
        decoder(items)


def test_wrong_shapes_and_refusals_go_to_pil(monkeypatch):
    items = _plain_jpegs(3)

    def misbehave(data, real):
        batched = isinstance(data, list)
        if batched:
            raise RuntimeError("batched decode failed")  # one bad image spoils the batch
        image = real(data)
        if data.numel() == len(items[1]):
            raise RuntimeError("Unsupported JPEG")
        if data.numel() == len(items[2]):
            return image[:, :-1]  # [3, H-1, W]: not what the header says
        return image

    assert len({len(x) for x in items}) == 3
    _fake_decode(monkeypatch, misbehave)
    decoder = TorchvisionDecoder(_cfg(), device="cpu")
    out = decoder(items)
    assert out.decoder == ["torchvision", "pil", "pil"]
    assert out.fallbacks == {"refused": 1, "wrong_shape": 1}
    for k in (1, 2):
        np.testing.assert_array_equal(out.pixels[k], pil_row(items[k], decoder.resize)[0])


def test_the_stream_is_drained_before_a_cuda_decode(monkeypatch):
    """pytorch/vision#9606: nvjpeg writes before work queued on the caller's stream has run."""
    events = []

    class Stream:
        def synchronize(self):
            events.append("synchronize")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    _fake_decode(monkeypatch, lambda data, real: events.append("decode") or [
        torch.zeros(3, 2, 2, dtype=torch.uint8)] * len(data))
    decoder = TorchvisionDecoder(_cfg(), device="cpu")
    decoder.device = torch.device("cuda")  # what the decoder does on a GPU, minus the GPU
    decoder._decode(_plain_jpegs(2), Counter())
    assert events == ["synchronize", "decode"]


def test_the_build_logs_its_fallbacks(tmp_path, folder, monkeypatch):
    def no_batches(data, real):
        if isinstance(data, list) and len(data) > 1:
            raise _oom()
        return real(data)

    _fake_decode(monkeypatch, no_batches)
    lake, lines = str(tmp_path), []
    assert main(["subset", "--lake", lake, "--name", "mix", "--data", str(folder)]) == 0
    build_pixel_store(lake, "mix", _cfg(), shard_size=4, decoder="torchvision", device="cpu",
                      workers=2, log=lines.append, quiet=False)
    (line,) = lines
    assert "header 6" in line and "oom_split" in line and "decoder" in line
