"""Modality projectors: image features -> language-model embedding space (docs/paper.md 2.3)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

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


class TokenSlotEmbedding(nn.Module):
    """A learned vector per image-token slot, added after the projector.

    The language model's rotary positions shift attention scores but put no position into the
    values an attention head copies, so "which token held the battery" can be read out of a set
    of image tokens only if their features say where they are. A slot vector per token (a
    learned 2D position embedding for a patch grid) gives each token an identity the answer can
    copy. On the watch data the encoder's patch features already carry some of it: with a 2x2
    grid the runs with and without these vectors reached similar position scores (README).
    """

    def __init__(self, num_tokens: int, dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_tokens, dim) * std)

    def forward(self, tokens: Tensor, slots: Tensor | None = None) -> Tensor:
        """``tokens`` (N, T, D) holding every slot in order, or, with ``slots`` (N,) (one token per
        row while decoding), (N, 1, D) tokens of the given slot indices."""
        if slots is not None:
            return tokens + self.weight[slots].unsqueeze(1).to(tokens.dtype)
        if tokens.shape[-2] != self.weight.shape[0]:
            raise ValueError(f"expected {self.weight.shape[0]} image tokens, got {tokens.shape[-2]}")
        return tokens + self.weight.to(tokens.dtype)
