"""One uniform view of ViT, Swin-v2 and PVT-v2: everything the lake keeps, from one forward pass.

An adapter installs forward hooks once and returns, per batch, a dict of device tensors:

    tokens      [B, T, D]   last block's output before the final norm, prefix tokens first
    norm        [B, T]      fp32 L2 norm of ``tokens``
    attn        [B, T]      ViT: CLS attention (last block, mean over heads);
                            Swin/PVT: attention received (mean over heads and queries)
    nbr_cos     [B, Np]     mean cosine of each patch-embedding output with its 4-neighbours
    cls_post    [B, D]      CLS after the final norm (Swin/PVT: average-pooled final-norm token)
    patch_mean_post [B, D]  mean of patch tokens after the final norm
    registers_post [B, R, D] (ViT with registers only)
    mlp_*       (ViT, record_mlp=MlpRecord) per-image register-neuron statistics and, on
                request, mlp_acts [B, L, H, Np] fp16 MLP hidden activations (extract/_neuronstats.py)
    block_norm  [B, L, T]   (blocks=True) output norm of every block
    qkv_norm    [B, L, 3, T] (blocks=True) q, k, v norms of every block

Attention is recomputed from q and k in fp32: timm's fused kernels never form probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenlake.extract._neuronstats import ACTS, MlpRecord, neuron_stats, raw_acts


@dataclass(frozen=True)
class TokenLayout:
    family: str  # "vit" | "swin" | "pvt"
    n_cls: int
    n_reg: int
    grid: tuple[int, int]  # output patch grid (rows, cols)
    cell: int  # input pixels per token side
    pixel_offset: int  # top-left pixel of the stored cell of token (0, 0): 0, the aligned cell
    embed_dim: int
    depth: int  # blocks recorded by --blocks all
    n_ttreg: int = 0  # test-time register (kind 'ttreg'), after cls and trained registers
    mlp_hidden: int = 0  # MLP hidden neurons per block when recorded (--record-mlp), else 0
    mlp_acts: bool = False  # --mlp-acts: the raw MLP activations are stored too
    # where the token's receptive field is centred, relative to its aligned cell: PVT-v2's
    # overlapping convolutions centre token (i, j) on pixel (32i, 32j), half a cell up-left
    rf_offset: int = 0

    @property
    def n_prefix(self) -> int:
        return self.n_cls + self.n_reg + self.n_ttreg

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches


def neighbour_cosine(grid: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] -> [B, H*W]: mean cosine similarity with the 4-neighbours (fewer at borders)."""
    unit = F.normalize(grid.float(), dim=-1)
    right = (unit[:, :, :-1] * unit[:, :, 1:]).sum(-1)  # [B, H, W-1]
    down = (unit[:, :-1] * unit[:, 1:]).sum(-1)  # [B, H-1, W]
    total = torch.zeros(unit.shape[:3], device=unit.device, dtype=unit.dtype)
    total[:, :, :-1] += right
    total[:, :, 1:] += right
    total[:, :-1] += down
    total[:, 1:] += down
    count = torch.zeros(unit.shape[1:3], device=unit.device, dtype=unit.dtype)
    count[:, :-1] += 1
    count[:, 1:] += 1
    count[:-1] += 1
    count[1:] += 1
    return (total / count.clamp(min=1)).flatten(1)


def _pool_to(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] -> [B, h, w, C] by area averaging (a hierarchical model's fine grid to its output grid)."""
    pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2).float(), size)
    return pooled.permute(0, 2, 3, 1)


class _Hooks:
    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def output(self, module: torch.nn.Module, key: str) -> None:
        def hook(_m, _args, out):
            self.store[key] = out

        self.handles.append(module.register_forward_hook(hook))

    def input(self, module: torch.nn.Module, key: str) -> None:
        def hook(_m, args):
            self.store[key] = args[0]

        self.handles.append(module.register_forward_pre_hook(hook))

    def pop(self, key: str) -> torch.Tensor:
        if key not in self.store:
            raise RuntimeError(f"hook {key!r} did not fire: this timm version changed the model")
        return self.store.pop(key)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class Adapter:
    layout: TokenLayout

    def __init__(self, model: torch.nn.Module, *, img_size: int, blocks: bool) -> None:
        self.model = model
        self.img_size = img_size
        self.blocks = blocks
        self.hooks = _Hooks()

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        self.hooks.close()


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
        attn = self.model.blocks[block].attn
        b, t, _ = qkv.shape
        q, k, v = qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B, h, T, hd]
        return attn.q_norm(q), attn.k_norm(k), v

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lay = self.layout
        post = self.model.forward_features(x)  # [B, T, D] after the final norm
        pre = self.hooks.pop("pre")  # [B, T, D]
        q, k, v = self._q_k_v(self.hooks.pop("qkv"))
        scale = self.model.blocks[-1].attn.scale
        if lay.n_cls:
            logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0].float(), k.float()) * scale
            attn = logits.softmax(-1).mean(1)  # [B, T]
        else:
            probs = (q.float() @ k.float().transpose(-2, -1) * scale).softmax(-1)  # [B, h, T, T]
            attn = probs.mean((1, 2))
        embed = self.hooks.pop("embed")  # [B, Np, D] or [B, H, W, D]
        embed = embed.reshape(embed.shape[0], *lay.grid, embed.shape[-1])
        patches_post = post[:, lay.n_prefix:]
        out = {
            "tokens": pre,
            "norm": pre.float().norm(dim=-1),
            "attn": attn,
            "nbr_cos": neighbour_cosine(embed),
            "cls_post": (post[:, 0] if lay.n_cls else patches_post.mean(1)).float(),
            "patch_mean_post": patches_post.float().mean(1),
        }
        if lay.n_reg:
            out["registers_post"] = post[:, lay.n_cls:lay.n_cls + lay.n_reg].float()
        if self.blocks:
            norms = [self.hooks.pop(f"block{i}").float().norm(dim=-1) for i in range(lay.depth)]
            out["block_norm"] = torch.stack(norms, 1)  # [B, L, T]
            per_block = [self._q_k_v(self.hooks.pop(f"qkv{i}"), i) for i in range(lay.depth - 1)]
            out["qkv_norm"] = torch.stack([  # [B, L, 3, T], over all heads (q, k after q/k_norm)
                torch.stack([t.transpose(1, 2).flatten(2).float().norm(dim=-1) for t in qkv], 1)
                for qkv in [*per_block, (q, k, v)]], 1)
        if self.record_mlp is not None:  # after block_norm, which decides the outliers
            acts = [self.hooks.pop(f"mlp{i}") for i in range(lay.depth)]  # L x [B, T, H]
            if self.record_mlp.acts:
                out[ACTS] = raw_acts(acts, lay.n_prefix)  # [B, L, H, Np] fp16
            out.update(neuron_stats(acts, out["block_norm"], lay.n_prefix, self.record_mlp))
        return out


def _received(probs: torch.Tensor) -> torch.Tensor:
    """[B, h, Nq, Nk] -> [B, Nk]: attention each key receives, mean over heads and queries."""
    return probs.float().mean((1, 2))


class SwinAdapter(Adapter):
    def __init__(self, model, *, img_size: int, blocks: bool) -> None:
        super().__init__(model, img_size=img_size, blocks=blocks)
        if blocks:
            raise ValueError("--blocks all is implemented for ViTs only (appendix A of the paper)")
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
        attn = self._unwindow(_received(self.hooks.pop("probs")), b)
        embed = _pool_to(self.hooks.pop("embed"), lay.grid)  # [B, h, w, C]
        pooled = self.model.forward_head(post, pre_logits=True).float()  # [B, C]
        return {
            "tokens": pre,
            "norm": pre.float().norm(dim=-1),
            "attn": attn,
            "nbr_cos": neighbour_cosine(embed),
            "cls_post": pooled,
            "patch_mean_post": post.float().reshape(b, lay.n_patches, -1).mean(1),
        }


class PVTAdapter(Adapter):
    def __init__(self, model, *, img_size: int, blocks: bool) -> None:
        super().__init__(model, img_size=img_size, blocks=blocks)
        if blocks:
            raise ValueError("--blocks all is implemented for ViTs only (appendix A of the paper)")
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
        probs = (q.float() @ k.float().transpose(-2, -1) * self.attn.scale).softmax(-1)
        embed = _pool_to(self.hooks.pop("embed"), lay.grid)
        pooled = post.float().mean(1)  # what forward_head(pre_logits=True) averages
        return {
            "tokens": pre,
            "norm": pre.float().norm(dim=-1),
            "attn": _received(probs),
            "nbr_cos": neighbour_cosine(embed),
            "cls_post": pooled,
            "patch_mean_post": pooled,
        }


def make_adapter(model: torch.nn.Module, *, img_size: int, blocks: bool = False,
                 record_mlp: MlpRecord | None = None,
                 ttreg: list[tuple[int, int]] | None = None) -> Adapter:
    name = type(model).__name__
    if name == "VisionTransformer":
        return ViTAdapter(model, img_size=img_size, blocks=blocks, record_mlp=record_mlp,
                          ttreg=ttreg)
    if record_mlp is not None or ttreg is not None:
        raise ValueError("--record-mlp and --test-time-registers are implemented for ViTs only")
    if name == "SwinTransformerV2":
        return SwinAdapter(model, img_size=img_size, blocks=blocks)
    if name == "PyramidVisionTransformerV2":
        return PVTAdapter(model, img_size=img_size, blocks=blocks)
    raise ValueError(
        f"tokenlake does not know how to extract tokens from a {name}; supported: timm "
        "VisionTransformer, SwinTransformerV2, PyramidVisionTransformerV2"
    )
