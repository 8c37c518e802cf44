"""timm Eva: DINOv3 (CLS + 4 storage tokens, rotary position embedding) and EVA-02 (CLS, rotary
plus absolute position embedding), and any Eva whose blocks use ``EvaAttention``.

What differs from a ViT (extract/families/vit.py), and how it is read here:

* **Rotary embedding.** ``Eva._pos_embed`` returns ``(x, rope)``; every ``EvaAttention`` rotates
  q and k (after ``q_norm``/``k_norm``) of the tokens after its own ``num_prefix_tokens`` only, so
  CLS and storage tokens are never rotated. The attention is recomputed from the q and k the model
  formed: forward hooks on ``attn.q_norm`` and ``attn.k_norm`` (called on every path, Identity
  included) and the ``rope`` argument of the attention (a forward pre-hook with kwargs), rotated
  with timm's own ``apply_rot_embed_cat`` and the attention's ``rotate_half``, then
  ``softmax(q·kᵀ·scale)`` in fp32 (``fp32_exact``: autocast and TF32 off).
* **No hook on qkv.** With a q bias (EVA-02, DINOv3 ``_qkvb``) EvaAttention calls
  ``F.linear(x, qkv.weight, bias)`` directly, so a hook on ``attn.qkv`` never fires; EVA-02 B/L have
  separate ``q_proj``/``k_proj``/``v_proj``. v (for ``--blocks all``) is projected again from the
  attention's input with the model's own weights (``_v``).
* **q/k norms** (``--blocks all``) are of q and k as they enter the attention product: after
  ``q_norm``/``k_norm`` and after the rotation. A rotation preserves each head vector's norm, so
  they equal the pre-rotation norms up to float rounding (tested).
* **Patch embedding**: DINOv3 (``dynamic_img_size``) returns ``[B, H, W, D]``, EVA-02 ``[B, N, D]``;
  both are before any position embedding.
* **Final norm**: ``model.norm`` (DINOv3: LayerNorm; EVA-02 MIM checkpoints: Identity, their trained
  norm is ``fc_norm`` after pooling). ``tokens`` is its input, as for every family.
* **MLP neurons** (``--record-mlp``, extract/_ttreg.py): the input of ``blocks[b].mlp.fc2`` — GELU
  output for ``Mlp`` (DINOv3 S/B/L), the gated product ``silu(gate) * x`` for ``SwiGLU`` (DINOv3
  S+/H+/7B) and ``GluMlp`` (EVA-02 T/S), and for EVA-02 B/L that product *after the MLP's
  LayerNorm* (``scale_mlp``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat

from tokenlake.extract._adapters import Adapter, TokenLayout, fp32_exact, neighbour_cosine
from tokenlake.extract._neuronstats import MlpRecord, mlp_outputs
from tokenlake.extract._registry import Family, register


def _check_attention(model: torch.nn.Module) -> None:
    """Refuse, by name, Eva variants whose attention this adapter does not read."""
    for i, block in enumerate(model.blocks):
        attn = block.attn
        name = type(attn).__name__
        if name != "EvaAttention":
            raise ValueError(
                f"{type(model).__name__}.blocks[{i}].attn is {name} (grouped-query attention, "
                "e.g. Sapiens2): the eva family reads EvaAttention only")
        if attn.q_norm is attn.k_norm:
            raise ValueError(f"blocks[{i}].attn shares one q/k norm module: q and k cannot be told "
                             "apart by their hooks")


def rotate(attn: torch.nn.Module, t: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """q or k [B, h, T, hd] -> fp32 [B, h, T, hd] with the rotary embedding applied as
    EvaAttention.forward does: only to the tokens after ``attn.num_prefix_tokens``."""
    t = t.float()
    if rope is None:  # no rotary embedding (EVA-01)
        return t
    npt = attn.num_prefix_tokens
    # [B, h, Np, hd]: timm's own rotation, in the attention's layout (rotate_half or interleaved)
    rotated = apply_rot_embed_cat(t[:, :, npt:], rope.float(), half=attn.rotate_half)
    return torch.cat([t[:, :, :npt], rotated], dim=2)


def _v(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention's v [B, T, A] (all heads concatenated) from its input x [B, T, D], with the
    model's own weights (in the dtype autocast gives the model's projection)."""
    if attn.qkv is not None:  # fused: rows [2A:3A] of the weight, and v_bias
        a = attn.qkv.weight.shape[0] // 3
        return F.linear(x, attn.qkv.weight[2 * a:], attn.v_bias)
    return F.linear(x, attn.v_proj.weight, attn.v_proj.bias)


class EvaAdapter(Adapter):
    def __init__(self, model, *, img_size: int, blocks: bool, record_mlp: MlpRecord | None = None,
                 ttreg: list[tuple[int, int]] | None = None) -> None:
        """As ViTAdapter: record_mlp needs blocks=True; ttreg: a list of (block, neuron) moved to
        one test-time register (extract/_ttreg.py), None = the model is untouched."""
        super().__init__(model, img_size=img_size, blocks=blocks)
        if record_mlp is not None and not blocks:
            raise ValueError("record_mlp needs blocks=True: its outliers are decided at every "
                             "block's output norm")
        _check_attention(model)
        patch = model.patch_embed.patch_size[0]
        gh, gw = model.patch_embed.grid_size
        n_cls = 1 if model.cls_token is not None else 0
        n_reg = model.num_prefix_tokens - n_cls  # DINOv3: its 4 storage tokens
        depth = len(model.blocks)
        self.record_mlp = record_mlp
        self.ttreg = None
        if ttreg is not None:
            from tokenlake.extract._ttreg import TTRegister

            self.ttreg = TTRegister(model, ttreg)  # before our hooks: they see its edits
        self.layout = TokenLayout(
            family="eva", n_cls=n_cls, n_reg=n_reg, grid=(gh, gw), cell=patch, pixel_offset=0,
            embed_dim=model.embed_dim, depth=depth, n_ttreg=0 if ttreg is None else 1,
            mlp_hidden=int(model.blocks[0].mlp.fc2.in_features) if record_mlp else 0,
            mlp_acts=bool(record_mlp and record_mlp.acts),
        )
        self.hooks.input(model.norm, "pre")
        self.hooks.output(model.patch_embed, "embed")
        for i in range(depth) if blocks else [depth - 1]:
            self._watch_attention(i)
        if blocks:
            for i, block in enumerate(model.blocks):
                self._watch_output(block, i)
        if record_mlp is not None:
            for i, block in enumerate(model.blocks):
                self.hooks.input(block.mlp.fc2, f"mlp{i}")

    def _watch_attention(self, i: int) -> None:
        """Hooks on block i's attention: its input and rope (pre-hook), q and k after q_norm/k_norm;
        when it returns, reduce them to what the run keeps (q/k/v norms, the last block's
        attention), so no block's q and k outlive its own attention."""
        attn = self.model.blocks[i].attn
        seen: dict[str, torch.Tensor | None] = {}
        store = self.hooks.store
        last = i == len(self.model.blocks) - 1

        def before(_m, args, kwargs):
            seen["x"] = args[0]  # [B, T, D]
            seen["rope"] = kwargs.get("rope", args[1] if len(args) > 1 else None)

        def keep(key):
            def hook(_m, _args, out):
                seen[key] = out  # [B, h, T, hd]
            return hook

        def after(_m, _args, _out):
            x, rope = seen.pop("x"), seen.pop("rope")
            if "q" not in seen or "k" not in seen:
                raise RuntimeError(f"blocks[{i}].attn ran without calling q_norm/k_norm: this timm "
                                   "version changed EvaAttention")
            q, k = seen.pop("q"), seen.pop("k")
            v = _v(attn, x) if self.blocks else None  # [B, T, A], the model's compute dtype
            with fp32_exact(x.device.type):  # fp32, also under bf16 autocast or with TF32 allowed
                q, k = rotate(attn, q, rope), rotate(attn, k, rope)  # [B, h, T, hd] fp32
                if self.blocks:
                    store[f"qkv{i}"] = torch.stack([  # [B, 3, T], over all heads
                        q.pow(2).sum((1, 3)).sqrt(), k.pow(2).sum((1, 3)).sqrt(),
                        v.float().norm(dim=-1)], 1)
                if last:
                    if self.layout.n_cls:  # the CLS row: [B, h, T] -> mean over heads
                        logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0], k) * attn.scale
                        store["attn"] = logits.softmax(-1).mean(1)  # [B, T]
                    else:  # attention each token receives, mean over heads and queries
                        probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)  # [B, h, T, T]
                        store["attn"] = probs.mean((1, 2))  # [B, T]

        handles = self.hooks.handles
        handles.append(attn.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(attn.q_norm.register_forward_hook(keep("q")))
        handles.append(attn.k_norm.register_forward_hook(keep("k")))
        handles.append(attn.register_forward_hook(after))

    def _watch_output(self, block: torch.nn.Module, i: int) -> None:
        store = self.hooks.store

        def hook(_m, _args, out):  # [B, T, D] -> [B, T] fp32, reduced at once
            with fp32_exact(out.device.type):
                store[f"block{i}"] = out.float().norm(dim=-1)

        self.hooks.handles.append(block.register_forward_hook(hook))

    def close(self) -> None:
        super().close()
        if self.ttreg is not None:
            self.ttreg.close()

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lay = self.layout
        post = self.model.forward_features(x)  # [B, T, D] after the final norm
        pre = self.hooks.pop("pre")  # [B, T, D], the model's compute dtype: stored as is
        embed = self.hooks.pop("embed")  # [B, H, W, D] (DINOv3) or [B, Np, D] (EVA-02)
        embed = embed.reshape(embed.shape[0], *lay.grid, embed.shape[-1])
        with fp32_exact(x.device.type):  # bf16 blocks, fp32 reductions
            post = post.float()
            patches_post = post[:, lay.n_prefix:]  # [B, Np, D]
            out = {
                "tokens": pre,
                "norm": pre.float().norm(dim=-1),  # [B, T]
                "attn": self.hooks.pop("attn"),  # [B, T], reduced by the attention's hook
                "nbr_cos": neighbour_cosine(embed),  # [B, Np]
                "cls_post": post[:, 0] if lay.n_cls else patches_post.mean(1),  # [B, D]
                "patch_mean_post": patches_post.mean(1),  # [B, D]
            }
        if lay.n_reg:
            out["registers_post"] = post[:, lay.n_cls:lay.n_cls + lay.n_reg]  # [B, R, D] fp32
        if self.blocks:
            out["block_norm"] = torch.stack(  # [B, L, T]
                [self.hooks.pop(f"block{i}") for i in range(lay.depth)], 1)
            out["qkv_norm"] = torch.stack(  # [B, L, 3, T]
                [self.hooks.pop(f"qkv{i}") for i in range(lay.depth)], 1)
        if self.record_mlp is not None:  # after block_norm, which decides the outliers
            acts = [self.hooks.pop(f"mlp{i}") for i in range(lay.depth)]  # L x [B, T, H]
            out.update(mlp_outputs(acts, out["block_norm"], lay.n_prefix, self.record_mlp))
        return out


def _aliases() -> tuple[tuple[str, str, int], ...]:
    """Each at timm's pretrained input size (its pretrained cfg): DINOv3 256 px (16 x 16 patches),
    EVA-02 MIM 224 px (16 x 16 patches of 14 px)."""
    rows = [(f"dinov3_{size}", f"vit_{arch}_patch16_dinov3.lvd1689m", 256)
            for size, arch in (("s", "small"), ("splus", "small_plus"), ("b", "base"),
                               ("l", "large"), ("hplus", "huge_plus"), ("7b", "7b"))]
    rows += [(f"eva02_{size}", f"eva02_{arch}_patch14_224.mim_in22k", 224)
             for size, arch in (("t", "tiny"), ("s", "small"), ("b", "base"), ("l", "large"))]
    return tuple(rows)


FAMILY = register(Family(
    name="eva", adapter=EvaAdapter, classes=("Eva",),
    description="timm Eva (rotary position embedding): DINOv3 (CLS + 4 storage tokens, stored as "
                "'reg'), EVA-02 (CLS), patches",
    attention="with CLS: the last block's CLS attention, mean over heads, recomputed from q and k "
              "after q_norm/k_norm and the rotary embedding (patch tokens only, as the model); "
              "without CLS: attention each token receives, mean over heads and queries",
    supports=frozenset({"blocks", "record_mlp", "ttreg"}),
    traps="a hook on attn.qkv never fires with a q bias (F.linear on the weight): q and k are "
          "hooked after q_norm/k_norm and rotated as the model does; DINOv3's patch_embed returns "
          "[B, H, W, D]; EVA-02 MIM's final norm is Identity; each EvaAttention keeps its own "
          "num_prefix_tokens (which tokens get rope): a test-time register raises every one "
          "(docs/MODELS.md, 'Extracting DINOv3 and EVA-02: traps')",
    aliases=_aliases(),
))
