"""The paper's backbones by short alias, and model construction (pretrained, local file or random).

Every alias pins the pretrained tag: several timm defaults are other checkpoints (docs/MODELS.md).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    timm_name: str  # always "architecture.tag"
    img_size: int  # the resolution the paper used (timm's native one)


def _specs() -> dict[str, ModelSpec]:
    rows: list[tuple[str, str, int]] = []
    for size, arch in (("s", "small"), ("b", "base")):
        for patch in (16, 8):
            rows.append((f"dino_{size}{patch}", f"vit_{arch}_patch{patch}_224.dino", 224))
    for size, arch in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
        rows.append((f"dinov2_{size}", f"vit_{arch}_patch14_dinov2.lvd142m", 518))
        rows.append((f"dinov2_{size}_reg4", f"vit_{arch}_patch14_reg4_dinov2.lvd142m", 518))
    for size, arch in (("s", "small"), ("m", "medium"), ("b", "base"), ("l", "large")):
        rows.append((f"deit3_{size}", f"deit3_{arch}_patch16_224.fb_in1k", 224))
    rows.append(("deit3_h", "deit3_huge_patch14_224.fb_in1k", 224))
    rows.append(("clip_b", "vit_base_patch16_clip_224.laion2b", 224))
    for size, arch in (("l", "large"), ("h", "huge"), ("g", "giant")):
        rows.append((f"clip_{size}", f"vit_{arch}_patch14_clip_224.laion2b", 224))
    for size, arch in (("t", "tiny"), ("s", "small"), ("b", "base")):
        rows.append((f"swinv2_{size}", f"swinv2_{arch}_window8_256.ms_in1k", 256))
    for b in range(6):
        rows.append((f"pvt_b{b}", f"pvt_v2_b{b}.in1k", 224))
    return {alias: ModelSpec(alias, name, px) for alias, name, px in rows}


ALIASES: dict[str, ModelSpec] = _specs()  # the paper's models


def all_aliases() -> dict[str, ModelSpec]:
    """The paper's aliases and those each model family registers (`Family.aliases`)."""
    from tokenlake.extract._registry import model_families

    out = dict(ALIASES)
    for fam in model_families():
        for alias, name, px in fam.aliases:
            if alias in out and out[alias].timm_name != name:
                raise ValueError(f"alias {alias!r} of family {fam.name!r} is already "
                                 f"{out[alias].timm_name}")
            out[alias] = ModelSpec(alias, name, px)
    return out


class ModelRequestError(ValueError):
    """A model request that cannot be served; raised before any model runs."""


def resolve_model(name: str) -> ModelSpec:
    """An alias (``dinov2_g_reg4``) or any timm name, with or without a ``.tag``."""
    known = all_aliases()
    if name in known:
        return known[name]
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        cfg = timm.get_pretrained_cfg(name) or timm.get_pretrained_cfg(arch)
        size = cfg.input_size[-1] if cfg is not None else 224
        alias = name.replace(".", "-")
        return ModelSpec(alias=alias, timm_name=name, img_size=int(size))
    candidates = list(known) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelRequestError(
        f"unknown model {name!r}.{hint} Use an alias (`tokenlake models` lists them) or a timm "
        "model name."
    )


@dataclass(frozen=True)
class Weights:
    """Where the weights come from: 'pretrained' (timm hub), 'random', or a local file."""

    kind: str  # "pretrained" | "random" | "file"
    path: Path | None = None
    sha256: str | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def describe(self) -> str:
        if self.kind == "file":
            return f"file {self.path} (sha256 {self.sha256})"
        return "RANDOM WEIGHTS (untrained; numbers say nothing about the real model)" if (
            self.is_random
        ) else "pretrained (timm hub)"


def resolve_weights(weights: str) -> Weights:
    if weights in ("pretrained", "random"):
        return Weights(kind=weights)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelRequestError(
            f"--weights {weights!r} is neither 'pretrained', 'random' nor an existing file"
        )
    return Weights(kind="file", path=path.resolve(), sha256=file_sha256(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Seed for random-weight models: a resumed run must rebuild the very same network.
RANDOM_INIT_SEED = 0


def create_backbone(spec: ModelSpec, *, weights: Weights, img_size: int) -> torch.nn.Module:
    """Build the model in eval mode at ``img_size``."""
    kwargs: dict = {}
    arch = spec.timm_name.split(".", 1)[0]
    if arch.startswith(("vit_", "deit", "eva", "aimv2_")):  # AIMv2 is a VisionTransformer too
        kwargs["img_size"] = img_size
    if weights.kind == "file":
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights.path)}
    if weights.is_random:
        torch.manual_seed(RANDOM_INIT_SEED)
    model = timm.create_model(spec.timm_name, pretrained=not weights.is_random, **kwargs)
    if arch.startswith("swin") and img_size != model.patch_embed.img_size[0]:
        # a wider window instead of unmasked zero padding at high resolution (docs/MODELS.md)
        model.set_input_size((img_size, img_size))
    return model.eval()


@functools.cache
def meta_backbone(spec: ModelSpec, img_size: int) -> torch.nn.Module:
    """A weightless copy on the meta device, for layout, parameter count and preprocessing recipe.

    Cached: timm still runs its weight initialisers on meta tensors (~0.3 s for PVT-b2), and one
    extraction asks several times.
    """
    with torch.device("meta"):
        return create_backbone(spec, weights=Weights(kind="random"), img_size=img_size)
