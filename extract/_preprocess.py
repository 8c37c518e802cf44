"""The exact input pixels a model sees: timm's eval resize and crop, kept as uint8.

Normalisation (mean/std) is applied on the device, so the lake can keep the very pixels the model
saw and the host moves 4x fewer bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    create_transform,
    resolve_model_data_config,
)


@dataclass(frozen=True)
class DataConfig:
    img_size: int
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {
            "img_size": self.img_size, "interpolation": self.interpolation,
            "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
            "mean": list(self.mean), "std": list(self.std),
        }


# Named input recipes (`--preprocess`). "model": timm's own eval recipe for the model
# (resolve_model_data_config). "dinov2-eval": DINOv2's official linear evaluation transform,
# facebookresearch/dinov2 `make_classification_eval_transform`: "resize_size=256,
# interpolation=BICUBIC, crop_size=224" with ImageNet mean/std, i.e. the shorter side resized to
# size / 0.875 and a centred crop of `size`. timm's DINOv2 config crops nothing (crop_pct 1.0),
# so at 224 px it shows the heads ~14% more of each image than they were evaluated on.
PREPROCESS = ("model", "dinov2-eval")
_DINOV2_EVAL = {"interpolation": "bicubic", "crop_pct": 224 / 256, "crop_mode": "center",
                "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}


def data_config(model: torch.nn.Module, *, img_size: int, preprocess: str = "model") -> DataConfig:
    """The input recipe of `model` at `img_size` under the named `preprocess` recipe."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"--preprocess must be one of {', '.join(PREPROCESS)}, not {preprocess!r}")
    cfg = resolve_model_data_config(model) if preprocess == "model" else _DINOV2_EVAL
    return DataConfig(
        img_size=img_size, interpolation=cfg["interpolation"], crop_pct=float(cfg["crop_pct"]),
        crop_mode=cfg.get("crop_mode", "center"), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
    )


class Resizer:
    """PIL RGB image -> uint8 array [S, S, 3], using timm's own eval transforms minus the tensor steps."""

    def __init__(self, cfg: DataConfig) -> None:
        full = create_transform(
            input_size=(3, cfg.img_size, cfg.img_size), interpolation=cfg.interpolation,
            crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode, mean=cfg.mean, std=cfg.std,
            is_training=False,
        )
        steps = full.transforms
        if type(steps[-1]).__name__ != "Normalize" or "ToTensor" not in type(steps[-2]).__name__:
            raise RuntimeError(f"unexpected timm eval transform {full}; cannot keep uint8 pixels")
        self.steps = steps[:-2]
        self.size = cfg.img_size

    def __call__(self, image: Image.Image) -> np.ndarray:
        for step in self.steps:
            image = step(image)
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.shape != (self.size, self.size, 3):
            raise RuntimeError(f"resize produced {pixels.shape}, expected {(self.size, self.size, 3)}")
        return pixels


def channel_stats(cfg: DataConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as [1, 3, 1, 1] tensors on `device`. Made once per run: building a CUDA tensor
    from Python numbers waits for everything queued on the device, so per batch it would stall
    the pipeline."""
    return (torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(cfg.std, device=device).view(1, 3, 1, 1))


def normalise(pixels: torch.Tensor, cfg: DataConfig,
              stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], as timm's ToTensor + Normalize."""
    mean, std = stats if stats is not None else channel_stats(cfg, pixels.device)
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def token_cells(pixels: np.ndarray, *, grid: tuple[int, int], cell: int, offset: int) -> np.ndarray:
    """uint8 [B, H, W, 3] -> [B, gh*gw, cell, cell, 3]: the pixels under each patch token.

    ``offset`` < 0 shifts every cell up-left (PVT-v2 centres token (i, j) on pixel (32i, 32j));
    pixels outside the image are zero.
    """
    b, h, w, _ = pixels.shape
    gh, gw = grid
    lead = -offset
    canvas = np.zeros((b, gh * cell, gw * cell, 3), dtype=np.uint8)
    src_h, src_w = min(h, gh * cell - lead), min(w, gw * cell - lead)
    canvas[:, lead:lead + src_h, lead:lead + src_w] = pixels[:, :src_h, :src_w]
    cells = canvas.reshape(b, gh, cell, gw, cell, 3).transpose(0, 1, 3, 2, 4, 5)
    return cells.reshape(b, gh * gw, cell, cell, 3)


def cells_at(pixels: np.ndarray, image: np.ndarray, patch: np.ndarray, *, grid: tuple[int, int],
             cell: int, offset: int) -> np.ndarray:
    """The cells of patch tokens `patch` [S] of images `image` [S] -> uint8 [S, cell, cell, 3].

    Gathers straight from the image when the grid tiles it exactly (ViT, Swin): one copy.
    """
    b, h, w, _ = pixels.shape
    gh, gw = grid
    if offset or (h, w) != (gh * cell, gw * cell):
        return token_cells(pixels, grid=grid, cell=cell, offset=offset)[image, patch]
    tiles = pixels.reshape(b, gh, cell, gw, cell, 3)
    # advanced indices split by a slice: numpy puts their broadcast dimension first -> [S, P, P, 3]
    return tiles[image, patch // gw, :, patch % gw]
