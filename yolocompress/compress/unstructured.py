"""Global unstructured L1 magnitude pruning of conv weights (the pruning of Muhawenayo & Gkioxari):
the `share` of all conv weights with the smallest |w|, ranked across every conv together, set to 0.

Through `torch.nn.utils.prune.global_unstructured` with `L1Unstructured`, made permanent
(`prune.remove`): round(share * total) weights are zeroed. Stored sparse (compact.py: a 1-bit
mask + the non-zero values), it shrinks the file; the dense convs run as before, so no speed.
"""
from __future__ import annotations

import torch
from torch.nn.utils import prune

from ..artifacts import build_model
from ..errors import YoloCompressError
from .compact import encode_sparse
from .weight_sharing import conv_weight_keys

__all__ = ["magnitude_prune"]


def magnitude_prune(art: dict, share: float) -> tuple[dict, dict[str, dict]]:
    """(artifact with the `share` of smallest-|w| conv weights zeroed, their sparse entries)."""
    if not 0 <= share < 1:
        raise YoloCompressError(f"unstructured pruning: share must be in [0, 1), got {share}")
    model = build_model(art)
    convs = [(m, "weight") for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=share)
    for module, name in convs:
        prune.remove(module, name)
    pruned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    encoded = {k: encode_sparse(pruned[k]) for k in conv_weight_keys(art)}
    return {**art, "state_dict": pruned}, encoded
