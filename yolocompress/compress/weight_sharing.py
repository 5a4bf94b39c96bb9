"""Weight sharing (Han et al.'s Deep Compression; Muhawenayo & Gkioxari): each conv's weights
clustered by 1-D k-means into 2^b shared values, stored as a codebook + b-bit indices (compact.py).

`kmeans_1d` is Lloyd's algorithm from a linear initialisation over [min, max] (the init Deep
Compression found best: it keeps the rare large weights), assignments by the nearest centroid;
a tensor with at most k distinct values keeps them exactly. `share_weights(art, bits)` clusters
every conv weight of an artifact and returns the artifact with the clustered weights plus the
entries `compact.save_compact` stores; BatchNorm parameters and biases stay float32. Centroid
fine-tuning (training the codebooks with the summed gradients of their weights, the assignments
fixed) is `share_finetune.finetune_shared`, on what `share_weights` returns.
"""
from __future__ import annotations

import torch

from ..artifacts import build_model
from ..errors import YoloCompressError
from .compact import encode_shared

__all__ = ["BITS", "kmeans_1d", "conv_weight_keys", "share_weights"]

BITS = range(1, 9)     # b of 2^b shared values per conv (uint8 indices at most)


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (<= k, sorted), index of each value's centroid) of 1-D k-means on `values`."""
    x = values.detach().flatten().double()
    if k < 1 or x.numel() == 0:
        raise YoloCompressError(f"k-means needs k >= 1 and values, got k={k}, {x.numel()} values")
    distinct = torch.unique(x)
    if distinct.numel() <= k:
        return distinct.float(), torch.searchsorted(distinct, x).reshape(values.shape)
    centroids = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    for _ in range(iters):
        idx = _nearest(x, centroids)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).double()
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        new, _ = torch.sort(new)
        if torch.equal(new, centroids):
            break
        centroids = new
    centroids = centroids.float()
    return centroids, _nearest(x.float(), centroids).reshape(values.shape)


def _nearest(x: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of sorted centroids for each value (ties to the lower)."""
    mids = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return torch.searchsorted(mids, x, right=False).clamp(max=len(sorted_centroids) - 1)


def conv_weight_keys(art: dict) -> list[str]:
    """State-dict keys of the artifact's conv weights, in layer order."""
    model = build_model(art)
    return [f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d)]


def share_weights(art: dict, bits: int, iters: int = 30) -> tuple[dict, dict[str, dict]]:
    """(artifact with every conv weight replaced by its 2^bits-value clustering, the compact
    entries of those weights)."""
    if bits not in BITS:
        raise YoloCompressError(f"weight sharing: bits must be {BITS.start}..{BITS.stop - 1}, "
                                f"got {bits}")
    state = dict(art["state_dict"])
    encoded = {}
    for key in conv_weight_keys(art):
        centroids, idx = kmeans_1d(state[key], 1 << bits, iters)
        state[key] = centroids[idx]
        encoded[key] = encode_shared(centroids, idx, bits)
    return {**art, "state_dict": state}, encoded
