"""The eva family (timm's `Eva`: DINOv3, EVA-02) against timm's own computations and the
definitions written out, on random-weight models at small resolutions. Random weights throughout:
these numbers say nothing about the trained networks. The in-process tests first redraw every 1-D
parameter (biases, q/v biases, norm weights, layer scales) and sharpen the attention, so that a
missing bias, norm, layer scale or rotation cannot hide behind timm's initialisation (zeros, ones,
layer scale 1e-5, near-uniform attention)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.eva import Eva

from tokenlake.cli.main import main
from tokenlake.extract import (
    create_backbone,
    family_of,
    make_adapter,
    resolve_model,
    resolve_weights,
)
from tokenlake.extract._models import all_aliases
from tokenlake.extract._neuronstats import MlpRecord
from tokenlake.extract._ttreg import TTRegister
from tokenlake.extract.oracles import nbr_cos_by_loops, probs_from_unfused
from tokenlake.extract.testing import write_blob_folder
from tokenlake.store import open_lake

# key: (timm name, px, timm kwargs). What each one exercises:
VARIANTS = {
    # Mlp (GELU), fused qkv without bias, rotate-half rope, patch_embed -> [B, H, W, D]
    "dinov3_s": ("vit_small_patch16_dinov3.lvd1689m", 64, {}),
    # q/v bias: EvaAttention calls F.linear on qkv.weight (a hook on qkv never fires)
    "dinov3_s_qkvb": ("vit_small_patch16_dinov3_qkvb.lvd1689m", 64, {}),
    # SwiGLU (separate gate and value projections, hidden aligned to 8)
    "dinov3_splus": ("vit_small_plus_patch16_dinov3.lvd1689m", 64, {}),
    # GluMlp (packed SwiGLU, gate first), absolute + interleaved rope, fused qkv with q/v bias,
    # Identity final norm
    "eva02_t": ("eva02_tiny_patch14_224.mim_in22k", 56, {}),
    # separate q/k/v projections, SwiGLU with a LayerNorm over the neurons (scale_mlp); 3 blocks
    "eva02_b": ("eva02_base_patch14_224.mim_in22k", 56, {"depth": 3}),
}


def _liven(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("bias"):  # bias, q_bias, v_bias (k_bias: a buffer)
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif p.ndim == 1:  # norm weights, layer scales gamma_1/gamma_2
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(4)  # attention logits of O(1): the rotation visibly changes the attention
    return model


def _model(key: str) -> tuple[torch.nn.Module, int]:
    name, px, kw = VARIANTS[key]
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False, img_size=px, **kw).eval()
    return _liven(model), px


def _x(n: int, px: int) -> torch.Tensor:
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(2))


def _rot(t: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    """The rotary embedding written out: t [B, h, N, hd], rope [N, 2 hd] = [sin | cos]."""
    sin, cos = rope.float().chunk(2, -1)
    if half:  # pairs (i, i + hd/2)
        a, b = t.chunk(2, -1)
        turned = torch.cat([-b, a], -1)
    else:  # pairs (2i, 2i + 1)
        turned = torch.stack([-t[..., 1::2], t[..., ::2]], -1).flatten(-2)
    return t * cos + turned * sin


def _affine(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return x @ linear.weight.T + (0 if linear.bias is None else linear.bias)


def _qkv_by_hand(attn, x: torch.Tensor, rope: torch.Tensor | None, *, rotate: bool = True):
    """q, k, v [B, h, T, hd] from the attention's input x [B, T, D] and its parameters: q_norm and
    k_norm, then the rotation of the tokens after num_prefix_tokens."""
    b, t, _ = x.shape
    if attn.qkv is not None:
        bias = 0 if attn.q_bias is None else torch.cat(
            [attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])  # k has no bias
        q, k, v = (x @ attn.qkv.weight.T + bias).chunk(3, -1)
    else:
        q, k, v = _affine(x, attn.q_proj), _affine(x, attn.k_proj), _affine(x, attn.v_proj)

    def heads(z):  # [B, T, A] -> [B, h, T, hd]
        return z.reshape(b, t, attn.num_heads, -1).transpose(1, 2)

    q, k, v = attn.q_norm(heads(q)), attn.k_norm(heads(k)), heads(v)
    if rope is not None and rotate:
        n = attn.num_prefix_tokens
        q = torch.cat([q[:, :, :n], _rot(q[:, :, n:], rope, attn.rotate_half)], 2)
        k = torch.cat([k[:, :, :n], _rot(k[:, :, n:], rope, attn.rotate_half)], 2)
    return q, k, v


def _over_heads(t: torch.Tensor) -> torch.Tensor:
    """[B, h, T, hd] -> [B, T]: the norm of the concatenation of the heads."""
    return t.transpose(1, 2).flatten(2).norm(dim=-1)


def _keep(store: dict, key, *, clone: bool = False):
    """A forward pre-hook that keeps its module's first input and changes nothing."""
    def hook(_m, args) -> None:
        store.setdefault(key, args[0].clone() if clone else args[0])
    return hook


def _attention_inputs(model) -> tuple[dict, list]:
    """Pre-hooks that keep each block's attention input and rope, as timm passes them."""
    seen: dict[int, tuple] = {}

    def keeper(i: int):
        def hook(_m, args, kwargs) -> None:  # returns None: the call goes on unchanged
            seen.setdefault(i, (args[0], kwargs.get("rope")))
        return hook

    handles = [blk.attn.register_forward_pre_hook(keeper(i), with_kwargs=True)
               for i, blk in enumerate(model.blocks)]
    return seen, handles


def test_aliases_are_pretrained_tags_at_native_resolution():
    known = all_aliases()
    for alias, arch, px in (("dinov3_s", "vit_small_patch16_dinov3", 256),
                            ("dinov3_splus", "vit_small_plus_patch16_dinov3", 256),
                            ("dinov3_hplus", "vit_huge_plus_patch16_dinov3", 256),
                            ("dinov3_7b", "vit_7b_patch16_dinov3", 256),
                            ("eva02_s", "eva02_small_patch14_224", 224),
                            ("eva02_l", "eva02_large_patch14_224", 224)):
        spec = known[alias]
        assert spec.timm_name.split(".")[0] == arch and spec.img_size == px
    for alias in ("dinov3_s", "dinov3_splus", "dinov3_b", "dinov3_l", "dinov3_hplus", "dinov3_7b",
                  "eva02_t", "eva02_s", "eva02_b", "eva02_l"):
        spec = known[alias]
        assert spec.timm_name in timm.list_pretrained(spec.timm_name), spec  # an existing tag
        cfg = timm.get_pretrained_cfg(spec.timm_name)
        assert cfg.input_size[-1] == spec.img_size  # timm's own resolution for that checkpoint


@pytest.mark.parametrize("key", list(VARIANTS))
def test_eva_matches_timm(key):
    model, px = _model(key)
    assert family_of(model).name == "eva"
    adapter = make_adapter(model, img_size=px, blocks=True)
    lay, depth, x = adapter.layout, len(model.blocks), _x(2, px)
    dinov3 = key.startswith("dinov3")
    with torch.no_grad():
        out = adapter(x)
        adapter.close()
        inter = model.forward_intermediates(x, indices=list(range(depth)), norm=False,
                                            intermediates_only=True, return_prefix_tokens=True)
        blocks = [torch.cat([prefix, spatial.flatten(2).transpose(1, 2)], 1)  # L x [B, T, D]
                  for spatial, prefix in inter]
        post = model.forward_features(x)
        probs = probs_from_unfused(model.blocks[-1].attn, lambda: model.forward_features(x))
        embed = model.patch_embed(x)
        # the same, without the rotary embedding: the CLS attention must differ
        with_rope = model._pos_embed
        model._pos_embed = lambda z: (with_rope(z)[0], None)
        try:
            unrotated = probs_from_unfused(model.blocks[-1].attn,
                                            lambda: model.forward_features(x))
        finally:
            del model._pos_embed
    assert (lay.family, lay.n_cls, lay.n_reg) == ("eva", 1, 4 if dinov3 else 0)
    assert embed.ndim == (4 if dinov3 else 3)  # DINOv3 [B, H, W, D]; EVA-02 [B, N, D]
    torch.testing.assert_close(out["tokens"], blocks[-1])
    np.testing.assert_allclose(out["norm"], blocks[-1].norm(dim=-1), rtol=1e-5)
    torch.testing.assert_close(out["block_norm"], torch.stack([b.norm(dim=-1) for b in blocks], 1))
    assert not torch.allclose(out["block_norm"][:, 0], out["block_norm"][:, -1])
    torch.testing.assert_close(out["attn"], probs[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)
    assert (out["attn"] - unrotated[:, :, 0].mean(1)).abs().max() > 1e-3  # the rotation matters
    torch.testing.assert_close(out["cls_post"], post[:, 0])
    torch.testing.assert_close(out["patch_mean_post"], post[:, lay.n_prefix:].mean(1))
    if dinov3:
        torch.testing.assert_close(out["registers_post"], post[:, 1:5])
        assert out["attn"][:, 5:].sum(-1).max() < 1  # storage tokens take a share: not renormalised
    else:  # EVA-02 MIM: no per-token final norm; pre-norm and output tokens coincide
        assert isinstance(model.norm, torch.nn.Identity) and "registers_post" not in out
        torch.testing.assert_close(post, blocks[-1])
    grid = embed.reshape(2, *lay.grid, -1).numpy()
    for b in range(2):
        np.testing.assert_allclose(out["nbr_cos"][b], nbr_cos_by_loops(grid[b]), atol=1e-5)


@pytest.mark.parametrize("key", list(VARIANTS))
def test_qkv_norms_are_the_rotated_q_k_and_the_v_of_every_block(key):
    """--blocks all: q and k as they enter the attention product (q_norm/k_norm, then rope), v,
    each over all heads, on every block; recomputed from the parameters, and the hand-written q
    and k give timm's own attention probabilities."""
    model, px = _model(key)
    adapter = make_adapter(model, img_size=px, blocks=True)
    seen, handles = _attention_inputs(model)
    x = _x(2, px)
    with torch.no_grad():
        out = adapter(x)
        adapter.close()
        for h in handles:
            h.remove()
        for i, blk in enumerate(model.blocks):
            q, k, v = _qkv_by_hand(blk.attn, *seen[i])
            for j, t in enumerate((q, k, v)):
                torch.testing.assert_close(out["qkv_norm"][:, i, j], _over_heads(t), rtol=1e-5,
                                           atol=1e-5)
        # the rotation turns q and k (so it is applied) but keeps their norms
        q0, k0, _ = _qkv_by_hand(blk.attn, *seen[i], rotate=False)
        assert (q - q0).abs().max() > 1e-2 * q0.abs().max()
        torch.testing.assert_close(_over_heads(q), _over_heads(q0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_over_heads(k), _over_heads(k0), rtol=1e-5, atol=1e-5)
        probs = probs_from_unfused(blk.attn, lambda: model.forward_features(x))
    torch.testing.assert_close((q @ k.transpose(-2, -1) * blk.attn.scale).softmax(-1), probs,
                               atol=1e-6, rtol=1e-5)


def _hidden_by_hand(mlp, z: torch.Tensor) -> torch.Tensor:
    """The MLP's hidden activation (the fc2 input) [B, T, H] from its input z [B, T, D]."""
    kind = type(mlp).__name__
    if kind == "Mlp":  # DINOv3 S/B/L
        h = F.gelu(_affine(z, mlp.fc1))
    elif kind == "GluMlp":  # EVA-02 T/S: fc1 packs [gate | value], gate first (gate_last=False)
        assert not mlp.gate_last
        gate, value = _affine(z, mlp.fc1).chunk(2, -1)
        h = F.silu(gate) * value
    else:  # SwiGLU: DINOv3 S+/H+/7B, EVA-02 B/L
        assert kind == "SwiGLU"
        h = F.silu(_affine(z, mlp.fc1_g)) * _affine(z, mlp.fc1_x)
    if isinstance(mlp.norm, torch.nn.LayerNorm):  # EVA-02 B/L (scale_mlp): over the neurons
        h = F.layer_norm(h, h.shape[-1:], mlp.norm.weight, mlp.norm.bias, mlp.norm.eps)
    else:
        assert isinstance(mlp.norm, torch.nn.Identity)
    return h


@pytest.mark.parametrize("key", ["dinov3_s", "dinov3_splus", "eva02_t", "eva02_b"])
def test_mlp_neurons_are_the_fc2_input(key):
    model, px = _model(key)
    x = _x(2, px)
    adapter = make_adapter(model, img_size=px, blocks=True)
    with torch.no_grad():
        norms = adapter(x)["block_norm"]  # [B, L, T]
    adapter.close()
    npt = adapter.layout.n_prefix
    thr = float(norms[:, :, npt:].median())  # about half the patches are outliers at some block
    adapter = make_adapter(model, img_size=px, blocks=True,
                           record_mlp=MlpRecord(threshold=thr, acts=True))
    inputs = {}
    handles = [blk.mlp.register_forward_pre_hook(_keep(inputs, i))
               for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        out = adapter(x)
        hidden = torch.stack([_hidden_by_hand(blk.mlp, inputs[i])
                              for i, blk in enumerate(model.blocks)], 1)  # [B, L, T, H]
    adapter.close()
    for h in handles:
        h.remove()
    a = hidden[:, :, npt:].transpose(2, 3)  # [B, L, H, Np]
    assert out["mlp_acts"].dtype == torch.float16 and out["mlp_acts"].shape == a.shape
    assert a.shape[2] == model.blocks[0].mlp.fc2.in_features
    torch.testing.assert_close(out["mlp_acts"].float(), a, rtol=1e-3, atol=1e-3)
    mask = (norms[:, :, npt:] > thr).double()  # [B, Ld, Np]
    assert 0 < mask.mean() < 1
    mean = torch.einsum("bdp,blhp->bdlh", mask, a.abs().double()) / mask.sum(-1).clamp(
        min=1)[:, :, None, None]
    torch.testing.assert_close(out["mlp_abs_outlier"].double(), mean, rtol=1e-4, atol=1e-6)


def _tiny_eva(**kw) -> Eva:
    """A 2-block Eva with DINOv3's rotary embedding, for layouts no pretrained tag has."""
    torch.manual_seed(3)
    model = Eva(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                use_rot_pos_emb=True, use_abs_pos_emb=False, rope_type="dinov3",
                rope_rotate_half=True, dynamic_img_size=True, **kw)
    return _liven(model.eval())


def test_eva_without_cls_gives_the_attention_each_token_receives():
    model = _tiny_eva(class_token=False, num_reg_tokens=1, global_pool="avg")
    adapter = make_adapter(model, img_size=64)
    x = _x(2, 64)
    with torch.no_grad():
        out = adapter(x)
        adapter.close()
        probs = probs_from_unfused(model.blocks[-1].attn, lambda: model.forward_features(x))
        post = model.forward_features(x)
    assert (adapter.layout.n_cls, adapter.layout.n_reg) == (0, 1)
    torch.testing.assert_close(out["attn"], probs.mean((1, 2)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["cls_post"], post[:, 1:].mean(1))


def test_grouped_query_attention_is_refused_by_name():
    model = _tiny_eva(attn_type="rope")
    with pytest.raises(ValueError, match="AttentionRope .*EvaAttention only"):
        make_adapter(model, img_size=64)


# --- test-time registers on Eva ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["dinov3_s", "eva02_t"])
def test_extra_token_keeps_every_patch_rope_and_position(key):
    """With the extra token masked out of every attention (as a key), each other token's output
    must be the plain model's: same position embedding, same rotation, same neighbours, at batch
    size 1 and 4. Unmasked it changes the patches, through attention only."""
    model, px = _model(key)
    x = _x(4, px)
    with torch.no_grad():
        plain = model.forward_features(x)  # [B, T, D]
    ttr = TTRegister(model, [])  # K = 0: only the zero token
    n, t = ttr.index, plain.shape[1] + 1
    assert all(blk.attn.num_prefix_tokens == n + 1 for blk in model.blocks)
    mask = torch.zeros(t, t)
    mask[:, n] = float("-inf")  # nobody attends to the extra token
    with torch.no_grad():
        masked = model.forward_features(x, attn_mask=mask)  # [B, T + 1, D]
        single = torch.cat([model.forward_features(x[i:i + 1], attn_mask=mask) for i in range(4)])
        free = model.forward_features(x)
    ttr.close()
    others = [i for i in range(t) if i != n]
    torch.testing.assert_close(masked[:, others], plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-5)
    assert (free[:, others] - plain).abs().max() > 1e-3  # the token does act, through attention
    assert model.num_prefix_tokens == n and all(
        blk.attn.num_prefix_tokens == n for blk in model.blocks)


def test_raising_only_the_models_prefix_count_breaks_the_rotation():
    """The trap TTRegister avoids: each EvaAttention rotates the tokens after its own count."""
    model, px = _model("dinov3_s")
    original = model._pos_embed

    def inserted(z):
        x, rope = original(z)
        return torch.cat([x[:, :5], x.new_zeros(x.shape[0], 1, x.shape[2]), x[:, 5:]], 1), rope

    model._pos_embed = inserted
    model.num_prefix_tokens += 1
    with torch.no_grad(), pytest.raises(RuntimeError):
        model.forward_features(_x(1, px))  # 17 tokens to rotate, 16 rotations


def test_hooks_are_batch_independent_and_close_restores_the_model():
    model, px = _model("dinov3_s")
    x = _x(5, px)
    with torch.no_grad():
        before = model.forward_features(x)
        adapter = make_adapter(model, img_size=px, blocks=True,
                               ttreg=[(2, 5), (2, 9), (7, 100)])
        assert model.num_prefix_tokens == 6 and adapter.layout.n_prefix == 6
        assert all(blk.attn.num_prefix_tokens == 6 for blk in model.blocks)
        assert (adapter.layout.n_cls, adapter.layout.n_reg, adapter.layout.n_ttreg) == (1, 4, 1)
        full = adapter(x)
        single = [adapter(x[i:i + 1]) for i in range(5)]
        adapter.close()
        after = model.forward_features(x)
    for key in ("tokens", "norm", "attn", "registers_post", "cls_post", "block_norm", "qkv_norm"):
        torch.testing.assert_close(torch.cat([s[key] for s in single]), full[key])
    assert full["tokens"].shape[1] == 22 and full["registers_post"].shape == (5, 4, 384)
    assert model.num_prefix_tokens == 5 and "_pos_embed" not in vars(model)
    assert all(blk.attn.num_prefix_tokens == 5 for blk in model.blocks)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_moved_activation_is_the_patch_max_and_patches_are_zeroed():
    model, px = _model("dinov3_s")
    x = _x(3, px)
    seen, orig = {}, {}
    fc2 = model.blocks[4].mlp.fc2
    h0 = fc2.register_forward_pre_hook(_keep(orig, "h", clone=True))
    ttr = TTRegister(model, [(4, 11)])
    h1 = fc2.register_forward_pre_hook(_keep(seen, "h"))
    with torch.no_grad():
        model.forward_features(x)
    for h in (h0, h1):
        h.remove()
    ttr.close()
    got, src = seen["h"], orig["h"]  # [B, 5 + 1 + 16, H]: cls, 4 storage, ttreg, patches
    assert got.shape[1] == 22
    torch.testing.assert_close(got[:, 5, 11], src[:, 6:, 11].amax(1))  # per image, over patches
    assert not got[:, 6:, 11].any()
    torch.testing.assert_close(got[:, :5, 11], src[:, :5, 11])  # CLS and storage tokens untouched
    torch.testing.assert_close(got[:, :, 12], src[:, :, 12])  # other neurons untouched


# --- the command line, on a tiny lake ---------------------------------------------------------

D3, E2 = 64, 56  # px: DINOv3-S 4 x 4 patches of 16; EVA-02-S 4 x 4 patches of 14
COMMON = ["--shard-size", "32", "--decode-workers", "0", "--quiet"]
N_IMAGES = 8


def _extract(lake, model, weights, run, px, *extra, batch=4) -> int:
    return main(["extract", "--lake", str(lake), "--model", model, "--subset", "tiny",
                 "--weights", str(weights), "--run", run, "--img-size", str(px),
                 "--batch-size", str(batch), *COMMON, *extra])


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """DINOv3-S and EVA-02-S (random weights; DINOv3's final norm given non-trivial parameters,
    EVA-02's is Identity), --blocks all, a --record-mlp run, its neuron ranking and test-time
    register runs at batch sizes 1 and 4."""
    root = write_blob_folder(tmp_path_factory.mktemp("imgs"), n=N_IMAGES, side=64, blob=16)
    path = tmp_path_factory.mktemp("lake")
    assert main(["subset", "--lake", str(path), "--name", "tiny", "--data", str(root)]) == 0
    model = create_backbone(resolve_model("dinov3_s"), weights=resolve_weights("random"),
                            img_size=D3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.norm.weight.copy_(torch.rand(model.norm.weight.shape, generator=g) * 1.5 + 0.5)
        model.norm.bias.copy_(torch.randn(model.norm.bias.shape, generator=g))
    weights = tmp_path_factory.mktemp("w") / "dinov3_s.pth"
    torch.save(model.state_dict(), weights)
    assert _extract(path, "dinov3_s", weights, "d3", D3, "--blocks", "all") == 0
    assert _extract(path, "eva02_s", "random", "e2", E2, "--blocks", "all") == 0
    assert _extract(path, "dinov3_s", weights, "d3-mlp", D3, "--record-mlp", "--mlp-acts",
                    "--outlier-ref", "d3") == 0
    assert main(["neurons", "--lake", str(path), "--run", "d3-mlp", "--top", "5",
                 "--detect-block", "11"]) == 0
    for run, k, batch in (("tt3-b1", 3, 1), ("tt3-b4", 3, 4), ("tt0", 0, 4)):
        assert _extract(path, "dinov3_s", weights, run, D3, "--test-time-registers",
                        f"d3-mlp:{k}", batch=batch) == 0
    return path, weights


def _inputs(db, run: str, px: int) -> torch.Tensor:
    """The normalised inputs the model saw, reassembled from the run's stored patch cells."""
    t = db.sql("SELECT image_id, \"row\", col, slot FROM tokens WHERE run = ? AND kind = 'patch' "
               "ORDER BY image_id, token", params=[run]).to_pydict()
    _, cells = db.gather(run, np.asarray(t["slot"]), pixels=True)
    c = cells.shape[1]
    pixels = np.zeros((len(set(t["image_id"])), px, px, 3), np.uint8)
    for k, (i, r, col) in enumerate(zip(t["image_id"], t["row"], t["col"])):
        pixels[i, r * c:(r + 1) * c, col * c:(col + 1) * c] = cells[k]
    cfg = db.manifest(run)["data_config"]
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std


@pytest.mark.parametrize(("run", "alias", "px", "norm_type"),
                         [("d3", "dinov3_s", D3, "layer_norm"), ("e2", "eva02_s", E2, "identity")])
def test_cli_post_tokens_are_forward_features(lake, run, alias, px, norm_type):
    path, weights = lake
    db = open_lake(path)
    slots = db.sql("SELECT slot FROM tokens WHERE run = ? ORDER BY image_id, token",
                   params=[run]).column(0).to_numpy()
    post = db.gather(run, slots, tokens="post")
    model = create_backbone(resolve_model(alias), weights=resolve_weights(
        str(weights) if alias == "dinov3_s" else "random"), img_size=px)
    with torch.no_grad():
        ref = model.forward_features(_inputs(db, run, px)).reshape(post.shape).numpy()
    pre = db.gather(run, slots).astype(np.float32)
    # the stored token is fp16: its rounding passes through the norm's scaling
    assert np.abs(post - ref).max() <= 1e-3 * np.abs(ref).max()
    assert db.final_norm(run)["type"] == norm_type
    if norm_type == "identity":  # EVA-02 MIM: output tokens are the stored tokens
        np.testing.assert_array_equal(post, pre)
    else:
        assert not np.allclose(post, pre, atol=1e-2)
    assert db.validate(run) == []


def test_cli_runs_store_the_token_layout_and_every_blocks_qkv(lake):
    db = open_lake(lake[0])
    q = "SELECT kind FROM tokens WHERE run = ? AND image_id = 0 ORDER BY token"
    assert db.sql(q, params=["d3"]).column(0).to_pylist() == ["cls"] + ["reg"] * 4 + ["patch"] * 16
    assert db.sql(q, params=["e2"]).column(0).to_pylist() == ["cls"] + ["patch"] * 16
    assert db.manifest("d3")["token_layout"]["family"] == "eva"
    for run, tokens in (("d3", 21), ("e2", 17)):
        got = db.sql("SELECT count(*), count(DISTINCT block), count(q_norm), count(k_norm), "
                     "count(v_norm), min(norm) FROM blocks WHERE run = ?", params=[run]).to_pylist()
        counts = list(got[0].values())
        assert counts[:5] == [N_IMAGES * 12 * tokens, 12] + [N_IMAGES * 12 * tokens] * 3
        assert counts[5] > 0


def test_cli_record_mlp_stores_the_fc2_inputs(lake):
    path, weights = lake
    db = open_lake(path)
    ids = db.sql("SELECT image_id FROM images WHERE run = 'd3-mlp' ORDER BY image_id").column(0)
    stored = db.image_array("d3-mlp", "mlp_acts", ids.to_numpy())  # [N, L, H, Np] fp16
    model = create_backbone(resolve_model("dinov3_s"), weights=resolve_weights(str(weights)),
                            img_size=D3)
    acts = {}
    for i, blk in enumerate(model.blocks):
        blk.mlp.fc2.register_forward_pre_hook(_keep(acts, i))
    with torch.no_grad():
        model.forward_features(_inputs(db, "d3-mlp", D3))
    ref = torch.stack([acts[i][:, 5:] for i in range(12)], 1).transpose(2, 3).numpy()
    assert stored.shape == (N_IMAGES, 12, 1536, 16)
    np.testing.assert_allclose(stored.astype(np.float32), ref, rtol=1e-3, atol=1e-3)
    assert db.image_array("d3-mlp", "mlp_abs_outlier", [0]).shape == (1, 12, 12, 1536)


def test_cli_test_time_register_runs_agree_across_batch_sizes(lake):
    path, _ = lake
    db = open_lake(path)
    q = "SELECT kind, norm, attn, slot FROM tokens WHERE run = ? ORDER BY image_id, token"
    a, b = (db.sql(q, params=[r]).to_pandas() for r in ("tt3-b1", "tt3-b4"))
    assert list(a.kind[:7]) == ["cls", "reg", "reg", "reg", "reg", "ttreg", "patch"]
    assert len(a) == N_IMAGES * 22
    np.testing.assert_allclose(a.norm, b.norm, rtol=1e-5)
    np.testing.assert_allclose(a.attn, b.attn, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db.gather("tt3-b1", a.slot.to_numpy()).astype(np.float32),
                               db.gather("tt3-b4", b.slot.to_numpy()).astype(np.float32),
                               rtol=1e-3, atol=1e-3)
    cfg = db.manifest("tt3-b4")["config"]["test_time_registers"]
    assert cfg["source_run"] == "d3-mlp" and cfg["k"] == 3 and len(cfg["neurons"]) == 3


def test_cli_zero_register_changes_patches_only_through_attention(lake):
    """K = 0: the zero token without position embedding or rotation. timm's initial layer scale
    (1e-5) keeps this random model's blocks close to the identity, so the patches barely move; a
    patch shifted by one position (a lost rotation or position) would not match."""
    db = open_lake(lake[0])
    got = db.sql("SELECT t.norm AS a, p.norm AS b FROM tokens t JOIN tokens p USING (image_id, "
                 "\"row\", col) WHERE t.run = 'tt0' AND p.run = 'd3' AND t.kind = 'patch' "
                 "AND p.kind = 'patch' ORDER BY image_id, \"row\", col").to_pandas()
    assert len(got) == N_IMAGES * 16
    np.testing.assert_allclose(got.a, got.b, rtol=1e-3)
    shifted = np.abs(got.a.to_numpy()[1:] - got.b.to_numpy()[:-1]) / got.b.to_numpy()[:-1]
    assert shifted.max() > 1e-2  # neighbouring patches differ by far more than that tolerance


def test_attention_and_norms_are_fp32_under_bf16_autocast():
    """On a GPU the blocks run under bf16 autocast, which would also recast an einsum of fp32
    inputs to bf16 (CPU autocast does the same, so the CPU catches it): the attention is
    recomputed from the model's own (bf16) q and k with autocast off."""
    model, px = _model("dinov3_s")
    adapter = make_adapter(model, img_size=px, blocks=True)
    attn = model.blocks[-1].attn
    seen, handles = _attention_inputs(model)
    qk: dict[str, torch.Tensor] = {}
    handles += [attn.q_norm.register_forward_hook(lambda _m, _a, o: qk.setdefault("q", o)),
                attn.k_norm.register_forward_hook(lambda _m, _a, o: qk.setdefault("k", o))]
    x = _x(2, px)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x)
    adapter.close()
    for h in handles:
        h.remove()
    rope, n = seen[len(model.blocks) - 1][1], attn.num_prefix_tokens
    assert qk["q"].dtype == torch.bfloat16  # the model did run in bf16
    q, k = (torch.cat([t.float()[:, :, :n], _rot(t.float()[:, :, n:], rope, True)], 2)
            for t in (qk["q"], qk["k"]))
    ref = (q[:, :, :1] @ k.transpose(-2, -1) * attn.scale).softmax(-1)[:, :, 0].mean(1)
    assert out["attn"].dtype == torch.float32 and out["qkv_norm"].dtype == torch.float32
    torch.testing.assert_close(out["attn"], ref, rtol=1e-5, atol=1e-7)
