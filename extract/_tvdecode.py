"""The pixel store's second decoder: torchvision (nvjpeg on a GPU, libjpeg-turbo on the CPU).

``TorchvisionDecoder(cfg, device=...)`` turns a list of inputs (encoded bytes, or a path that could
not be read) into the same uint8 [B, S, S, 3] pixels the PIL path gives, within a few grey levels:
JPEGs are decoded in batches with ``torchvision.io.decode_jpeg`` on ``device`` and resized and
cropped there by timm's own eval steps (``Resize``, ``CenterCrop``, ``ResizeKeepRatio`` take
[..., 3, H, W] tensors; ``CenterCropOrPad`` does not, so it is re-implemented with its geometry).

Only inputs that torchvision decodes exactly as PIL would take that path: a JPEG (baseline or
progressive) whose header, read by PIL without decoding a pixel, says 8-bit RGB/YCbCr or grey, no
EXIF rotation, a size within the decompression-bomb limit, and whose data ends with the EOI
marker (so a truncated file is never padded). Everything else - PNG, CMYK, 16-bit, truncated,
rotated, anything torchvision refuses - goes through ``decode_image`` + ``Resizer`` for that one
image, so rejections and their reasons are exactly the PIL store's. Each row says which decoder
made it: 'torchvision', 'pil', or None for a rejected input.

JPEGs whose colours nvjpeg gets wrong go to PIL too: those stored as RGB rather than YCbCr (an
Adobe APP14 marker with transform 0, or no JFIF/Adobe marker and component ids 'R', 'G', 'B',
which libjpeg reads as RGB and nvjpeg as YCbCr).

Device memory is bounded: each chunk is split into groups whose decoded pixels plus resize
intermediates stay under `memory_budget` bytes (a chunk of 256 12-megapixel photos would need
tens of GB), and a group that still runs out of memory is retried in halves, down to single
images, and then decoded by PIL. Every such detour is counted in `Decoded.fallbacks` (and in the
decoder's running `fallbacks`), so a build can say how many rows left the fast path and why.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenlake.extract._decode import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from tokenlake.extract._preprocess import DataConfig, Resizer

DECODERS = ("pil", "torchvision")
# device bytes one decode+resize group may use: a few hundred ImageNet photos, or ~20 12-MP ones;
# small next to any GPU, so the caching allocator's other tenants (the model) are never starved
DEFAULT_MEMORY_BUDGET = 1 << 30
_EXIF_ORIENTATION = 0x0112
_RGB_COMPONENT_IDS = [ord("R"), ord("G"), ord("B")]
# Decoded.fallbacks keys: why a row left the torchvision path (or how it stayed on it)
FALLBACKS = {
    "header": "not a plain 8-bit JPEG per its header (PNG, CMYK, rotated, RGB-stored, ...): PIL",
    "refused": "decode_jpeg raised for this image: PIL",
    "wrong_shape": "decode_jpeg returned a shape other than [3, H, W] of the header: PIL",
    "oom_split": "a group ran out of device memory and was retried in two halves",
    "oom_pil": "a single image ran out of device memory: PIL",
}
_TV_DEPRECATION = ".*decoding and encoding capabilities of TorchVision.*"


def check_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
    return decoder


def default_device(device: str | torch.device | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class Decoded:
    """One list of inputs, decoded. Rows of rejected inputs are zero pixels with a reason."""

    pixels: np.ndarray  # uint8 [B, S, S, 3]
    width: list[int]  # displayed size before any resize; 0 when rejected
    height: list[int]
    reason: list[str | None]  # None when usable
    decoder: list[str | None]  # 'torchvision' | 'pil' | None when rejected
    fallbacks: Counter = dataclasses.field(default_factory=Counter)  # FALLBACKS keys -> count


def read_input(item: bytes | str | Path) -> bytes | str:
    """The input's bytes; a path that cannot be read is returned as it is, for `decode_image` to
    reject with its usual reason."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    try:
        return Path(item).read_bytes()
    except OSError:
        return str(item)


def sniff(data: bytes | str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) when torchvision may decode `data`, from the header only; None sends the
    input to the PIL path (which then decodes it or rejects it with its own reason)."""
    if not isinstance(data, bytes) or not data.startswith(b"\xff\xd8") or not data.endswith(
            b"\xff\xd9"):  # not a JPEG, or no EOI marker at the end: possibly truncated
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # header only, no pixel decoded
    except Exception:  # noqa: BLE001 - decode_image says what is wrong with it
        return None
    width, height = im.size
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or not 0 < width * height <= max_pixels:
        return None
    if "exif" in im.info:
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - decode_image keeps such an image as stored, so do we
            orientation = 1
        if orientation not in (None, 1):
            return None
    if im.mode == "RGB" and _stored_as_rgb(im):
        return None
    return width, height


def _stored_as_rgb(im: Image.Image) -> bool:
    """True when libjpeg reads this 3-component JPEG as RGB, not YCbCr (its rules in
    `default_decompress_parms`): nvjpeg assumes YCbCr and would return wrong colours."""
    if "adobe" in im.info:  # APP14 "Adobe": transform 0 = RGB (or CMYK), 1 = YCbCr, 2 = YCCK
        return im.info.get("adobe_transform", 0) != 1
    component_ids = [layer[0] for layer in getattr(im, "layer", [])]
    return "jfif" not in im.info and component_ids == _RGB_COMPONENT_IDS


def device_bytes(width: int, height: int, *, size: int, crop_pct: float = 1.0) -> int:
    """Device memory one image of this size takes through decode and resize: the decoded uint8
    [3, H, W], its copy in the stacked batch, the float32 copy the antialiased resize works on, and
    the float32 resized image (an upscale makes that the larger), before the crop."""
    side = size / max(crop_pct, 1e-3)  # the shorter side after the resize
    resized = side * side * max(width, height) / max(1, min(width, height))
    return int(3 * width * height * (1 + 1 + 4) + 3 * 4 * resized)


def split_by_memory(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive groups of indices into `costs` whose sums stay within `budget`; an item over
    the budget on its own is a group of one (its out-of-memory fallback is PIL)."""
    groups: list[list[int]] = []
    used = 0
    for k, cost in enumerate(costs):
        if groups and used + cost <= budget:
            groups[-1].append(k)
            used += cost
        else:
            groups.append([k])
            used = cost
    return groups


def _is_out_of_memory(err: BaseException) -> bool:
    # nvjpeg's allocator failures come back as plain RuntimeErrors naming the condition
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def pil_row(item: bytes | str | Path, resize: Resizer, *, max_pixels: int = DEFAULT_MAX_PIXELS
            ) -> tuple[np.ndarray | None, int, int, str | None]:
    """The PIL path for one input: (pixels [S, S, 3] or None, width, height, reason)."""
    try:
        decoded = decode_image(item, max_pixels=max_pixels)
        return resize(decoded.image), decoded.width, decoded.height, None
    except ImageRejected as err:
        return None, 0, 0, err.reason
    except Exception as err:  # noqa: BLE001 - one broken record costs one row, not the store
        return None, 0, 0, f"{type(err).__name__}: {err}"


def _center_crop_or_pad(img: torch.Tensor, size: tuple[int, int], fill: Sequence[int]
                        ) -> torch.Tensor:
    """timm's `center_crop_or_pad` for tensors [..., 3, H, W] with a per-channel fill (timm's own
    only takes a scalar fill for tensors); same padding and crop offsets."""
    crop_h, crop_w = size
    h, w = img.shape[-2:]
    if crop_w > w or crop_h > h:
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        right = (crop_w - w + 1) // 2 if crop_w > w else 0
        bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        colour = torch.tensor(list(fill), dtype=img.dtype, device=img.device).view(3, 1, 1)
        canvas = colour.expand(*img.shape[:-2], h + top + bottom, w + left + right).clone()
        canvas[..., top:top + h, left:left + w] = img  # [..., 3, H', W']
        img, (h, w) = canvas, canvas.shape[-2:]
        if (h, w) == (crop_h, crop_w):
            return img
    top, left = round((h - crop_h) / 2.0), round((w - crop_w) / 2.0)  # as timm (banker's)
    return img[..., top:top + crop_h, left:left + crop_w]


def tensor_steps(resize: Resizer) -> list:
    """timm's eval steps of `resize`, as callables on uint8 tensors [..., 3, H, W]."""
    steps = []
    for step in resize.steps:
        kind = type(step).__name__
        if kind in ("Resize", "CenterCrop", "ResizeKeepRatio"):
            steps.append(step)  # torchvision functional ops: tensors [..., H, W] as well as PIL
        elif kind == "CenterCropOrPad":
            fill = step.fill if isinstance(step.fill, (list, tuple)) else [step.fill] * 3
            steps.append(lambda x, s=tuple(step.size), f=tuple(fill): _center_crop_or_pad(x, s, f))
        else:
            raise RuntimeError(f"timm eval step {step} has no tensor version here; use the PIL "
                               "decoder for this model")
    return steps


class TorchvisionDecoder:
    """Inputs -> `Decoded`, JPEGs through torchvision on `device`, the rest through PIL.

    `memory_budget`: device bytes one decode+resize group may use (see `device_bytes`);
    `fallbacks` counts, over every call, the rows that left the torchvision path and why."""

    def __init__(self, cfg: DataConfig, *, device: str | torch.device | None = None,
                 batch_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, not "
                             f"{memory_budget!r}")
        self.device = default_device(device)
        self.resize = Resizer(cfg)  # the PIL path, and the steps the tensor path reuses
        self.steps = tensor_steps(self.resize)
        self.size = cfg.img_size
        self.crop_pct = cfg.crop_pct or 1.0
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.memory_budget = memory_budget
        self.fallbacks: Counter = Counter()

    def headers(self, items: Sequence[bytes | str]) -> list[tuple[int, int] | None]:
        return [sniff(x, max_pixels=self.max_pixels) for x in items]

    def __call__(self, items: Sequence[bytes | str],
                 headers: Sequence[tuple[int, int] | None] | None = None) -> Decoded:
        """`items`: encoded bytes (or a path `read_input` could not read); `headers`: their
        `sniff` results when already known (the build computes them while reading)."""
        n, s = len(items), self.size
        headers = self.headers(items) if headers is None else headers
        out = Decoded(np.zeros((n, s, s, 3), np.uint8), [0] * n, [0] * n, [None] * n, [None] * n)
        jpegs = [k for k in range(n) if headers[k] is not None]
        if len(jpegs) < n:
            out.fallbacks["header"] += n - len(jpegs)
        done: set[int] = set()
        for lo in range(0, len(jpegs), self.batch_size):
            chunk = jpegs[lo:lo + self.batch_size]
            costs = [device_bytes(*headers[k], size=s, crop_pct=self.crop_pct) for k in chunk]
            for group in split_by_memory(costs, self.memory_budget):
                rows = self._within_memory(items, headers, [chunk[j] for j in group], out)
                for k in rows:
                    out.width[k], out.height[k] = headers[k]
                    out.decoder[k] = "torchvision"
                    done.add(k)
        for k in range(n):  # not a plain JPEG, or torchvision refused it: PIL decides
            if k not in done:
                pixels, out.width[k], out.height[k], out.reason[k] = pil_row(
                    items[k], self.resize, max_pixels=self.max_pixels)
                if pixels is not None:
                    out.pixels[k] = pixels
                    out.decoder[k] = "pil"
        self.fallbacks.update(out.fallbacks)
        return out

    def _within_memory(self, items: Sequence[bytes | str], headers, group: list[int],
                       out: Decoded) -> list[int]:
        """`_decode_resize` of `group`; out of device memory, the two halves of the group one
        after the other, down to single images, which are left to PIL."""
        try:
            return self._decode_resize(items, headers, group, out)
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not _is_out_of_memory(err):
                raise
        if self.device.type == "cuda":  # the failed group's blocks, back for the halves
            torch.cuda.empty_cache()
        if len(group) == 1:
            out.fallbacks["oom_pil"] += 1
            return []
        out.fallbacks["oom_split"] += 1
        half = len(group) // 2
        return (self._within_memory(items, headers, group[:half], out)
                + self._within_memory(items, headers, group[half:], out))

    def _decode(self, data: list[bytes], counts: Counter) -> list[torch.Tensor | None]:
        """Encoded JPEGs -> uint8 [3, H, W] each on the device; None where torchvision fails.
        Running out of memory is raised, for the caller to retry with fewer images."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type == "cuda":
            # nvjpeg's hardware decoder writes its outputs without waiting for work queued on
            # the caller's stream, and the caching allocator may hand it blocks that queued
            # kernels still read (pytorch/vision#9606): drain the stream first, or decoded
            # images and unrelated tensors come out corrupted. The host waits anyway: the
            # decode itself synchronises before it returns.
            torch.cuda.current_stream(self.device).synchronize()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TV_DEPRECATION)
            warnings.filterwarnings("ignore", message=".*buffer is not writable.*")
            encoded = [torch.frombuffer(d, dtype=torch.uint8) for d in data]  # [nbytes] each
            try:  # one call for the whole batch (nvjpeg's batched decode)
                return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as err:  # all or nothing: find the bad ones one by one
                if _is_out_of_memory(err):
                    raise
            images: list[torch.Tensor | None] = []
            for e in encoded:
                try:
                    images.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as err:
                    if _is_out_of_memory(err):
                        raise
                    counts["refused"] += 1
                    images.append(None)
            return images

    def _decode_resize(self, items: Sequence[bytes | str], headers, group: list[int],
                       out: Decoded) -> list[int]:
        """Decode and resize items `group` into `out.pixels` [B, S, S, 3]; returns the rows
        done (the others are left to PIL)."""
        counts: Counter = Counter()  # merged once the group is done: a retried group counts once
        images = self._decode([items[k] for k in group], counts)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for j, (k, img) in enumerate(zip(group, images)):
            w, h = headers[k]
            if img is None:
                continue  # counted as refused
            if tuple(img.shape) == (3, h, w):
                by_shape.setdefault((h, w), []).append(j)
            else:  # a decoder that disagrees with the header is not trusted with the pixels
                counts["wrong_shape"] += 1
        ok = [j for same in by_shape.values() for j in same]
        if not ok:
            out.fallbacks.update(counts)
            return []
        resized = torch.empty((len(ok), self.size, self.size, 3), dtype=torch.uint8,
                              device=self.device)  # [B', S, S, 3]
        at = 0
        for same in by_shape.values():  # images of one size resize together
            x = torch.stack([images[j] for j in same])  # [g, 3, H, W]
            for step in self.steps:
                x = step(x)  # ... -> [g, 3, S, S]
            if tuple(x.shape[1:]) != (3, self.size, self.size):
                raise RuntimeError(f"tensor resize produced {tuple(x.shape)}, expected "
                                   f"{(len(same), 3, self.size, self.size)}")
            resized[at:at + len(same)] = x.permute(0, 2, 3, 1)  # [g, S, S, 3]
            at += len(same)
            del x
        rows = [group[j] for j in ok]
        out.pixels[rows] = resized.cpu().numpy()  # one copy to the host per group
        out.fallbacks.update(counts)
        return rows
