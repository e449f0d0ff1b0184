"""The CRF layer of NCRF: mean-field inference over a grid of neighbouring patches.

Per-node logits `u` (N) and features `f` (N x D). With `S_ij = cosine(f_i, f_j)` and a
learnable `W` (zero-initialised, so the layer starts as the identity), the pairwise
potential is `P = S * (W + W^T) / 2`; iterate `q = sigmoid(l)`, `l = u + P @ (2q - 1)`.
"""
from __future__ import annotations

import torch
from torch import nn

EPS = 1e-8


def cosine_similarity_matrix(feats: torch.Tensor) -> torch.Tensor:
    """`[..., N, D]` -> `[..., N, N]` pairwise cosine similarity (epsilon-guarded norms)."""
    norm = feats.norm(dim=-1, keepdim=True)
    return (feats @ feats.transpose(-1, -2)) / (norm @ norm.transpose(-1, -2)).clamp_min(EPS)


def mean_field(logits: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor,
               iters: int = 10) -> torch.Tensor:
    """CRF logits `[..., N]` from unary `logits [..., N]`, `feats [..., N, D]`, `weight [N, N]`."""
    pairwise = cosine_similarity_matrix(feats) * (weight + weight.transpose(-1, -2)) / 2
    out = logits
    for _ in range(iters):
        q = torch.sigmoid(out)
        out = logits + (pairwise @ (2 * q - 1).unsqueeze(-1)).squeeze(-1)
    return out


class CRF(nn.Module):
    """Holds `W` for `num_nodes` grid nodes; computed in float32 even under autocast."""

    def __init__(self, num_nodes: int, iters: int = 10) -> None:
        super().__init__()
        self.iters = iters
        self.W = nn.Parameter(torch.zeros(num_nodes, num_nodes))

    def forward(self, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            return mean_field(logits.float(), feats.float(), self.W, self.iters)
