"""timm SwinTransformerV2: shifted windows, no CLS token; the output grid is the last stage's.

Attention = what each token receives in the last block, mean over heads and queries, with the
windows, shift and padding undone. Swin-v2 calls F.linear with the qkv weight directly, so the
projection cannot be hooked: the last block's window attention is re-run on its own input in
fp32 (``fp32_exact``) and its softmax output taken; the model's own probabilities come from bf16
logits under autocast. Above 256 px the model is resized with ``set_input_size`` (a wider window
rather than unmasked zero padding).
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
        self.hooks.handles.append(
            last.attn.register_forward_pre_hook(self._keep_attention_input, with_kwargs=True))

    def _keep_attention_input(self, _m, args, kwargs) -> None:
        """The last block's attention input: x [B*nW, N, C] (windows) and its shift mask
        [nW, N, N] (None without a shift), as the block passes them."""
        self.hooks.store["attn_x"] = args[0]
        self.hooks.store["attn_mask"] = kwargs.get("mask", args[1] if len(args) > 1 else None)

    def _window_probs(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B*nW, N, C] -> fp32 [B*nW, h, N, N]: the last block's window attention re-run on its
        own input (call inside fp32_exact). ``forward`` is called, not the module, so hooks on the
        attention itself (ours included) stay silent; its softmax is captured once."""
        attn = self.last.attn
        seen: list[torch.Tensor] = []
        handle = attn.softmax.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            attn.forward(x.float(), mask=None if mask is None else mask.float())
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"the last block's attention called its softmax {len(seen)} times "
                               "in one forward: this timm version changed WindowAttention")
        return seen[0]

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
        pre = self.hooks.pop("pre").reshape(b, lay.n_patches, -1)  # [B, T, C], stored as is
        windows, mask = self.hooks.pop("attn_x"), self.hooks.pop("attn_mask")
        with fp32_exact(x.device.type):  # bf16 blocks, fp32 reductions
            attn = self._unwindow(received(self._window_probs(windows, mask)), b)  # [B, T]
            embed = pool_to(self.hooks.pop("embed"), lay.grid)  # [B, h, w, C]
            post = post.float()
            pooled = self.model.forward_head(post, pre_logits=True)  # [B, C]
            return {
                "tokens": pre,
                "norm": pre.float().norm(dim=-1),  # [B, T]
                "attn": attn,
                "nbr_cos": neighbour_cosine(embed),  # [B, T]
                "cls_post": pooled,
                "patch_mean_post": post.reshape(b, lay.n_patches, -1).mean(1),  # [B, C]
            }


FAMILY = register(Family(
    name="swin", adapter=SwinAdapter, classes=("SwinTransformerV2",),
    description="Swin Transformer v2: windowed attention, no CLS; pooled output token",
    attention="attention each token receives in the last block, mean over heads and queries, "
              "windows and shift undone",
    traps="the qkv hook never fires (F.linear on the weight): the last block's window attention "
          "is re-run on its hooked input in fp32 and its softmax taken; at high resolution widen "
          "the window (set_input_size) instead of padding with zero tokens",
))
