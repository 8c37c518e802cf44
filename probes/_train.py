"""One generic linear-probe trainer: several heads (one per learning rate) trained in one pass.

As in DINOv2's linear evaluation, every learning rate of the grid gets its own nn.Linear on the
same batches (features are read once per batch); each head keeps its best-validation state, the
head with the best validation metric is chosen. Cosine schedule over `max_epochs`; early stopping
when no head has improved for `patience` epochs (patience None: run every epoch).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

Batch = tuple[torch.Tensor, ...]  # (features, *targets), already on the device


@dataclass(frozen=True)
class TrainSpec:
    optimizer: str = "adam"  # adam | adamw | sgd
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 30
    patience: int | None = 3
    momentum: float = 0.9  # SGD only

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lrs"] = list(self.lrs)
        return d


@dataclass
class TrainOutcome:
    head: nn.Linear  # the chosen head, in its best-validation state, on the CPU
    chosen_lr: float
    best_epoch: int  # 1-based epoch of the chosen head's best validation metric
    epochs_run: int
    val_metric: float  # of the chosen head
    val_by_lr: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def _optimizer(spec: TrainSpec, heads: nn.ModuleList) -> torch.optim.Optimizer:
    groups = [{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, spec.lrs)]
    name = spec.optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=spec.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=spec.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=spec.momentum, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}: adam, adamw or sgd")


def train_linear(
    *,
    in_dim: int,
    out_dim: int,
    spec: TrainSpec,
    train_batches: Callable[[int], Iterable[Batch]],
    steps_per_epoch: int,
    val_batches: Callable[[], Iterable[Batch]],
    loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor],
    val_fn: Callable[[torch.Tensor, Batch], tuple[float, float]],
    higher_is_better: bool,
    device: torch.device,
    seed: int,
    desc: str = "probe",
    quiet: bool = False,
) -> TrainOutcome:
    """Train one linear head per lr of `spec.lrs`; return the best one on validation.

    train_batches(epoch) yields batches for that epoch; loss_fn(out, batch) is a scalar mean loss;
    val_fn(out, batch) returns (metric sum, count) so the validation metric is sum / count.
    """
    torch.manual_seed(seed)
    heads = nn.ModuleList(nn.Linear(in_dim, out_dim) for _ in spec.lrs).to(device)
    opt = _optimizer(spec, heads)
    total = max(1, spec.max_epochs * max(1, steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    sign = 1.0 if higher_is_better else -1.0
    best = [-math.inf] * len(heads)
    best_state: list[dict[str, torch.Tensor]] = [
        {k: v.detach().cpu().clone() for k, v in h.state_dict().items()} for h in heads
    ]
    best_epoch = [0] * len(heads)
    history: list[dict[str, Any]] = []
    since = 0
    stopped = False
    bar = tqdm(range(1, spec.max_epochs + 1), desc=desc, disable=quiet, file=sys.stderr,
               leave=False, dynamic_ncols=True)
    epoch = 0
    for epoch in bar:
        heads.train()
        loss_sum, n_steps = 0.0, 0
        for batch in train_batches(epoch):
            x = batch[0]
            loss = sum(loss_fn(h(x), batch) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) / len(heads)
            n_steps += 1
        heads.eval()
        sums = [0.0] * len(heads)
        counts = [0.0] * len(heads)
        with torch.no_grad():
            for batch in val_batches():
                x = batch[0]
                for i, h in enumerate(heads):
                    s, c = val_fn(h(x), batch)
                    sums[i] += s
                    counts[i] += c
        vals = [s / max(c, 1e-12) for s, c in zip(sums, counts)]
        improved = False
        for i, v in enumerate(vals):
            if sign * v > best[i] + 1e-12:
                best[i] = sign * v
                best_epoch[i] = epoch
                best_state[i] = {k: t.detach().cpu().clone() for k, t in heads[i].state_dict().items()}
                improved = True
        history.append({"epoch": epoch, "train_loss": loss_sum / max(n_steps, 1),
                        "val": {str(lr): v for lr, v in zip(spec.lrs, vals)}})
        top = max(range(len(heads)), key=lambda i: best[i])
        bar.set_postfix(loss=f"{loss_sum / max(n_steps, 1):.4g}", val=f"{sign * best[top]:.4g}")
        since = 0 if improved else since + 1
        if spec.patience is not None and since >= spec.patience:
            stopped = True
            break
    bar.close()
    chosen = max(range(len(heads)), key=lambda i: best[i])
    head = nn.Linear(in_dim, out_dim)
    head.load_state_dict(best_state[chosen])
    return TrainOutcome(
        head=head.eval(), chosen_lr=float(spec.lrs[chosen]), best_epoch=best_epoch[chosen],
        epochs_run=epoch, val_metric=sign * best[chosen],
        val_by_lr={str(lr): sign * b for lr, b in zip(spec.lrs, best)},
        history=history, stopped_early=stopped,
    )


def apply_head(
    head: nn.Module, batches: Iterable[Batch], fn: Callable[[torch.Tensor, Batch], Any]
) -> list[Any]:
    """fn(head(x), batch) for every batch, without gradients."""
    out = []
    with torch.no_grad():
        for batch in batches:
            out.append(fn(head(batch[0]), batch))
    return out
