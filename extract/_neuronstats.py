"""Register-neuron statistics, accumulated on the device while a ``--record-mlp`` run extracts.

Ranking register neurons as Jiang et al. 2025 do (github.com/nickjiang2378/test-time-registers,
shared/algorithms.py ``find_register_neurons``) needs, per image, every neuron's mean |activation|
at the image's outlier positions, over a few hundred images at full resolution. Raw activations
cost L x H x Np x 2 bytes per image (269 MB for DINOv2-L at 518 px, ``mlp_acts``); the sums below
cost about 11 MB and are reduced from the activations while they are still on the device. The
outlier positions are kept for *every* block as detection block, so the ranking
(tokenlake.analyze._neurons) can still choose the detection block afterwards.

Per image, with ``a[l, h, p]`` the input of ``blocks[l].mlp.fc2`` (extract/_ttreg.py) of neuron
``h`` at patch token ``p`` (computed in the run's compute dtype, reduced in float64),
``n[d, p]`` the L2 norm of block ``d``'s output at ``p`` (the ``blocks`` table's norm) and
``thr`` the run's outlier threshold (``config.threshold``: the 98th-percentile patch norm of its
``--outlier-ref`` run):

    O_d = {p : n[d, p] > thr}                  patch tokens only; compared in float64, as SQL does
    mlp_n_outlier   [L]       int32    |O_d|
    mlp_abs_outlier [L, L, H] float32  [d, l, h]: mean over p in O_d of |a[l, h, p]|; 0 if O_d = {}
    mlp_n_below     [L, H]    int32    #{p : a[l, h, p] < 0.5}: their sparsity test's count
                                       (sparsity_activation_threshold 0.5, fixed at extraction)
    mlp_sum_final   [L, H]    float32  sum over p in O_{L-1} of a: outliers of the last block,
                                       i.e. the run's ``outliers`` view (the contrast score)
    mlp_sum         [L, H]    float32  sum over every patch token of a
    mlp_abs_sum     [L, H]    float32  sum over every patch token of |a|
    mlp_acts        [L, H, Np] float16 the raw activations, only with --mlp-acts (tiny subsets)

On a GPU these arrays reach the host through pinned (page-locked) buffers, one set per batch in
flight: ``check_pinned_memory`` refuses at plan time a batch size whose sets would not fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from tokenlake import store
from tokenlake.extract._adapters import fp32_exact

SPARSITY_ACTIVATION = 0.5  # their sparsity_activation_threshold (shared/algorithms.py default)
# the extraction loop launches batch i+1 before finishing batch i (extract/_loop.py): at most two
# batches' host copies are held in pinned buffers at once
PINNED_SETS = 2
# pinned memory cannot be paged out: the share of the host's physical memory those sets may take,
# leaving the rest to the decoding processes, the shard buffers and the system
PINNED_SHARE = 0.25
STATS = ("mlp_abs_outlier", "mlp_n_outlier", "mlp_n_below", "mlp_sum_final", "mlp_sum",
         "mlp_abs_sum")
ACTS = "mlp_acts"


@dataclass(frozen=True)
class MlpRecord:
    """What a --record-mlp run computes: ``threshold`` decides outliers at every block; ``acts``
    also returns the raw activations; ``below`` is the sparsity test's activation level."""

    threshold: float
    acts: bool = False
    below: float = SPARSITY_ACTIVATION


def mlp_specs(depth: int, hidden: int, n_patches: int, *, acts: bool) -> dict[str, store.ArraySpec]:
    """The image arrays of a --record-mlp run (module doc)."""
    def spec(shape, dtype):
        return store.ArraySpec(shape=shape, dtype=dtype, kind="image")

    lh = (depth, hidden)
    specs = {"mlp_abs_outlier": spec((depth, *lh), "float32"), "mlp_n_outlier": spec((depth,), "int32"),
             "mlp_n_below": spec(lh, "int32"), "mlp_sum_final": spec(lh, "float32"),
             "mlp_sum": spec(lh, "float32"), "mlp_abs_sum": spec(lh, "float32")}
    if acts:
        specs[ACTS] = spec((*lh, n_patches), "float16")
    return specs


def mlp_bytes_per_image(depth: int, hidden: int, n_patches: int, *, acts: bool) -> int:
    """Host bytes of one image's --record-mlp arrays (module doc), as ``mlp_specs`` declares."""
    return sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
               for s in mlp_specs(depth, hidden, n_patches, acts=acts).values())


def check_pinned_memory(*, depth: int, hidden: int, n_patches: int, acts: bool, batch_size: int,
                        host_bytes: int, processes: int = 1) -> None:
    """Refuse a --record-mlp batch size whose pinned host buffers (PINNED_SETS sets of
    ``batch_size`` images' arrays in each of ``processes`` extraction processes) exceed
    PINNED_SHARE of ``host_bytes``, naming the largest batch size that fits. DINOv2-G at 518 px
    with --mlp-acts: ~0.45 GB per image (40 blocks x 4096 neurons x 1369 patches, fp16)."""
    per_image = mlp_bytes_per_image(depth, hidden, n_patches, acts=acts)
    budget = int(host_bytes * PINNED_SHARE)
    sets = processes * PINNED_SETS
    need = sets * batch_size * per_image
    if need <= budget:
        return
    fits = budget // (sets * per_image)
    workers = f"{processes} processes x " if processes > 1 else ""
    what = (f"--record-mlp{' --mlp-acts' if acts else ''} at --batch-size {batch_size} needs "
            f"{need / 2**30:.1f} GiB of pinned host memory ({workers}{PINNED_SETS} batches in "
            f"flight x {batch_size} images x {per_image / 2**20:.0f} MiB: {depth} blocks x "
            f"{hidden} neurons{f' x {n_patches} patches' if acts else ''}), more than the "
            f"{PINNED_SHARE:.0%} of this machine's {host_bytes / 2**30:.0f} GiB it may pin")
    if fits:
        raise ValueError(f"{what}: rerun with --batch-size {fits}")
    raise ValueError(f"{what}, even at --batch-size 1: "
                     + ("drop --mlp-acts (the statistics alone are far smaller), " if acts else "")
                     + ("use fewer --workers, " if processes > 1 else "")
                     + "use a smaller --img-size or a machine with more memory")


def host_memory_bytes() -> int:
    """This machine's physical memory (POSIX sysconf)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def neuron_stats(acts: list[torch.Tensor], block_norm: torch.Tensor, n_prefix: int,
                 rec: MlpRecord) -> dict[str, torch.Tensor]:
    """acts: L x [B, T, H] fc2 inputs (all tokens); block_norm: [B, L, T] fp32 output norm of every
    block -> the per-image statistics of the module doc, on the acts' device. Each block's tensor
    is released as soon as it is reduced (they are the largest thing the forward pass keeps)."""
    # outside autocast: masked sums in bf16 would round the activations they add up; in float64,
    # which no TF32 or bf16 mode rounds, sums over ~1000 patches lose nothing float32 can store
    with fp32_exact(block_norm.device.type):
        is_out = block_norm[:, :, n_prefix:].double() > rec.threshold  # [B, Ld, Np]
        mask = is_out.double()
        count = is_out.sum(-1, dtype=torch.int32)  # [B, Ld]
        final = mask[:, -1:]  # [B, 1, Np]: outliers of the last block
        at, below, s_final, s_all, s_abs = [], [], [], [], []
        while acts:
            a = acts.pop(0)[:, n_prefix:].double()  # [B, Np, H]
            absolute = a.abs()
            at.append(torch.bmm(mask, absolute))  # [B, Ld, H] sums over O_d
            below.append((a < rec.below).sum(1, dtype=torch.int32))  # [B, H]
            s_final.append(torch.bmm(final, a)[:, 0])  # [B, H]
            s_all.append(a.sum(1))  # [B, H]
            s_abs.append(absolute.sum(1))  # [B, H]
            del a, absolute
        mean = torch.stack(at, 2) / count.clamp(min=1)[:, :, None, None]  # [B, Ld, L, H]
        return {"mlp_abs_outlier": mean.float(), "mlp_n_outlier": count,
                "mlp_n_below": torch.stack(below, 1),  # [B, L, H]
                "mlp_sum_final": torch.stack(s_final, 1).float(),
                "mlp_sum": torch.stack(s_all, 1).float(),
                "mlp_abs_sum": torch.stack(s_abs, 1).float()}


def raw_acts(acts: list[torch.Tensor], n_prefix: int) -> torch.Tensor:
    """L x [B, T, H] -> [B, L, H, Np] fp16: what each block's fc2 received at the patch tokens."""
    return torch.stack([a[:, n_prefix:] for a in acts], 1).transpose(2, 3).to(torch.float16)


def mlp_outputs(acts: list[torch.Tensor], block_norm: torch.Tensor, n_prefix: int,
                rec: MlpRecord) -> dict[str, torch.Tensor]:
    """What --record-mlp adds to an adapter's output: the raw activations when asked (taken
    before the statistics, which release each block's tensor) and the per-image statistics.
    acts: L x [B, T, H] fc2 inputs; block_norm [B, L, T] decides the outliers."""
    out = {ACTS: raw_acts(acts, n_prefix)} if rec.acts else {}  # [B, L, H, Np] fp16
    out.update(neuron_stats(acts, block_norm, n_prefix, rec))
    return out
