"""The final norm of a backbone, saved with every run (store/_finalnorm.py says why and how).

The module whose input the lake stores as `tokens` and whose output is the model's output token,
as each family's adapter names it (`Adapter.final_norm_module`: `model.norm` for ViT and Swin-v2,
what `forward_features` ends with; PVT-v2's sits inside its last stage). Only per-token norms
qualify: LayerNorm, timm's RmsNorm or Identity; anything else is refused before extraction starts.
"""

from __future__ import annotations

import torch
from timm.layers import RmsNorm

from tokenlake.extract._adapters import Adapter


def check_final_norm_module(adapter: Adapter) -> None:
    module = adapter.final_norm_module()
    if not isinstance(module, torch.nn.LayerNorm | RmsNorm | torch.nn.Identity):
        raise ValueError(  # noqa: TRY004 - a request tokenlake cannot serve: the CLI's user error
            f"{type(adapter.model).__name__}'s final norm is a {type(module).__name__}: tokenlake "
            "saves LayerNorm, RmsNorm or Identity final norms (per-token functions) so that output "
            "tokens can be computed from the stored pre-norm tokens")
    if isinstance(module, torch.nn.LayerNorm | RmsNorm) and tuple(module.normalized_shape) != (
            adapter.layout.embed_dim,):
        raise ValueError(f"final norm over {tuple(module.normalized_shape)}, expected "
                         f"({adapter.layout.embed_dim},)")


def final_norm_params(adapter: Adapter) -> dict:
    """The JSON description store.RunWriter.write_final_norm takes (float32 parameters)."""
    check_final_norm_module(adapter)
    module, dim = adapter.final_norm_module(), adapter.layout.embed_dim
    if isinstance(module, torch.nn.Identity):
        return {"type": "identity", "dim": dim}

    def vec(t: torch.Tensor | None) -> list[float] | None:
        return None if t is None else t.detach().float().cpu().numpy().tolist()

    if isinstance(module, RmsNorm):
        return {"type": "rms_norm", "dim": dim, "eps": float(module.eps), "weight": vec(module.weight)}
    return {"type": "layer_norm", "dim": dim, "eps": float(module.eps), "weight": vec(module.weight),
            "bias": vec(module.bias)}
