"""Register neurons of a timm ViT or Eva: recording MLP activations, and test-time registers.

After Jiang et al. 2025 (*Vision Transformers Don't Need Trained Registers*;
github.com/nickjiang2378/test-time-registers): a few MLP neurons ("register neurons") put the
outlier tokens' large activations into the residual stream. At test time one extra, untrained token
can take them over. What this module does, precisely:

* **Hidden activation** of block ``b``'s MLP = the input of ``blocks[b].mlp.fc2``: ``act(fc1(x))``
  for timm's ``Mlp`` (DINOv2-S/B/L, DeiT, CLIP) and ``x1 * act(x2)`` (the gated product) for
  ``GluMlp``/SwiGLU (DINOv2-G; ``silu(gate) * x`` in DINOv3 S+/H+/7B and EVA-02), in both cases
  after dropout (identity in eval) and the MLP's optional norm (a LayerNorm over the neurons in
  EVA-02 B/L, ``scale_mlp``). Neuron ``n`` of block ``b`` is channel ``n`` of that input.
  (Theirs: the output of ``mlp.act``, or of the SwiGLU's hidden identity; the same tensor.)
  ``--record-mlp`` reduces it to per-image statistics (extract/_neuronstats.py) that
  ``tokenlake neurons`` ranks (analyze/_neurons.py, with its own differences from their ranking).
* **The extra token** (kind ``ttreg``) is a zero vector inserted into the sequence right after the
  prefix tokens timm builds (CLS, then trained registers), before the patches, *after* the
  position embedding was added: it has no position embedding, so patches keep their exact
  positions and embeddings. ``num_prefix_tokens`` grows by one on the model and on every
  submodule that counts prefix tokens, so timm's own code (``forward_intermediates``, pooling)
  treats it as a prefix token. On timm's ``Eva`` (DINOv3, EVA-02), ``_pos_embed`` returns
  ``(x, rope)`` with a rotary embedding for the patches only, and each ``EvaAttention`` rotates
  the tokens after *its own* ``num_prefix_tokens``: raising those too leaves the extra token
  unrotated (as CLS and storage tokens) and every patch with its own rotation, whatever the batch
  size (tested: with the extra token masked out of attention, every other token equals the plain
  model's).
* **Moving the activations**: for each chosen neuron (block ``b``, neuron ``n``) a forward
  pre-hook on ``blocks[b].mlp.fc2`` replaces, per image, the extra token's activation by the
  **maximum of that neuron's activation over the image's patch tokens** and sets the neuron's
  activation at **every patch token to zero**. CLS and trained registers are left unchanged.

Deliberate differences from their intervention (shared/hook_fn.py ``activate_on_registers`` with
``normal_values="zero"``, ``scale=1``, one register, as register_neurons.ipynb calls it):

1. **Value on the extra token.** They write one number per block: ``sign_max`` (shared/utils.py)
   of ``output[0, :, neuron_indices]``, the signed extreme over *all* tokens (CLS and the extra
   token included) *and all of that block's chosen neurons together*, to every chosen neuron.
   Here each neuron gets its own maximum over the image's patch tokens: a neuron's outlier
   activation is what the token takes over from the patches it zeroes, and a weaker neuron of the
   same block is not raised to a stronger one's peak. (They agree for a block with one chosen
   neuron whose largest |activation| over all tokens is positive and at a patch token.)
2. **Any batch size.** They index ``output[0, ...]``: batch 1 only (a larger batch would move only
   the first image). Here the max and the zeroing run per image (dim 1 of ``[B, T, H]``); batch 1
   and 16 are tested to agree.
3. **Where the token sits.** They append it at the *end* of the sequence
   (dinov2/dinov2/models/vision_transformer.py ``prepare_tokens_with_masks``) while the DINOv2
   outputs slice registers as leading tokens (``x_norm[:, 1 : num_register_tokens + 1]``), so those
   slices are shifted by one; here it *is* a leading prefix token, after CLS and trained registers,
   and every slice agrees.
4. **Which tokens are zeroed.** They zero ``output[0, 1:-num_registers]``: all but the first token
   and the appended one (the patches, for the register-free models they use). Here exactly the
   patch tokens, so CLS and trained registers keep their activations on any model.
5. **Positions = patch tokens** also where the neurons are found: their ranking takes every token
   above the norm threshold, CLS included; ours only patch tokens (analyze/_neurons.py lists the
   ranking's differences).
"""

from __future__ import annotations

from collections import defaultdict

import torch


def mlp_hidden_size(model: torch.nn.Module) -> int:
    return int(model.blocks[0].mlp.fc2.in_features)


def parse_ttreg(value: str) -> tuple[str, int]:
    """'RUN:K' -> (RUN, K); K >= 0."""
    run, sep, k = value.rpartition(":")
    if not sep or not run or not k.isdigit():
        raise ValueError(f"--test-time-registers takes RUN:K (a run with a neurons table and how "
                         f"many of its top neurons to move), not {value!r}")
    return run, int(k)


def prefix_counters(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model and every submodule holding its own ``num_prefix_tokens``: timm's Eva keeps one in
    each EvaAttention (which tokens get the rotary embedding), AttentionRope and PatchDropout keep
    theirs; a VisionTransformer only the model's. All must agree."""
    named = {name or "model": m for name, m in model.named_modules()
             if isinstance(getattr(m, "num_prefix_tokens", None), int)}
    values = {name: m.num_prefix_tokens for name, m in named.items()}
    if "model" not in named or len(set(values.values())) != 1:
        raise ValueError(f"num_prefix_tokens disagree across {type(model).__name__}'s modules "
                         f"({values}): cannot insert a test-time register")
    return list(named.values())


class TTRegister:
    """Installs the extra token and the activation-moving hooks on a timm VisionTransformer or Eva;
    ``close()`` restores the model exactly."""

    def __init__(self, model: torch.nn.Module, neurons: list[tuple[int, int]]) -> None:
        self.model = model
        self.index = int(model.num_prefix_tokens)  # the extra token's position in the sequence
        self.counters = prefix_counters(model)
        self.neurons = [(int(b), int(n)) for b, n in neurons]
        depth, hidden = len(model.blocks), mlp_hidden_size(model)
        for b, n in self.neurons:
            if not (0 <= b < depth and 0 <= n < hidden):
                raise ValueError(f"neuron (block {b}, neuron {n}) is outside this model "
                                 f"({depth} blocks x {hidden} neurons)")
        self.handles: list = []
        original = model._pos_embed  # the bound method of the class
        index = self.index

        def insert(x: torch.Tensor) -> torch.Tensor:
            # [B, prefix + Np, D] -> [B, prefix + 1 + Np, D]
            zero = x.new_zeros(x.shape[0], 1, x.shape[-1])
            return torch.cat([x[:, :index], zero, x[:, index:]], dim=1)

        def _pos_embed(x: torch.Tensor, *args, **kwargs):
            out = original(x, *args, **kwargs)  # position embedding added, pos_drop applied
            if isinstance(out, tuple):  # Eva: (x, rope); rope covers the patches only: unchanged
                return (insert(out[0]), *out[1:])
            return insert(out)

        model._pos_embed = _pos_embed  # instance attribute shadows the method; removed by close()
        for counter in self.counters:
            counter.num_prefix_tokens += 1
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
            for counter in self.counters:
                counter.num_prefix_tokens -= 1
