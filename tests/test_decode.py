"""decode_image: every odd or broken input gives an RGB image or a stable rejection reason."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from tokenlake.extract import testing as images
from tokenlake.extract._decode import DecodedImage, ImageRejected, decode_image


@pytest.mark.parametrize("case", sorted(images.CASES))
def test_case_outcome(case, tmp_path):
    writer, expected = images.CASES[case]
    path = writer(tmp_path)
    if expected[0] == "ok":
        out = decode_image(path, max_pixels=images.CASES_MAX_PIXELS)
        assert isinstance(out, DecodedImage)
        assert out.image.mode == "RGB"
        assert (out.width, out.height) == expected[1:]
        assert out.image.size == expected[1:]
        assert np.asarray(out.image).shape == (expected[2], expected[1], 3)  # pixels really loaded
    else:
        with pytest.raises(ImageRejected) as exc:
            decode_image(path, max_pixels=images.CASES_MAX_PIXELS)
        assert exc.value.reason.startswith(expected[1]), exc.value.reason


@pytest.mark.parametrize("case", ["rgb_jpeg", "truncated_jpeg", "empty", "text", "cmyk_jpeg"])
def test_bytes_and_path_agree(case, tmp_path):
    path = images.CASES[case][0](tmp_path)

    def run(x):
        try:
            return np.asarray(decode_image(x).image)
        except ImageRejected as e:
            return e.reason

    a, b = run(path), run(path.read_bytes())
    if isinstance(a, str):
        assert a == b
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("writer", ["write_gray16", "write_gray16_as_I"])
def test_sixteen_bit_scaled_not_clipped(writer, tmp_path):
    path = getattr(images, writer)(tmp_path)
    src_mode = Image.open(path).mode
    out = decode_image(path)
    assert out.mode == src_mode and src_mode in {"I;16", "I"}
    arr = np.asarray(out.image)
    expected = np.repeat(images.GRAY16_EXPECTED, 3, axis=0)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], expected)


def test_float_scaled_from_unit_range(tmp_path):
    out = np.asarray(decode_image(images.write_float(tmp_path)).image)[..., 0].ravel()
    np.testing.assert_array_equal(out, np.rint(np.linspace(0, 1, 40) * 255).astype(np.uint8))


def test_cmyk_matches_pillow_and_is_close_to_source(tmp_path):
    path = images.write_cmyk_jpeg(tmp_path)
    out = decode_image(path)
    assert out.mode == "CMYK"
    ours = np.asarray(out.image).astype(int)
    pil = np.asarray(Image.open(path).convert("RGB")).astype(int)
    np.testing.assert_array_equal(ours, pil)
    # Pillow's naive CMYK round trip is near-lossless apart from JPEG error: not inverted, not garbage
    src = images.smooth_rgb(width=48, height=32, seed=7).astype(int)
    assert np.abs(ours - src).mean() < 8


def test_gray_and_bilevel_replicated_to_three_channels(tmp_path):
    out = np.asarray(decode_image(images.write_gray(tmp_path)).image)
    np.testing.assert_array_equal(
        out[..., 0], images.smooth_rgb(width=40, height=30, seed=4)[..., 0]
    )
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    bits = np.asarray(decode_image(images.write_bilevel(tmp_path)).image)
    assert set(np.unique(bits)) <= {0, 255}


def test_rgba_alpha_dropped_not_composited(tmp_path):
    # the file is fully transparent; compositing on black/white would destroy the colours
    out = np.asarray(decode_image(images.write_rgba(tmp_path)).image)
    np.testing.assert_array_equal(out, images.smooth_rgb(width=25, height=35, seed=9))


@pytest.mark.parametrize("writer", ["write_palette", "write_palette_transparent"])
def test_palette_like_timm(writer, tmp_path):
    path = getattr(images, writer)(tmp_path)
    out = decode_image(path)
    assert out.mode == "P"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "convert to RGBA" hint for transparent palettes
        pil = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(out.image), pil)


def test_exif_orientation_applied(tmp_path):
    out = decode_image(images.write_exif_rotated(tmp_path))
    arr = np.asarray(out.image).astype(int)
    assert (out.width, out.height) == (20, 60)
    # the red band stored at the left edge is at the top once rotated for display
    assert arr[:8, :, 0].mean() > 200 and arr[:8, :, 1].mean() < 50
    assert arr[20:, :, 0].mean() < 50


def test_animated_gif_first_frame(tmp_path):
    arr = np.asarray(decode_image(images.write_animated_gif(tmp_path)).image)
    assert tuple(arr[0, 0]) == (255, 0, 0)


def test_one_pixel_value(tmp_path):
    arr = np.asarray(decode_image(images.write_1x1(tmp_path)).image)
    assert arr.shape == (1, 1, 3) and tuple(arr[0, 0]) == (10, 200, 30)


def test_bomb_rejected_before_pixels_are_decoded(tmp_path, monkeypatch):
    path = images.write_bomb_small(tmp_path)

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageRejected) as exc:
        decode_image(path, max_pixels=1_000_000)
    assert exc.value.reason == "decompression bomb (9000000 pixels > 1000000)"


def test_bomb_limit_is_a_parameter(tmp_path):
    path = images.write_bomb_small(tmp_path)  # 3000 x 3000, 9 M pixels
    assert decode_image(path, max_pixels=9_000_000).width == 3000


def test_truncated_not_padded_even_if_tail_missing_only(tmp_path):
    data = images._jpeg_bytes(images.smooth_rgb(width=128, height=96, seed=2))
    for cut in (len(data) - 50, len(data) * 3 // 4):
        with pytest.raises(ImageRejected) as exc:
            decode_image(data[:cut])
        assert exc.value.reason == "truncated"


def test_load_truncated_images_flag_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(images.write_truncated_jpeg(tmp_path))


def test_missing_and_directory_inputs_rejected(tmp_path):
    with pytest.raises(ImageRejected) as exc:
        decode_image(tmp_path / "nope.jpg")
    assert exc.value.reason == "file not found"
    with pytest.raises(ImageRejected) as exc:
        decode_image(tmp_path)
    assert exc.value.reason == "a directory, not an image file"
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "never-was.jpg")
    with pytest.raises(ImageRejected) as exc:
        decode_image(tmp_path / "gone.jpg")
    assert exc.value.reason == "dangling symlink"
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageRejected) as exc:  # never opened: a FIFO would block the reader
        decode_image(tmp_path / "pipe.jpg")
    assert exc.value.reason == "not a regular file (FIFO)"
    with pytest.raises(ImageRejected) as exc:
        decode_image(b"")
    assert exc.value.reason == "empty file"


def test_real_imagenet_sample_all_decode(imagenet_sample):
    files = sorted(p for p in imagenet_sample.iterdir() if p.suffix.lower() in {".jpeg", ".jpg"})
    assert len(files) == 500
    modes = {}
    for p in files:
        out = decode_image(p)
        assert out.image.mode == "RGB" and out.image.size == (out.width, out.height)
        modes[out.mode] = modes.get(out.mode, 0) + 1
        if out.mode == "L":
            arr = np.asarray(out.image)
            assert (arr[..., 0] == arr[..., 2]).all()
    assert set(modes) <= {"RGB", "L", "CMYK"}, modes
    assert modes.get("L", 0) > 0, "the sample holds grayscale photos; the conversion path must run"
