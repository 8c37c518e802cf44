"""Decode one image robustly: bad input is rejected with a reason, never padded, never fatal.

Conventions (each a deliberate choice, so downstream numbers are comparable):

- Truncated files are rejected. Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False
  (it pads missing rows with grey); we call ``.load()`` so truncation surfaces here and not later.
- Size limit: the header size is checked against ``max_pixels`` before any pixel is decoded.
  Pillow itself only warns above ``Image.MAX_IMAGE_PIXELS`` and raises at twice that, which we
  also report as a bomb.
- EXIF orientation is applied (``ImageOps.exif_transpose``), so width/height are the displayed
  size. timm/torchvision loaders do not do this; a photo shot in portrait mode would otherwise
  reach the model sideways.
- Alpha is dropped, not composited (RGBA/LA/PA/P-with-transparency -> ``convert("RGB")``), the
  same pixels timm's default loader gives, so token maps match what the models were run on.
- 16-bit gray ("I;16*") and "I" (int32, assumed to hold 16-bit data, as 16-bit PNG/TIFF decoders
  give) are scaled with rounding, 65535 -> 255, 32768 -> 128; Pillow's own convert clips at 255.
- "F" (float): values in [0, 1] are scaled by 255, otherwise taken as 0..255 and clipped.
- Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF): the first frame.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "DecodedImage", "ImageRejected", "decode_image"]

# Pillow's own hard limit (2 x MAX_IMAGE_PIXELS) by default
DEFAULT_MAX_PIXELS = 178_956_970

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageRejected(Exception):
    """An input that cannot be used. ``reason`` is short and stable (fit for GROUP BY);
    ``detail`` carries the underlying error message, if any."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # mode RGB, pixels loaded
    width: int  # displayed size (after EXIF orientation), before any resize
    height: int
    mode: str  # the file's PIL mode before conversion, e.g. "L", "CMYK", "I;16"


def decode_image(data: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode ``data`` (encoded bytes or a file path) to a fully loaded RGB image.

    Raises ImageRejected for any input that cannot be used; other exceptions mean a bug or a
    misconfigured process, not a bad image.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated images would "
            "be silently padded with grey. Something imported earlier set it; unset it."
        )
    fp = _open_input(data)
    try:
        with warnings.catch_warnings():
            # we enforce our own limit below; Pillow's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageRejected(_bomb_reason_from_pillow(str(e)), str(e)) from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image", _describe(data)) from None
    except Exception as e:  # noqa: BLE001 - any plugin parser error on a bad header is bad input
        raise ImageRejected("corrupt image data", f"{type(e).__name__}: {e}") from None

    # no `with im:` - closing would invalidate the pixels we return; the input is an in-memory buffer
    width, height = im.size
    if width * height > max_pixels:
        raise ImageRejected(f"decompression bomb ({width * height} pixels > {max_pixels})")
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt image data", f"size {width}x{height}")
    mode = im.mode
    try:
        im.load()  # the actual decode: truncation and corrupt streams raise here
    except Exception as e:  # noqa: BLE001 - bad input must not stop a run
        msg = str(e)
        reason = "truncated" if "truncat" in msg.lower() else "corrupt image data"
        raise ImageRejected(reason, f"{type(e).__name__}: {msg}") from None
    try:
        rgb = _to_rgb(_apply_exif_orientation(im))
    except ImageRejected:
        raise
    except Exception as e:  # noqa: BLE001 - bad input must not stop a run
        raise ImageRejected(f"unsupported mode {mode}", f"{type(e).__name__}: {e}") from None
    return DecodedImage(image=rgb, width=rgb.width, height=rgb.height, mode=mode)


def _open_input(data: bytes | str | Path) -> io.BytesIO | Path:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageRejected("empty file")
        return io.BytesIO(bytes(data))
    if not isinstance(data, (str, Path)):
        raise TypeError(f"decode_image takes bytes or a path, got {type(data).__name__}")
    path = Path(data)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageRejected("dangling symlink", f"{path} -> {os.readlink(path)}") from None
        raise ImageRejected("file not found", str(path)) from None
    except OSError as e:
        raise ImageRejected("unreadable file", f"{path}: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageRejected("a directory, not an image file", str(path))
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader: never opened
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(
            st.st_mode) else "device or other special file"
        raise ImageRejected(f"not a regular file ({kind})", str(path))
    size = st.st_size
    if size == 0:
        raise ImageRejected("empty file", str(path))
    try:
        # read whole file: Image.open on a path keeps it open lazily; bytes make closing trivial
        return io.BytesIO(path.read_bytes())
    except OSError as e:
        raise ImageRejected("unreadable file", f"{path}: {e}") from None


def _describe(data: bytes | str | Path) -> str:
    if isinstance(data, (str, Path)):
        return f"{data}: no image format recognised"
    return f"{len(data)} bytes: no image format recognised"


def _bomb_reason_from_pillow(message: str) -> str:
    nums = re.findall(r"\d+", message)
    if len(nums) >= 2:
        return f"decompression bomb ({nums[0]} pixels > {nums[1]})"
    return "decompression bomb"


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001
        # unreadable EXIF is metadata damage, not pixel damage: keep the image as stored
        return im
    if orientation in (None, 1):
        return im
    return ImageOps.exif_transpose(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(im).astype(np.int64)
        a = np.clip(a, 0, 65535)
        gray = ((a * 255 + 32767) // 65535).astype(np.uint8)  # round half up: 32768 -> 128
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ImageRejected("unsupported mode F", "non-finite pixel values")
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    with warnings.catch_warnings():
        # "Palette images with Transparency ... should be converted to RGBA": we drop alpha on purpose
        warnings.simplefilter("ignore", UserWarning)
        return im.convert("RGB")
