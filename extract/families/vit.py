"""timm VisionTransformer: DINO, DINOv2 (± registers), DeiT3, OpenCLIP, C-RADIO, AIMv2, and any ViT
with a fused qkv projection (CLS and trained registers from ``num_prefix_tokens``). SigLIP's
attention-pooling ViTs have a family of their own (siglip.py).

The last block's attention is recomputed from its qkv projection (q_norm/k_norm applied) in fp32
(``fp32_exact``: no autocast, no TF32):
with a CLS token, the CLS row, mean over heads; without one, the attention each token receives,
mean over heads and queries. With registers the CLS row also attends to them and is not
renormalised over the patches.
"""

from __future__ import annotations

import torch

from tokenlake.extract._adapters import Adapter, TokenLayout, fp32_exact, neighbour_cosine
from tokenlake.extract._neuronstats import MlpRecord, mlp_outputs
from tokenlake.extract._registry import Family, register


class ViTAdapter(Adapter):
    def __init__(self, model, *, img_size: int, blocks: bool, record_mlp: MlpRecord | None = None,
                 ttreg: list[tuple[int, int]] | None = None) -> None:
        """record_mlp: also return the register-neuron statistics (and the raw activations when
        ``record_mlp.acts``); needs blocks=True, whose output norms decide the outliers. ttreg:
        None = no test-time register (the model is untouched); a list of (block, neuron) = insert
        one (extract/_ttreg.py) moving those neurons."""
        super().__init__(model, img_size=img_size, blocks=blocks)
        if record_mlp is not None and not blocks:
            raise ValueError("record_mlp needs blocks=True: its outliers are decided at every "
                             "block's output norm")
        if not hasattr(model.blocks[-1].attn, "qkv"):
            raise ValueError(f"{type(model.blocks[-1].attn).__name__} has no fused qkv projection")
        patch = model.patch_embed.patch_size[0]
        gh, gw = model.patch_embed.grid_size
        n_cls = 1 if model.cls_token is not None else 0
        n_reg = model.num_prefix_tokens - n_cls
        self.record_mlp = record_mlp
        self.ttreg = None
        if ttreg is not None:
            from tokenlake.extract._ttreg import TTRegister

            self.ttreg = TTRegister(model, ttreg)  # before our hooks: they see its edits
        self.layout = TokenLayout(
            family="vit", n_cls=n_cls, n_reg=n_reg, grid=(gh, gw),
            cell=patch, pixel_offset=0, embed_dim=model.embed_dim, depth=len(model.blocks),
            n_ttreg=0 if ttreg is None else 1,
            mlp_hidden=int(model.blocks[0].mlp.fc2.in_features) if record_mlp else 0,
            mlp_acts=bool(record_mlp and record_mlp.acts),
        )
        self.hooks.input(model.norm, "pre")
        self.hooks.output(model.patch_embed, "embed")
        self.hooks.output(model.blocks[-1].attn.qkv, "qkv")
        if blocks:
            for i, block in enumerate(model.blocks):
                self.hooks.output(block, f"block{i}")
                if i < len(model.blocks) - 1:  # the last block's qkv is hooked above
                    self.hooks.output(block.attn.qkv, f"qkv{i}")
        if record_mlp is not None:
            for i, block in enumerate(model.blocks):
                self.hooks.input(block.mlp.fc2, f"mlp{i}")

    def close(self) -> None:
        super().close()
        if self.ttreg is not None:
            self.ttreg.close()

    def _q_k_v(self, qkv: torch.Tensor, block: int = -1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's qkv projection output [B, T, 3A] -> fp32 q, k (after q_norm/k_norm, as the
        attention forms them: autocast runs those norms in fp32 too) and v, each [B, h, T, hd].
        Call inside fp32_exact()."""
        attn = self.model.blocks[block].attn
        b, t, _ = qkv.shape
        q, k, v = qkv.float().reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q), attn.k_norm(k), v

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lay = self.layout
        post = self.model.forward_features(x)  # [B, T, D] after the final norm
        pre = self.hooks.pop("pre")  # [B, T, D], the model's compute dtype: stored as is
        # bf16 blocks, fp32 reductions: autocast would re-cast the .float() operands of the matmuls
        with fp32_exact(x.device.type):
            out = {"tokens": pre, **self._reduce(pre, post)}
        if self.record_mlp is not None:  # after block_norm, which decides the outliers
            acts = [self.hooks.pop(f"mlp{i}") for i in range(lay.depth)]  # L x [B, T, H]
            out.update(mlp_outputs(acts, out["block_norm"], lay.n_prefix, self.record_mlp))
        return out

    def _reduce(self, pre: torch.Tensor, post: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every fp32 quantity of the batch, from the hooked activations (inside fp32_exact)."""
        lay = self.layout
        q, k, v = self._q_k_v(self.hooks.pop("qkv"))  # [B, h, T, hd] fp32
        scale = self.model.blocks[-1].attn.scale
        if lay.n_cls:
            logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0], k) * scale  # [B, h, T]
            attn = logits.softmax(-1).mean(1)  # [B, T]
        else:
            probs = (q @ k.transpose(-2, -1) * scale).softmax(-1)  # [B, h, T, T]
            attn = probs.mean((1, 2))  # [B, T]
        embed = self.hooks.pop("embed")  # [B, Np, D] or [B, H, W, D]
        embed = embed.reshape(embed.shape[0], *lay.grid, embed.shape[-1])
        post = post.float()
        patches_post = post[:, lay.n_prefix:]  # [B, Np, D]
        out = {
            "norm": pre.float().norm(dim=-1),  # [B, T]
            "attn": attn,
            "nbr_cos": neighbour_cosine(embed),  # [B, Np]
            "cls_post": post[:, 0] if lay.n_cls else patches_post.mean(1),  # [B, D]
            "patch_mean_post": patches_post.mean(1),  # [B, D]
        }
        if lay.n_reg:
            out["registers_post"] = post[:, lay.n_cls:lay.n_cls + lay.n_reg]  # [B, R, D]
        if self.blocks:
            norms = [self.hooks.pop(f"block{i}").float().norm(dim=-1) for i in range(lay.depth)]
            out["block_norm"] = torch.stack(norms, 1)  # [B, L, T]
            per_block = [self._q_k_v(self.hooks.pop(f"qkv{i}"), i) for i in range(lay.depth - 1)]
            out["qkv_norm"] = torch.stack([  # [B, L, 3, T], over all heads (q, k after q/k_norm)
                torch.stack([t.transpose(1, 2).flatten(2).norm(dim=-1) for t in qkv], 1)
                for qkv in [*per_block, (q, k, v)]], 1)
        return out


# Register-era models that are plain timm VisionTransformers (docs/MODELS.md, "Extracting RADIO,
# SigLIP and AIMv2"): (alias, "timm_name.tag", timm's pretrained input size). RADIO's prefix tokens
# (CLS + 7 in v3, CLS + 9 in v4) and AIMv2's none are read from the model, never from these names.
REGISTER_ERA_ALIASES = (
    ("radio_b", "vit_base_patch16_radio_v3.c_radio", 512),
    ("radio_l", "vit_large_patch16_radio_v3.c_radio", 512),
    ("radio_h", "vit_huge_patch16_radio_v3.c_radio", 512),
    ("radio_g", "vit_giant_patch16_radio_v3.c_radio", 512),
    ("radio_v4_h", "vit_huge_patch16_radio_v4.c_radio", 512),
    ("radio_v4_so400m", "vit_so400m_patch16_radio_v4.c_radio", 512),
    ("aimv2_l", "aimv2_large_patch14_224.apple_pt", 224),
    ("aimv2_h", "aimv2_huge_patch14_224.apple_pt", 224),
    ("aimv2_1b", "aimv2_1b_patch14_224.apple_pt", 224),
    ("aimv2_3b", "aimv2_3b_patch14_224.apple_pt", 224),
)

FAMILY = register(Family(
    name="vit", adapter=ViTAdapter, classes=("VisionTransformer",),
    description="timm VisionTransformer: CLS (or none), trained registers, patches",
    attention="with CLS: the last block's CLS attention, mean over heads; without CLS: "
              "attention each token receives, mean over heads and queries",
    supports=frozenset({"blocks", "record_mlp", "ttreg"}),
    traps="fused attention never forms probabilities: recomputed from the last block's qkv; "
          "with registers the CLS row is not renormalised over the patches; RADIO's 'registers' "
          "include its other teachers' CLS tokens (v3: 7, v4: 9) and its final norm is Identity "
          "(pre = post tokens); AIMv2's final norm is an RmsNorm, and its patch_embed ends with "
          "one",
    aliases=REGISTER_ERA_ALIASES,
))
