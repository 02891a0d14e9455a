"""Modality projectors: image features -> language-model embedding space (PAPER.md 2.3)."""
from __future__ import annotations

from torch import nn

from unified_vlm.registry import PROJECTORS


@PROJECTORS.register("linear")
def linear_projector(in_dim: int, out_dim: int) -> nn.Module:
    """Linear(in -> out): the paper's projector for 8-dim VQ code features."""
    return nn.Linear(in_dim, out_dim)


@PROJECTORS.register("mlp")
def mlp_projector(in_dim: int, out_dim: int, hidden_dim: int | None = None) -> nn.Module:
    """Linear, GELU, Linear (LLaVA's mlp2x_gelu): the paper's projector for SigLIP features."""
    hidden_dim = hidden_dim or out_dim
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
