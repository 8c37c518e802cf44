"""timm VisionTransformer with an attention-pooling head: SigLIP and SigLIP 2 (`vit_*_siglip_*`).

These models have no CLS token. Their image embedding is the output of ``attn_pool`` (timm
``AttentionPoolLatent``): one learned latent query attends over the output tokens (after the final
norm, as ``forward_head`` feeds it), followed by a projection and an MLP. So:

* ``tokens.attn`` is, as for every model without CLS (and as the paper does for Swin and PVT), the
  attention each token *receives* in the last block, mean over heads and queries (``ViTAdapter``).
* The family adds the per-image array ``attn_pool`` [T] float32: the pooling query's attention
  over the tokens, ``softmax(q_latent · kᵀ · scale)`` mean over heads, recomputed in fp32 from
  the head's own parameters (``pooling_attention``). T counts every token, prefix tokens (a
  test-time register) included, as the head attends over all of them.
* ``cls_post`` is the average of the output patch tokens (the paper's pooled token for models
  without CLS). The model's own pooled embedding, ``forward_head(x, pre_logits=True)`` =
  ``attn_pool(x)``, is a D-vector after the head's projection and MLP, not a token; tokenlake
  does not store it.

The ``_gap_`` variants (``vit_*_siglip_gap_*``) have no pooling head (global average pooling):
they are plain ViTs without CLS and belong to the vit family.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent

from tokenlake.extract._adapters import fp32_exact
from tokenlake.extract._neuronstats import MlpRecord
from tokenlake.extract._registry import Family, register
from tokenlake.extract.families.vit import ViTAdapter

POOL_ARRAY = "attn_pool"


def has_attention_pool(model: torch.nn.Module) -> bool:
    """The family's predicate: a VisionTransformer whose ``attn_pool`` is an AttentionPoolLatent."""
    return isinstance(getattr(model, "attn_pool", None), AttentionPoolLatent)


def pooling_attention(pool: AttentionPoolLatent, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, D] tokens after the final norm -> [B, T]: the latent query's attention over them,
    mean over heads, in fp32 (``fp32_exact``: also under autocast), from the head's q/kv
    projections and q_norm/k_norm, as ``AttentionPoolLatent.forward`` computes it before
    ``attn @ v``."""
    b, t, _ = tokens.shape
    heads, hd = pool.num_heads, pool.head_dim
    width = pool.kv.out_features // 2  # kv = [k | v], each `width` = heads * hd
    with fp32_exact(tokens.device.type):  # the backbone's weights are fp32
        q = pool.q(pool.latent.float())  # [1, 1, h*hd] (q is a Linear, or Identity)
        q = q.reshape(1, 1, heads, hd).transpose(1, 2)  # [1, h, 1, hd]
        bias = pool.kv.bias  # only the k half of the kv projection is needed
        k = F.linear(tokens.float(), pool.kv.weight[:width],
                     None if bias is None else bias[:width])  # [B, T, h*hd]
        k = k.reshape(b, t, heads, hd).transpose(1, 2)  # [B, h, T, hd]
        q, k = pool.q_norm(q), pool.k_norm(k)
        probs = (q.float() @ k.float().transpose(-2, -1) * pool.scale).softmax(-1)  # [B, h, 1, T]
        return probs[:, :, 0].mean(1)  # [B, T]


class SigLIPAdapter(ViTAdapter):
    """ViTAdapter plus the pooling query's attention map (image array ``attn_pool``)."""

    def __init__(self, model, *, img_size: int, blocks: bool, record_mlp: MlpRecord | None = None,
                 ttreg: list[tuple[int, int]] | None = None) -> None:
        pool = model.attn_pool
        if not has_attention_pool(model):
            raise ValueError(f"{type(model).__name__} has no AttentionPoolLatent head "
                             f"(attn_pool is {type(pool).__name__}): not a SigLIP-style model")
        if pool.latent_len != 1:
            raise ValueError(f"the pooling head has {pool.latent_len} latent queries; the "
                             "attn_pool map is defined for one")
        if pool.pos_embed is not None:
            raise ValueError("the pooling head adds a position embedding of its own, which the "
                             "attn_pool map does not implement")
        super().__init__(model, img_size=img_size, blocks=blocks, record_mlp=record_mlp,
                         ttreg=ttreg)
        self.layout = replace(self.layout, family="siglip")
        self.pool = pool
        self.hooks.output(model.norm, "post")  # what forward_head hands to attn_pool

    def image_arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {POOL_ARRAY: ((self.layout.n_tokens,), "float32")}

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().__call__(x)
        post = self.hooks.pop("post")  # [B, T, D] after the final norm
        out[POOL_ARRAY] = pooling_attention(self.pool, post)  # [B, T]
        return out


# (alias, "timm_name.tag", timm's pretrained input size): SigLIP (webli) and SigLIP 2 (v2_webli)
SIGLIP_ALIASES = (
    ("siglip_b", "vit_base_patch16_siglip_224.webli", 224),
    ("siglip_l", "vit_large_patch16_siglip_256.webli", 256),
    ("siglip_so400m", "vit_so400m_patch14_siglip_384.webli", 384),
    ("siglip_v2_b", "vit_base_patch16_siglip_224.v2_webli", 224),
    ("siglip_v2_l", "vit_large_patch16_siglip_256.v2_webli", 256),
    ("siglip_v2_so400m", "vit_so400m_patch14_siglip_224.v2_webli", 224),
    ("siglip_v2_g", "vit_giantopt_patch16_siglip_256.v2_webli", 256),
)

FAMILY = register(Family(
    name="siglip", adapter=SigLIPAdapter, classes=("VisionTransformer",),
    description="timm VisionTransformer with an attention-pooling head (SigLIP, SigLIP 2): no CLS; "
                "adds the pooling query's attention map",
    attention="attention each token receives in the last block, mean over heads and queries; "
              "image array attn_pool: the pooling head's latent query's attention over the output "
              "tokens, mean over heads",
    supports=frozenset({"blocks", "record_mlp", "ttreg"}),
    predicate=has_attention_pool,
    traps="no CLS: cls_post is the mean output patch token, not the pooled embedding "
          "(attn_pool's output); the _gap_ variants have no pooling head (vit family); timm's "
          "eval recipe crops (crop_pct 0.9) and normalises with mean/std 0.5",
    aliases=SIGLIP_ALIASES,
))
