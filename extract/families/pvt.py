"""timm PyramidVisionTransformerV2: overlapping convolutional patch embeddings, no CLS token.

Its final norm sits inside the last stage (``stages[-1].norm``), so forward_intermediates gives
post-norm features: the norm's input is hooked. Token (i, j) of the 32-px output grid is centred
on pixel (32i, 32j) (``rf_offset`` -16); the stored pixel cell is the aligned one.
"""

from __future__ import annotations

import math

import torch

from tokenlake.extract._adapters import (
    Adapter,
    TokenLayout,
    fp32_exact,
    neighbour_cosine,
    pool_to,
    received,
)
from tokenlake.extract._registry import Family, register


class PVTAdapter(Adapter):
    def __init__(self, model, *, img_size: int, blocks: bool) -> None:
        super().__init__(model, img_size=img_size, blocks=blocks)
        side = math.ceil(img_size / 32)
        stage = model.stages[-1]
        self.attn = stage.blocks[-1].attn
        self.layout = TokenLayout(
            family="pvt", n_cls=0, n_reg=0, grid=(side, side), cell=32, pixel_offset=0,
            embed_dim=model.num_features, depth=len(model.stages), rf_offset=-16,
        )
        # forward_intermediates gives post-norm features: the final norm sits inside stages[-1]
        self.hooks.input(stage.norm, "pre")
        self.hooks.output(stage.norm, "post")
        self.hooks.output(model.patch_embed, "embed")
        self.hooks.output(self.attn.q, "q")
        self.hooks.output(self.attn.kv, "kv")

    def final_norm_module(self) -> torch.nn.Module:
        return self.model.stages[-1].norm

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lay = self.layout
        self.model.forward_features(x)
        pre = self.hooks.pop("pre")  # [B, T, C]
        post = self.hooks.pop("post")  # [B, T, C]
        b, t, _ = pre.shape
        heads = self.attn.num_heads
        q = self.hooks.pop("q").reshape(b, t, heads, -1).transpose(1, 2)  # [B, h, T, hd]
        kv = self.hooks.pop("kv")
        k = kv.reshape(b, kv.shape[1], 2, heads, -1)[:, :, 0].transpose(1, 2)  # [B, h, Tk, hd]
        if k.shape[2] != t:
            raise ValueError("PVT's last stage pools its keys (an _li variant?); attention per token "
                             "is undefined")
        # bf16 blocks, fp32 reductions: autocast would re-cast the .float() operands of the matmul
        with fp32_exact(x.device.type):
            logits = q.float() @ k.float().transpose(-2, -1) * self.attn.scale  # [B, h, T, T]
            probs = logits.softmax(-1)
            embed = pool_to(self.hooks.pop("embed"), lay.grid)  # [B, h, w, C]
            pooled = post.float().mean(1)  # [B, C]: what forward_head(pre_logits=True) averages
            return {
                "tokens": pre,
                "norm": pre.float().norm(dim=-1),  # [B, T]
                "attn": received(probs),  # [B, T]
                "nbr_cos": neighbour_cosine(embed),  # [B, T]
                "cls_post": pooled,
                "patch_mean_post": pooled,
            }

FAMILY = register(Family(
    name="pvt", adapter=PVTAdapter, classes=("PyramidVisionTransformerV2",),
    description="Pyramid Vision Transformer v2: 4 stages, no CLS; pooled output token",
    attention="attention each token receives in the last block, mean over heads and queries",
    traps="the final norm sits inside stages[-1]; token (i, j) is centred on pixel (32i, 32j); "
          "_li variants pool their keys (refused)",
))
