"""Every per-token quantity equals an independent recomputation, on random-weight models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.layers import to_2tuple

from tokenlake.extract import create_backbone, make_adapter, resolve_model, resolve_weights
from tokenlake.extract._preprocess import token_cells
from tokenlake.extract.oracles import nbr_cos_by_loops, probs_from_unfused

RANDOM = resolve_weights("random")


def _model(alias: str, px: int):
    torch.manual_seed(1)
    return create_backbone(resolve_model(alias), weights=RANDOM, img_size=px)


@pytest.mark.parametrize("alias", ["dinov2_s_reg4", "dinov2_s", "deit3_s"])
def test_vit_matches_independent_computation(alias):
    px = 70 if "dinov2" in alias else 64
    model = _model(alias, px)
    adapter = make_adapter(model, img_size=px, blocks=True)
    x = torch.randn(2, 3, px, px)
    with torch.no_grad():
        out = adapter(x)
        lay = adapter.layout
        # pre-norm tokens, by timm's forward_intermediates
        spatial, prefix = model.forward_intermediates(
            x, indices=[len(model.blocks) - 1], norm=False, intermediates_only=True,
            return_prefix_tokens=True)[0]
        ref = torch.cat([prefix, spatial.flatten(2).transpose(1, 2)], 1)
        torch.testing.assert_close(out["tokens"], ref)
        post = model.forward_features(x)
        probs = probs_from_unfused(model.blocks[-1].attn, lambda: model.forward_features(x))
        embed = model.patch_embed(x).reshape(2, *lay.grid, -1).numpy()
    assert lay.n_reg == (4 if "reg4" in alias else 0) and lay.n_cls == 1
    np.testing.assert_allclose(out["norm"], np.linalg.norm(ref.numpy(), axis=-1), rtol=1e-5)
    torch.testing.assert_close(out["attn"], probs[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["cls_post"], post[:, 0])
    torch.testing.assert_close(out["patch_mean_post"], post[:, lay.n_prefix:].mean(1))
    if lay.n_reg:
        torch.testing.assert_close(out["registers_post"], post[:, 1:lay.n_prefix])
        assert out["attn"][:, lay.n_prefix:].sum(-1).max() < 1  # registers take a share: no renormalising
    for b in range(2):
        np.testing.assert_allclose(out["nbr_cos"][b], nbr_cos_by_loops(embed[b]), atol=1e-5)
    # per-block norms: the last block's output is the pre-norm token
    torch.testing.assert_close(out["block_norm"][:, -1], out["norm"])
    assert out["block_norm"].shape == (2, len(model.blocks), lay.n_tokens)
    assert out["qkv_norm"].shape == (2, len(model.blocks), 3, lay.n_tokens)


def test_vit_qkv_norms_of_every_block_match_the_projection():
    """Appendix A.2 reads q/k/v maps across blocks (19-20 of DINOv2-L): every block's, from its
    own qkv projection of its own norm1 output."""
    model = _model("dinov2_s_reg4", 56)
    adapter = make_adapter(model, img_size=56, blocks=True)
    x = torch.randn(1, 3, 56, 56)
    seen, handles = {}, []
    for b, blk in enumerate(model.blocks):
        handles.append(blk.norm1.register_forward_hook(
            lambda _m, _a, o, b=b: seen.setdefault(b, o)))
    with torch.no_grad():
        out = adapter(x)
    for h in handles:
        h.remove()
    d = model.embed_dim
    for b, blk in enumerate(model.blocks):
        with torch.no_grad():
            qkv = (seen[b] @ blk.attn.qkv.weight.T + blk.attn.qkv.bias)[0]  # [T, 3D]
        for i in range(3):
            np.testing.assert_allclose(out["qkv_norm"][0, b, i],
                                       qkv[:, i * d:(i + 1) * d].norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(out["qkv_norm"][0, 0], out["qkv_norm"][0, -1])


def _swin_received(attn, x: torch.Tensor) -> torch.Tensor:
    """Swin-v2 window attention written out from its parameters: [B_, N, C] -> [B_, N]."""
    b_, n, _c = x.shape
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = (x @ attn.qkv.weight.T + bias).reshape(b_, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    logits = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
    logits = logits * torch.clamp(attn.logit_scale, max=np.log(100.0)).exp()
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    rel = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    probs = (logits + 16 * torch.sigmoid(rel)).softmax(-1)
    return probs.mean((1, 2))


def test_swin_matches_independent_computation():
    model = _model("swinv2_t", 256)
    adapter = make_adapter(model, img_size=256)
    last = model.layers[-1].blocks[-1]
    seen = {}
    handle = last.attn.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        out = adapter(x)
        handle.remove()
        ref = model.forward_intermediates(x, indices=[3], norm=False, intermediates_only=True)[0]
        ref = ref.flatten(2).transpose(1, 2)  # [B, 64, C]
        received = _swin_received(last.attn, seen["x"])
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        embed = torch.nn.functional.avg_pool2d(model.patch_embed(x).permute(0, 3, 1, 2), 8)
    assert adapter.layout.grid == (8, 8) and adapter.layout.n_prefix == 0
    torch.testing.assert_close(out["tokens"], ref)
    torch.testing.assert_close(out["attn"], received, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["cls_post"], pooled)
    for b in range(2):
        np.testing.assert_allclose(out["nbr_cos"][b], nbr_cos_by_loops(
            embed[b].permute(1, 2, 0).numpy()), atol=1e-5)


def test_swin_windows_are_undone_with_timm_partition():
    from timm.models.swin_transformer_v2 import window_partition

    model = _model("swinv2_t", 256)
    adapter = make_adapter(model, img_size=256)
    # pretend a 16x16 grid in windows of 8 with a shift of 4, as at 512 px
    adapter.layout = type(adapter.layout)(**{**adapter.layout.__dict__, "grid": (16, 16)})
    adapter.last.window_size, adapter.last.shift_size = to_2tuple(8), to_2tuple(4)
    index = torch.arange(256, dtype=torch.float32).reshape(1, 16, 16, 1)
    windows = window_partition(torch.roll(index, shifts=(-4, -4), dims=(1, 2)), (8, 8))
    restored = adapter._unwindow(windows.reshape(4, 64), batch=1)
    torch.testing.assert_close(restored, index.reshape(1, 256))


def test_pvt_matches_independent_computation():
    model = _model("pvt_b0", 224)
    adapter = make_adapter(model, img_size=224)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = adapter(x)
        # pre-norm tokens by walking the stages by hand and skipping the last stage's norm
        h = model.patch_embed(x)
        for stage in model.stages[:-1]:
            h = stage(h)
        last = model.stages[-1]
        h = last.downsample(h)
        feat = h.shape[1:3]
        h = h.reshape(2, -1, h.shape[-1])
        for blk in last.blocks:
            h = blk(h, feat)
        probs = probs_from_unfused(last.blocks[-1].attn, lambda: model.forward_features(x))
        post = model.forward_features(x)  # [B, C, 7, 7]
        embed = torch.nn.functional.avg_pool2d(model.patch_embed(x).permute(0, 3, 1, 2), 8)
    torch.testing.assert_close(out["tokens"], h)
    torch.testing.assert_close(out["attn"], probs.mean((1, 2)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["cls_post"], post.mean((2, 3)))
    for b in range(2):
        np.testing.assert_allclose(out["nbr_cos"][b], nbr_cos_by_loops(
            embed[b].permute(1, 2, 0).numpy()), atol=1e-5)


def test_token_cells_are_the_pixels_under_each_token():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    vit = token_cells(pixels, grid=(4, 4), cell=16, offset=0)
    np.testing.assert_array_equal(vit[1, 2 * 4 + 3], pixels[1, 32:48, 48:64])
    # PVT: token (i, j) is centred on pixel (32i, 32j); outside the image is zero
    pvt = token_cells(pixels, grid=(2, 2), cell=32, offset=-16)
    np.testing.assert_array_equal(pvt[0, 3], pixels[0, 16:48, 16:48])
    np.testing.assert_array_equal(pvt[0, 0, 16:, 16:], pixels[0, :16, :16])
    assert not pvt[0, 0, :16].any()


def test_unsupported_architecture_is_refused_clearly():
    import timm

    with pytest.raises(ValueError, match="does not know how to extract"):
        make_adapter(timm.create_model("resnet18", pretrained=False), img_size=224)


@torch.no_grad()
def test_pvt_attention_is_fp32_under_bf16_autocast():
    """Autocast re-casts `.float()` matmul operands to bf16: the received attention must be the
    fp32 softmax of the very q and k the bf16 forward produced (~0.5% off otherwise)."""
    model = _model("pvt_b0", 64)
    adapter = make_adapter(model, img_size=64)
    attn, seen = model.stages[-1].blocks[-1].attn, {}
    hooks = [attn.q.register_forward_hook(lambda _m, _a, o: seen.__setitem__("q", o)),
             attn.kv.register_forward_hook(lambda _m, _a, o: seen.__setitem__("kv", o))]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x)
    for h in hooks:
        h.remove()
    adapter.close()
    b, t, _ = seen["q"].shape
    q = seen["q"].double().reshape(b, t, attn.num_heads, -1).transpose(1, 2)  # [B, h, T, hd]
    k = seen["kv"].double().reshape(b, t, 2, attn.num_heads, -1)[:, :, 0].transpose(1, 2)
    want = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1).mean((1, 2))  # [B, T]
    assert out["attn"].dtype == torch.float32
    np.testing.assert_allclose(out["attn"], want, atol=2e-6, rtol=1e-5)
