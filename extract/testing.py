"""Image files for tests and benchmarks: good, odd and broken ones, and small image folders.

Every writer takes a directory and a file name and returns the path it wrote. `CASES` maps a
case name to (writer, expected outcome) so tests can walk all of them; an outcome is either
`("ok", width, height)` or `("rejected", reason_prefix)`.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

Outcome = tuple  # ("ok", w, h) | ("rejected", reason_prefix)


def smooth_rgb(*, width: int, height: int, seed: int) -> np.ndarray:
    """Random smooth colour blobs plus a flat band: texture for real-ish JPEGs and low-info patches."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.zeros((height, width, 3), np.float32)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(0.15, 0.4) * max(width, height)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        out += blob[..., None] * rng.uniform(0, 255, size=3)
    out = np.clip(out, 0, 255)
    out[: max(1, height // 4)] = rng.uniform(0, 255, size=3)  # flat region, like sky
    return out.astype(np.uint8)


def write_blob_folder(root: Path, *, n: int, side: int, blob: int, seed: int = 0) -> Path:
    """`n` noisy side x side PNGs with three flat blob x blob squares each, in two class folders
    (b, a, b, ...): patches that differ from each other, for extraction tests."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        base = rng.integers(60, 200, (1, 1, 3)) + rng.normal(0, 25, (side, side, 3))
        for _ in range(3):
            r, c = rng.integers(0, side - blob, 2)
            base[r:r + blob, c:c + blob] = rng.integers(0, 256, 3)
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def write_rgb_jpeg(
    d: Path, name: str = "rgb.jpg", *, width: int = 64, height: int = 48, seed: int = 0
) -> Path:
    p = Path(d) / name
    p.write_bytes(_jpeg_bytes(smooth_rgb(width=width, height=height, seed=seed)))
    return p


def write_empty(d: Path, name: str = "empty.jpg") -> Path:
    p = Path(d) / name
    p.write_bytes(b"")
    return p


def write_truncated_jpeg(d: Path, name: str = "truncated.jpg") -> Path:
    # cut a real encoded JPEG in half: the header is intact, the scan data stops mid-way
    data = _jpeg_bytes(smooth_rgb(width=128, height=96, seed=1))
    p = Path(d) / name
    p.write_bytes(data[: len(data) // 2])
    return p


def write_text(d: Path, name: str = "notes.jpg") -> Path:
    p = Path(d) / name
    p.write_text("this is not an image\n" * 10)
    return p


def write_random_bytes(d: Path, name: str = "noise.png") -> Path:
    p = Path(d) / name
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


def write_gray(d: Path, name: str = "gray.png") -> Path:
    p = Path(d) / name
    Image.fromarray(smooth_rgb(width=40, height=30, seed=4)[..., 0]).save(p)
    return p


def write_gray_jpeg(d: Path, name: str = "gray.jpg") -> Path:
    p = Path(d) / name
    Image.fromarray(smooth_rgb(width=40, height=30, seed=4)[..., 0]).save(p, quality=90)
    return p


def write_la(d: Path, name: str = "la.png") -> Path:
    p = Path(d) / name
    arr = np.stack(
        [smooth_rgb(width=33, height=21, seed=5)[..., 0], np.full((21, 33), 128, np.uint8)], -1
    )
    Image.fromarray(arr, mode="LA").save(p)
    return p


def write_bilevel(d: Path, name: str = "bilevel.png") -> Path:
    p = Path(d) / name
    Image.fromarray(smooth_rgb(width=50, height=20, seed=6)[..., 1] > 100).convert("1").save(p)
    return p


def write_cmyk_jpeg(d: Path, name: str = "cmyk.jpg") -> Path:
    p = Path(d) / name
    Image.fromarray(smooth_rgb(width=48, height=32, seed=7)).convert("CMYK").save(p, quality=95)
    return p


def write_palette(d: Path, name: str = "palette.png", *, transparency: bool = False) -> Path:
    p = Path(d) / name
    im = Image.fromarray(smooth_rgb(width=30, height=20, seed=8)).convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    if transparency:
        im.save(p, transparency=0)
    else:
        im.save(p)
    return p


def write_palette_transparent(d: Path, name: str = "palette_t.png") -> Path:
    return write_palette(d, name, transparency=True)


def write_rgba(d: Path, name: str = "rgba.png") -> Path:
    p = Path(d) / name
    rgb = smooth_rgb(width=25, height=35, seed=9)
    alpha = np.zeros((35, 25, 1), np.uint8)  # fully transparent: colours must survive anyway
    Image.fromarray(np.concatenate([rgb, alpha], -1), mode="RGBA").save(p)
    return p


# values chosen so the 16->8 bit scaling is checkable: 0, 257 (=1 in 8 bit), 32768, 65535
GRAY16_VALUES = np.array([[0, 257, 32768, 65535]], np.uint16)
GRAY16_EXPECTED = np.array([[0, 1, 128, 255]], np.uint8)


def write_gray16(d: Path, name: str = "gray16.png") -> Path:
    p = Path(d) / name
    Image.fromarray(np.repeat(GRAY16_VALUES, 3, axis=0)).save(p)  # uint16 array -> "I;16"
    return p


def write_gray16_as_I(d: Path, name: str = "gray16_I.tif") -> Path:
    # a mode "I" (int32) image holding 16-bit values, as TIFF/older Pillow PNG decoders give
    p = Path(d) / name
    Image.fromarray(np.repeat(GRAY16_VALUES, 3, axis=0).astype(np.int32), mode="I").save(p)
    return p


def write_float(d: Path, name: str = "float.tif") -> Path:
    p = Path(d) / name
    Image.fromarray(np.linspace(0.0, 1.0, 40, dtype=np.float32).reshape(5, 8), mode="F").save(p)
    return p


def write_1x1(d: Path, name: str = "one.png") -> Path:
    p = Path(d) / name
    Image.new("RGB", (1, 1), (10, 200, 30)).save(p)
    return p


def write_bomb(d: Path, name: str = "bomb.png", *, side: int = 20_000) -> Path:
    # A 1-bit all-black PNG written row by row: side x side pixels in a few KB on disk, without
    # ever holding the pixels in memory here.
    p = Path(d) / name
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return p


def write_bomb_small(d: Path, name: str = "bomb_small.png") -> Path:
    return write_bomb(d, name, side=3_000)


def write_exif_rotated(d: Path, name: str = "exif6.jpg") -> Path:
    # stored 60 wide x 20 high, orientation 6 (rotate 90 CW to display): shown 20 wide x 60 high
    p = Path(d) / name
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)  # red band at the stored left edge -> top after rotation
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(p, exif=exif, quality=95)
    return p


def write_animated_gif(d: Path, name: str = "anim.gif") -> Path:
    p = Path(d) / name
    frames = [Image.new("RGB", (16, 12), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return p


CASES: dict[str, tuple[Callable[[Path], Path], Outcome]] = {
    "rgb_jpeg": (write_rgb_jpeg, ("ok", 64, 48)),
    "empty": (write_empty, ("rejected", "empty file")),
    "truncated_jpeg": (write_truncated_jpeg, ("rejected", "truncated")),
    "text": (write_text, ("rejected", "not an image")),
    "random_bytes": (write_random_bytes, ("rejected", "not an image")),
    "gray": (write_gray, ("ok", 40, 30)),
    "gray_jpeg": (write_gray_jpeg, ("ok", 40, 30)),
    "la": (write_la, ("ok", 33, 21)),
    "bilevel": (write_bilevel, ("ok", 50, 20)),
    "cmyk_jpeg": (write_cmyk_jpeg, ("ok", 48, 32)),
    "palette": (write_palette, ("ok", 30, 20)),
    "palette_transparent": (write_palette_transparent, ("ok", 30, 20)),
    "rgba": (write_rgba, ("ok", 25, 35)),
    "gray16": (write_gray16, ("ok", 4, 3)),
    "gray16_I": (write_gray16_as_I, ("ok", 4, 3)),
    "float": (write_float, ("ok", 8, 5)),
    "one_pixel": (write_1x1, ("ok", 1, 1)),
    "exif_rotated": (write_exif_rotated, ("ok", 20, 60)),
    "animated_gif": (write_animated_gif, ("ok", 16, 12)),
    # above Pillow's own hard limit: Pillow refuses it in Image.open
    "bomb": (write_bomb, ("rejected", "decompression bomb")),
    # far below Pillow's limits but above CASES_MAX_PIXELS: only our header check stops it
    "bomb_small": (write_bomb_small, ("rejected", "decompression bomb")),
}

# max_pixels to pass with CASES: small, so the bomb trips our own header check well below
# Pillow's limits and the test never decodes 400 M pixels
CASES_MAX_PIXELS = 1_000_000


def write_imagefolder(
    root: Path,
    *,
    classes: tuple[str, ...] = ("cat", "dog", "zebra"),
    per_class: int = 4,
    seed: int = 0,
) -> dict[str, tuple[str | None, Outcome]]:
    """Build root/<class>/<file> with generated images of various sizes plus a few bad files.

    Returns {relative posix path: (class name, expected outcome)} for every file that is an input
    (image extension). Also writes a README.txt and a notes.md, which are not inputs.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    expected: dict[str, tuple[str | None, Outcome]] = {}
    for ci, cls in enumerate(classes):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(8, 90)), int(rng.integers(8, 90))
            name = f"img{i:03d}.jpg" if i % 2 == 0 else f"img{i:03d}.png"
            arr = smooth_rgb(width=w, height=h, seed=seed * 1000 + ci * 100 + i)
            Image.fromarray(arr).save(d / name)
            expected[f"{cls}/{name}"] = (cls, ("ok", w, h))
    bad_cls = classes[0]
    for writer, name, outcome in [
        (write_truncated_jpeg, "broken_truncated.jpg", ("rejected", "truncated")),
        (write_empty, "broken_empty.png", ("rejected", "empty file")),
        (write_text, "broken_text.JPEG", ("rejected", "not an image")),
    ]:
        writer(root / bad_cls, name)
        expected[f"{bad_cls}/{name}"] = (bad_cls, outcome)
    (root / "README.txt").write_text("not an input\n")
    (root / classes[-1] / "notes.md").write_text("not an input either\n")
    return expected


def write_flat_folder(root: Path, *, n: int = 5) -> dict[str, tuple[str | None, Outcome]]:
    """A folder of images without class sub-folders (label None)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, tuple[str | None, Outcome]] = {}
    for i in range(n):
        name = f"photo{i:02d}.png"
        Image.fromarray(smooth_rgb(width=20 + i, height=10 + i, seed=i)).save(root / name)
        expected[name] = (None, ("ok", 20 + i, 10 + i))
    write_truncated_jpeg(root, "zz_truncated.jpg")
    expected["zz_truncated.jpg"] = (None, ("rejected", "truncated"))
    return expected
