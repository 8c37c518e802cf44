"""Register neurons of a timm ViT: recording MLP activations, and test-time registers.

After Jiang et al. 2025 (*Vision Transformers Don't Need Trained Registers*): a few MLP neurons
("register neurons") put the outlier tokens' large activations into the residual stream. At test
time one extra, untrained token can take them over. What this module does, precisely:

* **Hidden activation** of block ``b``'s MLP = the input of ``blocks[b].mlp.fc2``: ``act(fc1(x))``
  for timm's ``Mlp`` (DINOv2-S/B/L, DeiT, CLIP) and ``x1 * act(x2)`` (the gated product) for
  ``GluMlp``/SwiGLU (DINOv2-G), in both cases after dropout (identity in eval) and the MLP's
  optional norm. Neuron ``n`` of block ``b`` is channel ``n`` of that input.
* **The extra token** (kind ``ttreg``) is a zero vector inserted into the sequence right after the
  prefix tokens timm builds (CLS, then trained registers), before the patches, *after* the
  position embedding was added: it has no position embedding, so patches keep their exact
  positions and embeddings. ``model.num_prefix_tokens`` grows by one, so timm's own code
  (``forward_intermediates``, pooling) treats it as a prefix token.
* **Moving the activations**: for each chosen neuron (block ``b``, neuron ``n``) a forward
  pre-hook on ``blocks[b].mlp.fc2`` replaces, per image, the extra token's activation by the
  **maximum of that neuron's activation over the image's patch tokens** and sets the neuron's
  activation at **every patch token to zero**. CLS and trained registers are left unchanged. The
  max and the zeroing are taken per image (dim 1 of ``[B, T, H]``), so results do not depend on the
  batch size (the published reference handles batch size 1 only, and appends its token at the
  end of the sequence but then slices it as a leading register; here it *is* a leading token).
"""

from __future__ import annotations

from collections import defaultdict

import torch

MLP_ARRAY = "mlp_acts"  # image array [L, H, Np] float16: hidden activation at every patch token


def mlp_hidden_size(model: torch.nn.Module) -> int:
    return int(model.blocks[0].mlp.fc2.in_features)


def parse_ttreg(value: str) -> tuple[str, int]:
    """'RUN:K' -> (RUN, K); K >= 0."""
    run, sep, k = value.rpartition(":")
    if not sep or not run or not k.isdigit():
        raise ValueError(f"--test-time-registers takes RUN:K (a run with a neurons table and how "
                         f"many of its top neurons to move), not {value!r}")
    return run, int(k)


class TTRegister:
    """Installs the extra token and the activation-moving hooks on a timm VisionTransformer;
    ``close()`` restores the model exactly."""

    def __init__(self, model: torch.nn.Module, neurons: list[tuple[int, int]]) -> None:
        self.model = model
        self.index = int(model.num_prefix_tokens)  # the extra token's position in the sequence
        self.neurons = [(int(b), int(n)) for b, n in neurons]
        depth, hidden = len(model.blocks), mlp_hidden_size(model)
        for b, n in self.neurons:
            if not (0 <= b < depth and 0 <= n < hidden):
                raise ValueError(f"neuron (block {b}, neuron {n}) is outside this model "
                                 f"({depth} blocks x {hidden} neurons)")
        self.handles: list = []
        original = model._pos_embed  # the bound method of the class
        index = self.index

        def _pos_embed(x: torch.Tensor) -> torch.Tensor:
            x = original(x)  # [B, prefix + Np, D], position embedding added, pos_drop applied
            zero = x.new_zeros(x.shape[0], 1, x.shape[-1])
            return torch.cat([x[:, :index], zero, x[:, index:]], dim=1)

        model._pos_embed = _pos_embed  # instance attribute shadows the method; removed by close()
        model.num_prefix_tokens += 1
        by_block: dict[int, list[int]] = defaultdict(list)
        for b, n in self.neurons:
            by_block[b].append(n)
        for b, ns in sorted(by_block.items()):
            fc2 = model.blocks[b].mlp.fc2
            self.handles.append(fc2.register_forward_pre_hook(self._mover(sorted(set(ns)))))

    def _mover(self, neurons: list[int]):
        index = self.index
        cols = torch.tensor(neurons, dtype=torch.long)
        on_device: dict[torch.device, torch.Tensor] = {}  # an upload per batch would be a sync

        def hook(_module, args):
            h = args[0]  # [B, T, H]
            c = on_device.get(h.device)
            if c is None:
                c = on_device[h.device] = cols.to(h.device)
            patch = h[:, index + 1:, :].index_select(-1, c)  # [B, Np, k]
            peak = patch.amax(dim=1)  # [B, k]: per image, over its own patches only
            h = h.clone()
            h[:, index, c] = peak
            h[:, index + 1:, c] = 0
            return (h, *args[1:])

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if "_pos_embed" in vars(self.model):
            del self.model._pos_embed
            self.model.num_prefix_tokens -= 1
