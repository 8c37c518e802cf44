"""timm SwinTransformerV2: shifted windows, no CLS token; the output grid is the last stage's.

Attention = what each token receives in the last block, mean over heads and queries, with the
windows, shift and padding undone. Swin-v2 calls F.linear with the qkv weight directly, so the
softmax module is hooked instead of the projection. Above 256 px the model is resized with
``set_input_size`` (a wider window rather than unmasked zero padding).
"""

from __future__ import annotations

import math

import torch

from tokenlake.extract._adapters import Adapter, TokenLayout, neighbour_cosine, pool_to, received
from tokenlake.extract._registry import Family, register


class SwinAdapter(Adapter):
    def __init__(self, model, *, img_size: int, blocks: bool) -> None:
        super().__init__(model, img_size=img_size, blocks=blocks)
        last = model.layers[-1].blocks[-1]
        gh, gw = last.input_resolution if hasattr(last, "input_resolution") else (
            img_size // 32, img_size // 32)
        self.last = last
        self.layout = TokenLayout(
            family="swin", n_cls=0, n_reg=0, grid=(gh, gw), cell=img_size // gh,
            pixel_offset=0, embed_dim=model.num_features, depth=len(model.layers),
        )
        self.hooks.input(model.norm, "pre")
        self.hooks.output(model.patch_embed, "embed")
        self.hooks.output(last.attn.softmax, "probs")

    def _unwindow(self, received: torch.Tensor, batch: int) -> torch.Tensor:
        """[B*nW, N] per-window attention received -> [B, H*W] on the output grid."""
        wh, ww = self.last.window_size
        sh, sw = self.last.shift_size
        gh, gw = self.layout.grid
        ph, pw = math.ceil(gh / wh) * wh, math.ceil(gw / ww) * ww  # the padded grid
        win = received.reshape(batch, ph // wh, pw // ww, wh, ww)
        grid = win.permute(0, 1, 3, 2, 4).reshape(batch, ph, pw)
        if sh or sw:
            grid = torch.roll(grid, shifts=(sh, sw), dims=(1, 2))
        return grid[:, :gh, :gw].reshape(batch, gh * gw)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lay = self.layout
        post = self.model.forward_features(x)  # [B, H, W, C] after the final norm
        b = post.shape[0]
        pre = self.hooks.pop("pre").reshape(b, lay.n_patches, -1)  # [B, T, C]
        attn = self._unwindow(received(self.hooks.pop("probs")), b)
        embed = pool_to(self.hooks.pop("embed"), lay.grid)  # [B, h, w, C]
        pooled = self.model.forward_head(post, pre_logits=True).float()  # [B, C]
        return {
            "tokens": pre,
            "norm": pre.float().norm(dim=-1),
            "attn": attn,
            "nbr_cos": neighbour_cosine(embed),
            "cls_post": pooled,
            "patch_mean_post": post.float().reshape(b, lay.n_patches, -1).mean(1),
        }


FAMILY = register(Family(
    name="swin", adapter=SwinAdapter, classes=("SwinTransformerV2",),
    description="Swin Transformer v2: windowed attention, no CLS; pooled output token",
    attention="attention each token receives in the last block, mean over heads and queries, "
              "windows and shift undone",
    traps="the qkv hook never fires (F.linear on the weight): the softmax is hooked; at high "
          "resolution widen the window (set_input_size) instead of padding with zero tokens",
))
