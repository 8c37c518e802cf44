"""What every adapter shares: the token layout, the hooks, the per-batch output contract.

An adapter (one per model family, extract/families/, found through extract/_registry.py) installs
forward hooks once and returns, per batch, a dict of device tensors:

    tokens      [B, T, D]   last block's output before the final norm, prefix tokens first
    norm        [B, T]      fp32 L2 norm of ``tokens``
    attn        [B, T]      with a CLS token: CLS attention (last block, mean over heads);
                            without: attention each token receives (mean over heads and queries)
    nbr_cos     [B, Np]     mean cosine of each patch-embedding output with its 4-neighbours
    cls_post    [B, D]      CLS after the final norm (no CLS: average-pooled final-norm token)
    patch_mean_post [B, D]  mean of patch tokens after the final norm
    registers_post [B, R, D] (models with registers only)
    mlp_*       (record_mlp=MlpRecord) per-image register-neuron statistics and, on request,
                mlp_acts [B, L, H, Np] fp16 MLP hidden activations (extract/_neuronstats.py)
    block_norm  [B, L, T]   (blocks=True) output norm of every block
    qkv_norm    [B, L, 3, T] (blocks=True) q, k, v norms of every block
    (a family may add image arrays of its own, declared by ``image_arrays()``)

Attention is recomputed from q and k in fp32: timm's fused kernels never form probabilities
(Swin-v2, whose q and k cannot be hooked: its last window attention is re-run in fp32).
Everything above except ``tokens`` (the model's own activations, in its compute dtype) and
``mlp_acts`` is computed inside ``fp32_exact()`` from ``.float()`` inputs: under ``--precision
bf16`` the blocks run in bf16, the stored reductions in fp32 ("bf16 blocks, fp32 reductions").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_B = torch.backends
# torch's per-backend fp32 precision knobs (torch >= 2.9), parents first: a child set to "none"
# inherits from its parent, so they are restored in this order
_PRECISION_NODES = (_B, _B.cudnn, _B.mkldnn, _B.cuda.matmul, _B.mkldnn.matmul, _B.cudnn.conv,
                    _B.cudnn.rnn, _B.mkldnn.conv, _B.mkldnn.rnn)
# where a float32 product may be rounded: cuBLAS and cuDNN to TF32, oneDNN (CPU) to TF32 or bf16
_ROUNDING_KNOBS = (_B.cuda.matmul, _B.mkldnn.matmul, _B.cudnn.conv, _B.cudnn.rnn)
# the knobs are process-global: one thread at a time changes and restores them (re-entrant, as
# a family's hook may run inside another fp32_exact block)
_PRECISION_LOCK = threading.RLock()


def _readable(getter):
    """A legacy getter's value, or None where it raises: torch refuses to answer once the legacy
    and the new TF32 APIs were mixed (then only the new API's knobs are touched, and restored)."""
    try:
        return getter()
    except RuntimeError:
        return None


@contextmanager
def fp32_exact(device_type: str) -> Iterator[None]:
    """Run the block in true float32: autocast off for ``device_type`` and no TF32/bf16 rounding
    of float32 matmuls or convolutions; every setting it changes is restored on exit.

    Under bf16 autocast an einsum or ``@`` of ``.float()`` operands runs in bf16, and a user or
    timm may have allowed TF32 (``torch.set_float32_matmul_precision("high")``), which rounds
    float32 products to a 10-bit mantissa: neither may touch what the lake calls fp32. The legacy
    setters go first so that torch's legacy getters stay consistent inside (torch.compile reads
    them); the per-backend knobs are then forced to "ieee", since a leaf left at "none" inherits
    a parent's TF32."""
    with _PRECISION_LOCK:
        matmul = _readable(torch.get_float32_matmul_precision)
        cudnn = _readable(lambda: _B.cudnn.allow_tf32)
        saved = [node.fp32_precision for node in _PRECISION_NODES]
        try:
            if matmul is not None:
                torch.set_float32_matmul_precision("highest")
            if cudnn is not None:
                _B.cudnn.allow_tf32 = False
            for knob in _ROUNDING_KNOBS:
                knob.fp32_precision = "ieee"
            with torch.autocast(device_type, enabled=False):
                yield
        finally:
            if matmul is not None:
                torch.set_float32_matmul_precision(matmul)
            if cudnn is not None:
                _B.cudnn.allow_tf32 = cudnn
            for node, value in zip(_PRECISION_NODES, saved, strict=True):
                node.fp32_precision = value


@dataclass(frozen=True)
class TokenLayout:
    family: str  # the registry family's name: "vit", "swin", "pvt", "siglip", ...
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


def pool_to(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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


def received(probs: torch.Tensor) -> torch.Tensor:
    """[B, h, Nq, Nk] -> [B, Nk]: attention each key receives, mean over heads and queries."""
    return probs.float().mean((1, 2))


class Adapter:
    """Base of every family's adapter: ``__call__(x)`` returns the dict above for a batch.

    A family's adapter takes ``(model, *, img_size, blocks, record_mlp=None, ttreg=None)``;
    its Family entry (extract/_registry.py) says which of the options it supports."""

    layout: TokenLayout

    def __init__(self, model: torch.nn.Module, *, img_size: int, blocks: bool) -> None:
        self.model = model
        self.img_size = img_size
        self.blocks = blocks
        self.hooks = _Hooks()

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def final_norm_module(self) -> torch.nn.Module:
        """The module whose input the lake stores as ``tokens`` (its output: the model's output
        token); saved with every run (extract/_finalnorm.py)."""
        return self.model.norm

    def image_arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-image arrays this family adds to the run: name -> (row shape, dtype)."""
        return {}

    def close(self) -> None:
        self.hooks.close()
