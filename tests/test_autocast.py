"""What the lake calls fp32 is fp32 on a GPU too: `fp32_exact` (autocast and TF32 off, every
setting restored) and the ViT, Swin-v2 and PVT-v2 adapters run under bf16 autocast on the CPU,
which rounds the same matmuls CUDA autocast does. Each attention is held against an fp64
recomputation from the very activations the bf16 model produced, at a tolerance that the bf16
rounding of the logits breaks (checked by running the adapter with `fp32_exact` disabled)."""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2

from tokenlake.extract import create_backbone, make_adapter, resolve_model, resolve_weights
from tokenlake.extract._adapters import fp32_exact, received

B = torch.backends
# every knob fp32_exact may touch, parents before children (children inherit "none")
NODES = (B, B.cudnn, B.mkldnn, B.cuda.matmul, B.mkldnn.matmul, B.cudnn.conv, B.cudnn.rnn,
         B.mkldnn.conv, B.mkldnn.rnn)
ROUNDING = (B.cuda.matmul, B.mkldnn.matmul, B.cudnn.conv, B.cudnn.rnn)
FP32_KEYS = ("norm", "attn", "nbr_cos", "cls_post", "patch_mean_post")  # every family's
ATOL, RTOL = 2e-6, 1e-5  # fp32 softmax against fp64; bf16 logits are ~100x further off


def _legacy() -> list:
    """torch's legacy precision getters, 'raises' where torch refuses to answer (mixed APIs)."""
    out = []
    for get in (torch.get_float32_matmul_precision, lambda: B.cuda.matmul.allow_tf32,
                lambda: B.cudnn.allow_tf32):
        try:
            out.append(get())
        except RuntimeError:
            out.append("raises")
    return out


def _state() -> tuple[list, list]:
    return _legacy(), [n.fp32_precision for n in NODES]


@pytest.fixture
def precision_state():
    """Put torch's precision settings back as the session had them, whatever a test did."""
    matmul, cudnn = torch.get_float32_matmul_precision(), B.cudnn.allow_tf32
    nodes = [n.fp32_precision for n in NODES]
    yield
    torch.set_float32_matmul_precision(matmul)
    B.cudnn.allow_tf32 = cudnn
    for node, value in zip(NODES, nodes, strict=True):
        node.fp32_precision = value


USER_SETTINGS = {
    "default": lambda: None,
    "high": lambda: torch.set_float32_matmul_precision("high"),
    "medium": lambda: torch.set_float32_matmul_precision("medium"),  # oneDNN: bf16 matmuls
    "legacy tf32": lambda: setattr(B.cuda.matmul, "allow_tf32", True),
    "new api tf32": lambda: setattr(B, "fp32_precision", "tf32"),  # leaves inherit it
    "mixed apis": lambda: (torch.set_float32_matmul_precision("high"),
                           setattr(B.cudnn.conv, "fp32_precision", "ieee")),
}


@pytest.mark.usefixtures("precision_state")
@pytest.mark.parametrize("user", USER_SETTINGS)
def test_fp32_exact_turns_autocast_and_tf32_off_and_restores_every_setting(user):
    USER_SETTINGS[user]()
    before = _state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fp32_exact("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert [k.fp32_precision for k in ROUNDING] == ["ieee"] * 4
            # the legacy getters (torch.compile reads them) say so wherever they were readable
            for was, now, exact in zip(before[0], _legacy(), ["highest", False, False],
                                       strict=True):
                assert was == "raises" or now == exact
            a = torch.randn(4, 8)
            assert (a @ a.T).dtype == torch.float32  # bf16 without it
            with fp32_exact("cpu"):  # re-entrant: a family's hook inside another block
                pass
            assert not torch.is_autocast_enabled("cpu")
            assert [k.fp32_precision for k in ROUNDING] == ["ieee"] * 4
        assert torch.is_autocast_enabled("cpu")
    assert _state() == before


@pytest.mark.usefixtures("precision_state")
def test_fp32_exact_restores_after_an_exception():
    torch.set_float32_matmul_precision("high")
    before = _state()
    with pytest.raises(KeyError), fp32_exact("cpu"):
        assert torch.get_float32_matmul_precision() == "highest"
        raise KeyError("boom")
    assert _state() == before and torch.get_float32_matmul_precision() == "high"


def test_fp32_exact_lets_one_thread_at_a_time_change_the_settings():
    inside, release, entered = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with fp32_exact("cpu"):
            inside.set()
            release.wait(5)

    def other():
        with fp32_exact("cpu"):
            entered.set()

    first = threading.Thread(target=holder)
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=other)
    second.start()
    assert not entered.wait(0.2)  # waits for the first to restore what it changed
    release.set()
    first.join(5)
    second.join(5)
    assert entered.is_set()


# -- the adapters under bf16 autocast -----------------------------------------------------------


def _backbone(alias: str, px: int) -> torch.nn.Module:
    return create_backbone(resolve_model(alias), weights=resolve_weights("random"), img_size=px)


def _sharpen(linear: torch.nn.Linear, factor: float) -> None:
    """Scale a random-weight projection so its attention logits spread like a trained model's
    (random init gives logits ~1e-4 apart, which bf16 rounding barely moves)."""
    with torch.no_grad():
        linear.weight.mul_(factor)


def _first(seen: dict, key: str, value: torch.Tensor) -> None:
    """Keep a hook's first value. Returns None: a forward hook's return value replaces `out`."""
    seen.setdefault(key, value)


def _x(px: int) -> torch.Tensor:
    return torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(7))


def _run(adapter, x: torch.Tensor, *, autocast: bool = True) -> dict[str, torch.Tensor]:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return adapter(x)


def _without_fp32_exact(monkeypatch, family: str) -> None:
    """The mutant the tolerances must catch: the family's fp32_exact does nothing."""
    module = importlib.import_module(f"tokenlake.extract.families.{family}")
    monkeypatch.setattr(module, "fp32_exact", lambda _device_type: contextlib.nullcontext())


def _assert_fp32(out: dict[str, torch.Tensor], *extra: str) -> None:
    """Every family's fp32 arrays and `extra` are there, and every array but the model's own
    `tokens` is float32."""
    assert set(FP32_KEYS + extra) <= set(out)
    for key, value in out.items():
        assert key == "tokens" or value.dtype == torch.float32, key


def _assert_exact_and_mutant_caught(got, mutant, want) -> None:
    """got equals the fp64 reference to ATOL/RTOL; the bf16-rounded mutant misses it by far."""
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)
    miss = ((mutant.double() - want).abs() - RTOL * want.abs()).max().item()
    assert miss > 20 * ATOL, f"bf16 logits would pass this test (max excess {miss:.2e})"


@pytest.mark.parametrize(("alias", "px"), [("deit3_s", 64), ("dinov2_s_reg4", 70)])
def test_vit_attention_and_norms_are_fp32_under_bf16_autocast(alias, px, monkeypatch):
    model = _backbone(alias, px)
    _sharpen(model.blocks[-1].attn.qkv, 100)  # logits' std ~1.5
    adapter = make_adapter(model, img_size=px, blocks=True)
    attn, seen = model.blocks[-1].attn, {}
    hooks = [attn.qkv.register_forward_hook(lambda _m, _a, o: _first(seen, "qkv", o)),
             model.blocks[-1].register_forward_hook(lambda _m, _a, o: _first(seen, "out", o))]
    x = _x(px)
    out = _run(adapter, x)
    for h in hooks:
        h.remove()
    assert seen["qkv"].dtype == torch.bfloat16  # the blocks did run in bf16
    lay = adapter.layout
    assert lay.n_reg == (4 if "reg4" in alias else 0)
    _assert_fp32(out, "block_norm", "qkv_norm", *(["registers_post"] if lay.n_reg else []))
    b, t, _ = seen["qkv"].shape
    q, k, v = seen["qkv"].double().reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    want = (q[:, :, :1] @ k.transpose(-2, -1) * attn.scale).softmax(-1)[:, :, 0].mean(1)  # [B, T]
    _without_fp32_exact(monkeypatch, "vit")
    _assert_exact_and_mutant_caught(out["attn"], _run(adapter, x)["attn"], want)
    adapter.close()
    # per-block reductions of the bf16 activations, in fp32
    torch.testing.assert_close(out["block_norm"][:, -1].double(), seen["out"].double().norm(dim=-1),
                               rtol=1e-6, atol=0)
    for i, t_ in enumerate((q, k, v)):
        norm = t_.transpose(1, 2).flatten(2).norm(dim=-1)  # [B, T] over all heads
        torch.testing.assert_close(out["qkv_norm"][:, -1, i].double(), norm, rtol=1e-6, atol=0)


def test_pvt_attention_is_fp32_under_bf16_autocast(monkeypatch):
    model = _backbone("pvt_b0", 64)
    adapter = make_adapter(model, img_size=64)
    attn, seen = model.stages[-1].blocks[-1].attn, {}
    hooks = [attn.q.register_forward_hook(lambda _m, _a, o: _first(seen, "q", o)),
             attn.kv.register_forward_hook(lambda _m, _a, o: _first(seen, "kv", o))]
    x = _x(64)
    out = _run(adapter, x)
    for h in hooks:
        h.remove()
    assert seen["q"].dtype == torch.bfloat16
    _assert_fp32(out)
    b, t, _ = seen["q"].shape
    q = seen["q"].double().reshape(b, t, attn.num_heads, -1).transpose(1, 2)  # [B, h, T, hd]
    k = seen["kv"].double().reshape(b, t, 2, attn.num_heads, -1)[:, :, 0].transpose(1, 2)
    want = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1).mean((1, 2))  # [B, T]
    _without_fp32_exact(monkeypatch, "pvt")
    _assert_exact_and_mutant_caught(out["attn"], _run(adapter, x)["attn"], want)
    adapter.close()


def _tiny_swin() -> SwinTransformerV2:
    """A Swin-v2 whose last block is shifted and masked: 128 px, last stage 4 x 4, windows of 2."""
    torch.manual_seed(0)
    model = SwinTransformerV2(img_size=128, patch_size=4, window_size=2, embed_dim=16,
                              depths=(1, 1, 1, 2), num_heads=(1, 1, 2, 2)).eval()
    last = model.layers[-1].blocks[-1]
    assert tuple(last.shift_size) == (1, 1) and last.attn_mask is not None
    return model


@torch.no_grad()
def _swin_probs(attn, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Swin-v2 window attention [B*nW, h, N, N] written out from its parameters, in fp64."""
    attn = copy.deepcopy(attn).double()
    b_, n, _c = x.shape
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(x.double(), attn.qkv.weight, bias).reshape(b_, n, 3, attn.num_heads, -1)
    q, k = qkv.permute(2, 0, 3, 1, 4)[:2]  # [B*nW, h, N, hd]
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    logits = logits * torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    rel = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    logits = logits + 16 * torch.sigmoid(rel)
    if mask is not None:  # [nW, N, N], windows of each image consecutive
        logits = (logits.view(-1, mask.shape[0], attn.num_heads, n, n)
                  + mask.double()[None, :, None]).view(b_, -1, n, n)
    return logits.softmax(-1)


def _swin_run(adapter, x, *, autocast: bool) -> tuple[dict, dict]:
    """The adapter's output and what the model itself saw at its last attention (first call)."""
    attn, seen = adapter.last.attn, {"calls": 0}

    def before(_m, args, kwargs) -> None:
        seen.setdefault("in", (args[0], kwargs.get("mask")))

    def probs(_m, _args, out) -> None:  # a forward hook's return value would replace `out`
        seen.setdefault("probs", out)

    def after(_m, _args, _out) -> None:
        seen["calls"] += 1

    hooks = [attn.register_forward_pre_hook(before, with_kwargs=True),
             attn.softmax.register_forward_hook(probs), attn.register_forward_hook(after)]
    try:
        out = _run(adapter, x, autocast=autocast)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def test_swin_attention_is_rerun_in_fp32(monkeypatch):
    """The last block's window attention is re-run on its own input in fp32: without autocast it
    is the model's own softmax; under bf16 autocast it is the fp64 softmax of the input the bf16
    model produced, where the model's own probabilities (bf16 logits) are far off."""
    model = _tiny_swin()
    adapter = make_adapter(model, img_size=128)
    x = _x(128)
    plain, seen = _swin_run(adapter, x, autocast=False)
    assert seen["calls"] == 1  # the re-run calls forward: hooks on the attention stay silent
    own = adapter._unwindow(received(seen["probs"]), 2)  # [B, T]
    torch.testing.assert_close(plain["attn"], own, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(plain["patch_mean_post"],  # the model itself is undisturbed
                                   model.forward_features(x).flatten(1, 2).mean(1))

    out, seen = _swin_run(adapter, x, autocast=True)
    _assert_fp32(out)
    windows, mask = seen["in"]
    want = adapter._unwindow(_swin_probs(adapter.last.attn, windows, mask).mean((1, 2)), 2)
    model_own = adapter._unwindow(received(seen["probs"]), 2)  # the softmax of bf16 logits
    torch.testing.assert_close(out["attn"].double(), want, atol=ATOL, rtol=RTOL)
    assert (model_own.double() - want).abs().max() > 20 * ATOL
    _without_fp32_exact(monkeypatch, "swin")
    mutant, _ = _swin_run(adapter, x, autocast=True)
    _assert_exact_and_mutant_caught(out["attn"], mutant["attn"], want)
    # bf16 blocks move the activations too: close to the fp32 model's map, not equal to it
    torch.testing.assert_close(out["attn"], plain["attn"], atol=5e-3, rtol=0)
    adapter.close()
