"""Register-era families on timm's VisionTransformer, on RANDOM weights at tiny resolutions (the
numbers say nothing about the trained models; they test the extraction):

* C-RADIO v3 (vit family: CLS + 7 registers, Identity final norm), SigLIP 2 (its own family: no
  CLS, an attention-pooling head whose query's attention the lake stores as `attn_pool`), AIMv2
  (vit family: no CLS, RmsNorm final norm, SwiGLU MLP), each the smallest timm has: every number
  the adapter returns is recomputed from the model's parameters and timm's own unfused attention;
  the lake's output tokens equal timm's forward_features; --blocks all, --record-mlp (+ `tokenlake
  neurons`) and --test-time-registers run through the CLI.
* `tokenlake models`; a toy family registered from outside the package, extracted through the CLI;
  the error for a model class no family knows.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from torch import nn

from tokenlake import analyze
from tokenlake.cli.main import main
from tokenlake.extract import (
    Adapter,
    Family,
    TokenLayout,
    _loop,
    _registry,
    create_backbone,
    family_of,
    make_adapter,
    model_families,
    register_family,
    resolve_model,
    resolve_weights,
)
from tokenlake.extract._adapters import neighbour_cosine
from tokenlake.extract._finalnorm import final_norm_params
from tokenlake.extract._models import ALIASES, all_aliases, meta_backbone
from tokenlake.extract._preprocess import DataConfig, normalise
from tokenlake.extract._ttreg import TTRegister
from tokenlake.extract.oracles import nbr_cos_by_loops, probs_from_unfused
from tokenlake.store import open_lake

RANDOM = resolve_weights("random")
# alias -> tiny resolution (3 x 3 patches) and what timm's model has (checked against the model)
CASES = {
    "radio_b": {"px": 48, "family": "vit", "n_cls": 1, "n_reg": 7, "norm": "identity"},
    "siglip_v2_b": {"px": 48, "family": "siglip", "n_cls": 0, "n_reg": 0, "norm": "layer_norm"},
    "aimv2_l": {"px": 42, "family": "vit", "n_cls": 0, "n_reg": 0, "norm": "rms_norm"},
}
N_IMAGES = 4


def _nontrivial_final_norm(model: nn.Module) -> None:
    """A fresh LayerNorm/RmsNorm is the identity affine map, which would hide a norm applied
    without its parameters: give it seeded non-trivial ones (Identity has none)."""
    norm = model.norm
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.5 + 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))


def _norm_by_hand(kind: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The final norm written out from its parameters (float64)."""
    x = x.double()
    if kind == "identity":
        return x
    w = module.weight.double()
    if kind == "rms_norm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * w
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + module.eps) * w + module.bias.double()


def _pool_probs_by_hand(pool, post: torch.Tensor) -> torch.Tensor:
    """SigLIP's pooling head written out from its parameters: [B, T, D] post-norm tokens ->
    [B, h, T] attention of the one latent query (float64). Its q_norm/k_norm are Identity."""
    assert isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)
    b, t, d = post.shape
    h, hd = pool.num_heads, pool.head_dim
    q = pool.latent.double()[0] @ pool.q.weight.double().T + pool.q.bias.double()  # [1, D]
    kv = post.double() @ pool.kv.weight.double().T + pool.kv.bias.double()  # [B, T, 2D]
    k = kv[..., :d].reshape(b, t, h, hd)  # [B, T, h, hd]
    logits = torch.einsum("hd,bthd->bht", q.reshape(h, hd), k) / hd ** 0.5
    return logits.softmax(-1)


def _pooled_output_by_hand(pool, post: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The pooling head's output from those probabilities: probs @ v -> proj -> + mlp(norm)."""
    b, t, d = post.shape
    h, hd = pool.num_heads, pool.head_dim
    kv = post.double() @ pool.kv.weight.double().T + pool.kv.bias.double()
    v = kv[..., d:].reshape(b, t, h, hd)
    x = torch.einsum("bht,bthd->bhd", probs, v).reshape(b, d)
    x = x @ pool.proj.weight.double().T + pool.proj.bias.double()
    return x + pool.mlp.double()(pool.norm.double()(x))


def _pixels(db, run: str, px: int) -> torch.Tensor:
    """[N, 3, px, px] the normalised inputs the model saw, reassembled from the stored cells."""
    t = db.sql("SELECT image_id, \"row\", col, slot FROM tokens WHERE run = ? AND kind = 'patch' "
               "ORDER BY image_id, token", params=[run]).to_pydict()
    _, cells = db.gather(run, np.asarray(t["slot"]), pixels=True)
    ids = sorted(set(t["image_id"]))
    c = cells.shape[1]
    pixels = np.zeros((len(ids), px, px, 3), np.uint8)
    for k, (i, r, col) in enumerate(zip(t["image_id"], t["row"], t["col"])):
        pixels[ids.index(i), r * c:(r + 1) * c, col * c:(col + 1) * c] = cells[k]
    dc = db.manifest(run)["data_config"]
    cfg = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in dc.items()})
    return normalise(torch.from_numpy(pixels), cfg)


@pytest.fixture(scope="module", params=list(CASES))
def fam(request, tmp_path_factory, image_helpers):
    """One family's random-weight network (final norm made non-trivial) and a lake with, through
    the CLI: `plain` (--blocks all), `mlp` (--record-mlp --outlier-ref plain, then `tokenlake
    neurons`) and `tt` (--test-time-registers mlp:2).

    The extraction's create_backbone is wrapped to hand out copies of this one network: random
    weights are seeded (a rebuild is the same network), so a copy is what a rebuild would give,
    with the non-trivial final norm the test needs and without re-initialising up to 300M
    parameters per run."""
    alias = request.param
    case = CASES[alias]
    px = case["px"]
    spec = resolve_model(alias)
    network = create_backbone(spec, weights=RANDOM, img_size=px)
    _nontrivial_final_norm(network)

    def build(spec_, *, weights, img_size):
        assert (spec_.timm_name, img_size, weights.is_random) == (spec.timm_name, px, True)
        return copy.deepcopy(network)

    imgs = tmp_path_factory.mktemp(f"imgs-{alias}")
    image_helpers.write_flat_folder(imgs, n=N_IMAGES)  # and one truncated file (an errors row)
    path = tmp_path_factory.mktemp(f"lake-{alias}")
    common = ["--lake", str(path), "--model", alias, "--subset", "tiny", "--weights", "random",
              "--img-size", str(px), "--decode-workers", "0", "--batch-size", "3", "--quiet"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))
        mp.setattr(_loop, "create_backbone", build)
        assert main(["subset", "--lake", str(path), "--name", "tiny", "--data", str(imgs)]) == 0
        assert main(["extract", *common, "--blocks", "all", "--run", "plain"]) == 0
        assert main(["extract", *common, "--record-mlp", "--outlier-ref", "plain",
                     "--run", "mlp"]) == 0
        assert main(["neurons", "--lake", str(path), "--run", "mlp", "--detect-block", "-1",
                     "--top", "3"]) == 0
        assert main(["extract", *common, "--test-time-registers", "mlp:2", "--run", "tt"]) == 0
    yield SimpleNamespace(alias=alias, px=px, case=case, network=network, path=path)


@torch.no_grad()
def test_adapter_matches_independent_computation(fam):
    model = copy.deepcopy(fam.network)
    px, case = fam.px, fam.case
    assert family_of(model).name == case["family"]
    adapter = make_adapter(model, img_size=px, blocks=True)
    lay = adapter.layout
    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(0))
    seen, handles = {}, []
    for b, blk in enumerate(model.blocks):
        handles.append(blk.register_forward_hook(lambda _m, _a, o, b=b: seen.__setitem__(("out", b), o)))
        handles.append(blk.norm1.register_forward_hook(
            lambda _m, _a, o, b=b: seen.__setitem__(("norm1", b), o)))
    with torch.no_grad():
        out = adapter(x)
        for h in handles:
            h.remove()
        final = final_norm_params(adapter)
        adapter.close()
        # the last block's output, walking timm's own modules as forward_features does
        pre = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for blk in model.blocks:
            pre = blk(pre)  # [B, T, D]
        post = model.forward_features(x)  # [B, T, D]
        probs = probs_from_unfused(model.blocks[-1].attn, lambda: model.forward_features(x))
        embed = model.patch_embed(x).reshape(2, *lay.grid, -1).numpy()
    # the layout comes from the model: CLS from cls_token, registers from num_prefix_tokens
    assert (lay.n_cls, lay.n_reg) == (case["n_cls"], case["n_reg"])
    assert lay.n_cls + lay.n_reg == model.num_prefix_tokens and lay.grid == (3, 3)
    if lay.n_reg:
        assert model.reg_token.shape[1] == lay.n_reg
    assert lay.family == case["family"] and final["type"] == case["norm"]
    torch.testing.assert_close(out["tokens"], pre)
    torch.testing.assert_close(post.double(), _norm_by_hand(case["norm"], model.norm, pre),
                               atol=1e-4, rtol=1e-4)  # forward_features ends with this norm
    np.testing.assert_allclose(out["norm"], np.linalg.norm(pre.numpy(), axis=-1), rtol=1e-5)
    want = probs[:, :, 0].mean(1) if lay.n_cls else probs.mean((1, 2))  # [B, T]
    torch.testing.assert_close(out["attn"], want, atol=1e-6, rtol=1e-5)
    if lay.n_reg:  # the CLS row also attends to the registers: not renormalised
        assert out["attn"][:, lay.n_prefix:].sum(-1).max() < 1
        torch.testing.assert_close(out["registers_post"], post[:, 1:lay.n_prefix])
    patches_post = post[:, lay.n_prefix:]
    torch.testing.assert_close(out["cls_post"], post[:, 0] if lay.n_cls else patches_post.mean(1))
    torch.testing.assert_close(out["patch_mean_post"], patches_post.mean(1))
    for b in range(2):
        np.testing.assert_allclose(out["nbr_cos"][b], nbr_cos_by_loops(embed[b]), atol=1e-5)
    depth, d = len(model.blocks), model.embed_dim
    for b, blk in enumerate(model.blocks):
        np.testing.assert_allclose(out["block_norm"][:, b], seen["out", b].norm(dim=-1), rtol=1e-5)
        qkv = seen["norm1", b] @ blk.attn.qkv.weight.T
        if blk.attn.qkv.bias is not None:
            qkv = qkv + blk.attn.qkv.bias
        for i in range(3):
            np.testing.assert_allclose(out["qkv_norm"][:, b, i],
                                       qkv[..., i * d:(i + 1) * d].norm(dim=-1), rtol=1e-4)
    assert out["block_norm"].shape == (2, depth, lay.n_tokens)
    if case["family"] == "siglip":
        hand = _pool_probs_by_hand(model.attn_pool, post)  # [B, h, T]
        np.testing.assert_allclose(out["attn_pool"], hand.mean(1), atol=1e-6, rtol=1e-5)
        # the probabilities reproduce timm's own pooled output (fused attention inside)
        with torch.no_grad():
            pooled = model.forward_head(post, pre_logits=True)
            by_hand = _pooled_output_by_hand(copy.deepcopy(model.attn_pool), post, hand)
        torch.testing.assert_close(pooled.double(), by_hand, atol=1e-4, rtol=1e-4)
        assert adapter.image_arrays() == {"attn_pool": ((lay.n_tokens,), "float32")}
    else:
        assert "attn_pool" not in out and adapter.image_arrays() == {}


@torch.no_grad()
def test_attention_is_fp32_under_bf16_autocast(fam):
    """Under autocast, `.float()` operands of a matmul are re-cast to bf16 (docs/MODELS.md): the
    adapter's attention must equal the fp32 softmax of the very q, k (and post tokens) the bf16
    forward produced."""
    model = copy.deepcopy(fam.network)
    adapter = make_adapter(model, img_size=fam.px)
    seen = {}
    attn = model.blocks[-1].attn
    assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
    hooks = [attn.qkv.register_forward_hook(lambda _m, _a, o: seen.__setitem__("qkv", o)),
             model.norm.register_forward_hook(lambda _m, _a, o: seen.__setitem__("post", o))]
    x = torch.randn(2, 3, fam.px, fam.px, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x)
    for h in hooks:
        h.remove()
    adapter.close()
    lay = adapter.layout
    b, t, _ = seen["qkv"].shape
    q, k, _v = seen["qkv"].double().reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)  # [B, h, T, T]
    want = probs[:, :, 0].mean(1) if lay.n_cls else probs.mean((1, 2))
    assert out["attn"].dtype == torch.float32
    np.testing.assert_allclose(out["attn"], want, atol=2e-6, rtol=1e-5)
    if "attn_pool" in out:
        hand = _pool_probs_by_hand(model.attn_pool, seen["post"].float())
        np.testing.assert_allclose(out["attn_pool"], hand.mean(1), atol=2e-6, rtol=1e-5)


@torch.no_grad()
def test_output_tokens_from_the_lake_are_forward_features(fam):
    db = open_lake(fam.path)
    slots = db.sql("SELECT slot FROM tokens WHERE run = 'plain' ORDER BY image_id, token"
                   ).column(0).to_numpy()
    post = db.gather("plain", slots, tokens="post")
    pre = db.gather("plain", slots).astype(np.float32)
    with torch.no_grad():
        ref = fam.network.forward_features(_pixels(db, "plain", fam.px)).numpy()
    ref = ref.reshape(post.shape)
    assert db.final_norm("plain")["type"] == fam.case["norm"]
    if fam.case["norm"] == "identity":  # RADIO: the stored token is the output token
        np.testing.assert_array_equal(post, pre)
    else:
        assert not np.allclose(post, pre, atol=1e-2)
    # fp16 rounding of the stored token passes through the norm (tests/test_output_tokens.py)
    assert np.abs(post - ref).max() <= 1e-3 * np.abs(ref).max()
    man = db.manifest("plain")
    assert man["random_weights"] and man["token_layout"]["family"] == fam.case["family"]
    assert man["native_img_size"] == resolve_model(fam.alias).img_size
    assert db.validate("plain") == []


def test_blocks_table(fam):
    db = open_lake(fam.path)
    depth = len(fam.network.blocks)
    n_tok = db.manifest("plain")["token_layout"]
    t = n_tok["n_cls"] + n_tok["n_reg"] + 9
    got = db.sql("SELECT count(*), count(q_norm), max(block) FROM blocks WHERE run = 'plain'"
                 ).to_pylist()[0]
    assert list(got.values()) == [N_IMAGES * depth * t, N_IMAGES * depth * t, depth - 1]
    diff = db.sql("SELECT max(abs(b.norm - t.norm)) FROM blocks b JOIN tokens t USING "
                  "(run, image_id, token) WHERE run = 'plain' AND b.block = ?",
                  params=[depth - 1]).column(0)[0].as_py()
    assert diff <= 1e-6 * db.sql("SELECT max(norm) FROM tokens WHERE run = 'plain'"
                                 ).column(0)[0].as_py()


@torch.no_grad()
def test_record_mlp_statistics_and_neuron_ranking(fam):
    """The MLP hidden activation is the fc2 input (the gated product for AIMv2's SwiGLU): the
    stored per-image sums equal the sums over the patch tokens of a forward pass on the stored
    pixels."""
    db = open_lake(fam.path)
    net = fam.network
    depth, hidden = len(net.blocks), net.blocks[0].mlp.fc2.in_features
    arrays = db.layout("mlp").arrays
    assert tuple(arrays["mlp_abs_outlier"].shape) == (depth, depth, hidden)
    assert tuple(arrays["mlp_sum"].shape) == (depth, hidden)
    if fam.alias.startswith("aimv2"):
        assert type(net.blocks[0].mlp).__name__ == "SwiGLU"
    seen, hooks = {}, []
    for b, blk in enumerate(net.blocks):
        hooks.append(blk.mlp.fc2.register_forward_pre_hook(
            lambda _m, a, b=b: seen.__setitem__(b, a[0])))
    with torch.no_grad():
        net.forward_features(_pixels(db, "mlp", fam.px))
    for h in hooks:
        h.remove()
    n_prefix = fam.case["n_cls"] + fam.case["n_reg"]
    ids = db.sql("SELECT image_id FROM images WHERE run = 'mlp' ORDER BY image_id").column(0)
    stored = db.image_array("mlp", "mlp_abs_sum", ids.to_numpy())  # [N, L, H]
    want = torch.stack([seen[b][:, n_prefix:].abs().sum(1) for b in range(depth)], 1)
    np.testing.assert_allclose(stored, want.numpy(), rtol=1e-4, atol=1e-4)
    n = db.sql("SELECT count(*), count(rank) FROM neurons WHERE run = 'mlp'").to_pylist()[0]
    assert list(n.values()) == [depth * hidden, depth * hidden]  # --detect-block -1: all ranked


def test_test_time_register_run(fam):
    db = open_lake(fam.path)
    lay = db.manifest("tt")["token_layout"]
    n_prefix = fam.case["n_cls"] + fam.case["n_reg"]
    assert lay["n_ttreg"] == 1 and (lay["n_cls"], lay["n_reg"]) == (fam.case["n_cls"],
                                                                     fam.case["n_reg"])
    kinds = db.sql("SELECT kind FROM tokens WHERE run = 'tt' AND image_id = "
                   "(SELECT min(image_id) FROM images WHERE run = 'tt') ORDER BY token"
                   ).column(0).to_pylist()
    assert kinds == ["cls"] * fam.case["n_cls"] + ["reg"] * fam.case["n_reg"] + ["ttreg"] + [
        "patch"] * 9
    cfg = db.manifest("tt")["config"]["test_time_registers"]
    assert cfg["source_run"] == "mlp" and len(cfg["neurons"]) == 2
    # the stored tokens are the network's with the register inserted and the neurons moved
    # (extract/_ttreg.py): at each chosen neuron's fc2 input the patches hold 0
    net = copy.deepcopy(fam.network)
    tt = TTRegister(net, [tuple(n) for n in cfg["neurons"]])
    seen, hooks = {}, []
    for b, n in cfg["neurons"]:
        hooks.append(net.blocks[b].mlp.fc2.register_forward_pre_hook(
            lambda _m, a, key=(b, n): seen.__setitem__(key, a[0][..., key[1]])))  # [N, T]
    hooks.append(net.norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("pre", a[0])))
    with torch.no_grad():
        net.forward_features(_pixels(db, "tt", fam.px))
    for h in hooks:
        h.remove()
    tt.close()
    for b, n in cfg["neurons"]:
        act = seen[b, n]
        assert act.shape[1] == n_prefix + 1 + 9 and not act[:, n_prefix + 1:].any()
    slots = db.sql("SELECT slot FROM tokens WHERE run = 'tt' ORDER BY image_id, token"
                   ).column(0).to_numpy()
    stored = db.gather("tt", slots).astype(np.float32).reshape(seen["pre"].shape)
    ref = seen["pre"].numpy()
    assert np.abs(stored - ref).max() <= 1e-3 * np.abs(ref).max()
    assert np.linalg.norm(stored[:, n_prefix], axis=-1).min() > 0  # the zero token was written to
    if fam.case["family"] == "siglip":  # the pooling head attends over the extra token too
        assert tuple(db.layout("tt").arrays["attn_pool"].shape) == (n_prefix + 1 + 9,)


def test_maps_draw_the_pooling_query_attention(fam, tmp_path):
    db = open_lake(fam.path)
    res = analyze.maps(db, runs="plain", out=tmp_path, n_images=2)
    t = pq.read_table(tmp_path / "maps.parquet").to_pandas()
    assert (tmp_path / "maps.png").stat().st_size > 0 and res["images"]
    if fam.case["family"] != "siglip":
        assert "attn_pool" not in t.columns
        return
    ids = sorted(t.image_id.unique())
    stored = db.image_array("plain", "attn_pool", np.asarray(ids))  # [n, T]
    for i, image_id in enumerate(ids):
        rows = t[t.image_id == image_id]
        np.testing.assert_allclose(rows.attn_pool, stored[i][rows.token.to_numpy()], rtol=1e-6)
    np.testing.assert_allclose(stored.sum(1), 1, atol=1e-5)  # no prefix tokens: patches only


@torch.no_grad()
def test_stored_pooling_attention_is_that_of_the_output_tokens(fam):
    """attn_pool in the lake = the pooling query's attention recomputed from the lake's own output
    tokens (Lake.gather tokens='post') and the head's parameters: the definition, end to end."""
    if fam.case["family"] != "siglip":
        pytest.skip("only SigLIP has a pooling head")
    db = open_lake(fam.path)
    t = db.sql("SELECT image_id, slot FROM tokens WHERE run = 'plain' ORDER BY image_id, token"
               ).to_pydict()
    ids = sorted(set(t["image_id"]))
    post = torch.from_numpy(db.gather("plain", np.asarray(t["slot"]), tokens="post"))
    hand = _pool_probs_by_hand(fam.network.attn_pool, post.reshape(len(ids), 9, -1)).mean(1)
    np.testing.assert_allclose(db.image_array("plain", "attn_pool", np.asarray(ids)), hand,
                               atol=2e-3 * float(hand.max()))


# --- families, aliases and `tokenlake models` (weightless meta-device models) -------------------

MINE = {"radio", "siglip", "aimv2"}


def _declared() -> dict[str, str]:
    return {a: f.name for f in model_families() for a, _, _ in f.aliases}


def test_aliases_pin_tags_at_timm_native_resolution_and_resolve_to_their_family():
    declared = _declared()
    mine = {a: s for a, s in all_aliases().items() if a.split("_")[0] in MINE}
    assert {"radio_b", "radio_g", "radio_v4_h", "siglip_v2_b", "siglip_so400m", "aimv2_l",
            "aimv2_3b"} <= set(mine)
    for alias, spec in mine.items():
        name = spec.timm_name.split(".")[0]
        assert spec.timm_name in timm.list_pretrained(name), alias  # a tag timm knows
        assert spec.img_size == timm.get_pretrained_cfg(spec.timm_name).input_size[-1], alias
        model = meta_backbone(spec, spec.img_size)
        assert family_of(model).name == declared[alias], alias
    for alias, spec in ALIASES.items():  # the paper's: by their model class
        assert family_of(meta_backbone(spec, spec.img_size)).name in ("vit", "swin", "pvt")


def test_siglip_predicate_wins_over_vit_and_gap_variants_stay_vit():
    with torch.device("meta"):
        map_pool = timm.create_model("vit_base_patch16_siglip_224", pretrained=False)
        gap = timm.create_model("vit_base_patch16_siglip_gap_224", pretrained=False)
        two_queries = timm.create_model("vit_base_patch16_siglip_224", pretrained=False)
    assert family_of(map_pool).name == "siglip" and family_of(gap).name == "vit"
    two_queries.attn_pool.latent_len = 2
    with pytest.raises(ValueError, match="2 latent queries"):
        make_adapter(two_queries, img_size=224)


def test_radio_register_count_comes_from_the_model():
    v3 = make_adapter(meta_backbone(resolve_model("radio_b"), 512), img_size=512).layout
    v4 = make_adapter(meta_backbone(resolve_model("radio_v4_h"), 512), img_size=512).layout
    assert (v3.n_cls, v3.n_reg, v4.n_cls, v4.n_reg) == (1, 7, 1, 9)  # v4 has 9, not 7
    with torch.device("meta"):
        three = timm.create_model("vit_base_patch16_radio_v3", pretrained=False, reg_tokens=3)
    assert make_adapter(three, img_size=512).layout.n_reg == 3


def test_models_command_lists_families_aliases_and_layouts(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    sections = {s.split(":", 1)[0]: s for s in text.split("\n\n")}
    assert {"vit", "swin", "pvt", "siglip"} <= set(sections)
    row = r"\s+".join
    vit, siglip = sections["vit"], sections["siglip"]
    assert re.search(row(["radio_b", "vit_base_patch16_radio_v3", "c_radio", "512", "1", "7",
                          "32x32=1024", "1032"]), vit)
    assert re.search(row(["radio_v4_so400m", "vit_so400m_patch16_radio_v4", "c_radio", "512",
                          "1", "9", "32x32=1024", "1034"]), vit)
    assert re.search(row(["aimv2_l", "aimv2_large_patch14_224", "apple_pt", "224", "0", "0",
                          "16x16=256", "256"]), vit)
    assert re.search(row(["dinov2_g_reg4", "vit_giant_patch14_reg4_dinov2", "lvd142m", "518",
                          "1", "4", "37x37=1369", "1374"]), vit)
    assert re.search(row(["siglip_v2_b", "vit_base_patch16_siglip_224", "v2_webli", "224", "0",
                          "0", "14x14=196", "196"]), siglip)
    assert "swinv2_t" in sections["swin"] and "pvt_b2" in sections["pvt"]
    assert "swinv2_t" not in vit and "siglip_b " not in vit
    for name in ("vit", "siglip"):
        assert "--blocks all, --record-mlp, --test-time-registers" in sections[name]
    assert "options:      none beyond the basics" in sections["swin"]
    assert "a predicate on the model" in siglip and "attn_pool" in siglip
    # every table is aligned: the columns of each alias row start where the header's do
    header = next(line for line in vit.splitlines() if line.strip().startswith("alias "))
    starts = [header.index(h) for h in ("timm name", "tag")]
    for line in vit.splitlines():
        if line.startswith(("    radio_", "    dino_")):
            assert [m.start() for m in re.finditer(r"\S+", line)][1:3] == starts, line
    assert main(["models", "--family", "siglip"]) == 0
    only = capsys.readouterr().out
    assert only.startswith("siglip:") and "dinov2_s" not in only and "siglip_v2_g" in only
    assert main(["models", "--family", "nope"]) == 2
    assert "known: " in capsys.readouterr().err


# --- a family registered from outside the package ----------------------------------------------

class _ToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        probs = self.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5)  # [B, h, T, T]
        return self.proj((probs @ v).transpose(1, 2).reshape(b, t, d))


class ToyTokenMixer(nn.Module):
    """A class tokenlake's families do not know: CLS + 8-px patches, one attention block, a final
    LayerNorm (what forward_features ends with)."""

    def __init__(self, img_size: int = 32, patch: int = 8, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.patch, self.num_features = patch, dim
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.1)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _ToyAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():  # non-trivial final norm (see _nontrivial_final_norm)
            self.norm.weight.uniform_(0.5, 2.0)
            self.norm.bias.normal_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        e = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, Np, D]
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), e], 1) + self.pos_embed
        h = h + self.attn(self.norm1(h))
        return self.norm(h)  # [B, T, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


class ToyAdapter(Adapter):
    def __init__(self, model, *, img_size: int, blocks: bool) -> None:
        super().__init__(model, img_size=img_size, blocks=blocks)
        side = img_size // model.patch
        self.layout = TokenLayout(family="toy", n_cls=1, n_reg=0, grid=(side, side),
                                  cell=model.patch, pixel_offset=0, embed_dim=model.num_features,
                                  depth=1)
        self.hooks.input(model.norm, "pre")
        self.hooks.output(model.patch_embed, "embed")
        self.hooks.output(model.attn.softmax, "probs")

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        post = self.model.forward_features(x)  # [B, T, D]
        pre = self.hooks.pop("pre")  # [B, T, D]
        probs = self.hooks.pop("probs")  # [B, h, T, T]
        embed = self.hooks.pop("embed").permute(0, 2, 3, 1)  # [B, H, W, D]
        return {"tokens": pre, "norm": pre.float().norm(dim=-1),
                "attn": probs[:, :, 0].float().mean(1), "nbr_cos": neighbour_cosine(embed),
                "cls_post": post[:, 0].float(), "patch_mean_post": post[:, 1:].float().mean(1)}


TOY_TIMM_NAME = "tokenlake_test_toy_patch8"


def _toy_entrypoint(pretrained: bool = False, **kwargs):
    if pretrained:
        raise ValueError("the toy has no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return ToyTokenMixer(**kwargs)


_toy_entrypoint.__name__ = TOY_TIMM_NAME


@pytest.fixture
def toy_family(monkeypatch):
    if not timm.is_model(TOY_TIMM_NAME):
        timm.models.register_model(_toy_entrypoint)
    model_families()  # load the package's families, then register into a copy restored after
    monkeypatch.setattr(_registry, "_FAMILIES", dict(_registry._FAMILIES))
    return register_family(Family(
        name="toy", adapter=ToyAdapter, classes=("ToyTokenMixer",),
        description="a test's toy: CLS + patches, one attention block",
        attention="the block's CLS attention, mean over heads", aliases=(("toy_s", TOY_TIMM_NAME,
                                                                          32),)))


def test_toy_family_extracts_end_to_end_through_the_cli(toy_family, tmp_path, image_helpers,
                                                        capsys):
    imgs, lake = tmp_path / "imgs", tmp_path / "lake"
    image_helpers.write_flat_folder(imgs, n=3)
    args = ["extract", "--lake", str(lake), "--model", "toy_s", "--data", str(imgs), "--weights",
            "random", "--decode-workers", "0", "--quiet", "--run", "toy"]
    assert main(args) == 0
    db = open_lake(lake)
    man = db.manifest("toy")
    assert man["random_weights"] and man["token_layout"]["family"] == "toy"
    assert man["n_images"] == 3 and man["n_errors"] == 1
    t = db.sql("SELECT image_id, kind, attn, slot FROM tokens WHERE run = 'toy' "
               "ORDER BY image_id, token").to_pydict()
    assert t["kind"][:2] == ["cls", "patch"] and len(t["kind"]) == 3 * 17
    # the stored attention and output tokens, recomputed from the rebuilt (seeded) network
    net = create_backbone(resolve_model("toy_s"), weights=RANDOM, img_size=32)
    x = _pixels(db, "toy", 32)
    with torch.no_grad():
        h = net.norm1(torch.cat([net.cls_token.expand(3, -1, -1),
                                 net.patch_embed(x).flatten(2).transpose(1, 2)], 1) + net.pos_embed)
        q, k, _ = net.attn.qkv(h).reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        cls_attn = (q[:, :, 0:1] @ k.transpose(-2, -1) / 4).softmax(-1)[:, :, 0].mean(1)
        ref = net.forward_features(x)
    np.testing.assert_allclose(np.asarray(t["attn"]).reshape(3, 17), cls_attn, atol=1e-5)
    post = db.gather("toy", np.asarray(t["slot"]), tokens="post").reshape(ref.shape)
    assert np.abs(post - ref.numpy()).max() <= 1e-3 * ref.abs().max().item()
    # options the family does not claim are refused by name
    assert main([*args[:-1], "toy-blocks", "--blocks", "all"]) == 2
    assert "--blocks all: not implemented for the toy family" in capsys.readouterr().err
    assert main(["models", "--family", "toy"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"toy_s\s+" + TOY_TIMM_NAME + r"\s+-\s+32\s+1\s+0\s+4x4=16\s+17", out)


def test_unknown_model_class_is_refused_naming_the_families(tmp_path, image_helpers, capsys):
    image_helpers.write_flat_folder(tmp_path / "imgs", n=1)
    assert main(["extract", "--lake", str(tmp_path / "lake"), "--model", "resnet18", "--data",
                 str(tmp_path / "imgs"), "--weights", "random", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not know how to extract tokens from a ResNet" in err
    for name in ("vit (VisionTransformer)", "siglip (VisionTransformer)",
                 "swin (SwinTransformerV2)", "pvt (PyramidVisionTransformerV2)"):
        assert name in err
    assert "register_family" in err
