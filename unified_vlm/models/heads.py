"""Output heads that read the LM's hidden states at image slots (docs/paper.md 2.3 and 3.1).

A head turns hidden states into a prediction of the next image token and knows its own loss,
so the model's training step and its sampler never branch on the head type.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unified_vlm.registry import HEADS


class ImageHead(nn.Module):
    """Base contract: ``forward(hidden (N, H)) -> prediction``, ``loss(prediction, target, reduction)``.

    ``reduction``: ``mean`` (the training loss) or ``none`` (one loss per image token, (N,): what
    the prompt-gain diagnostic and the per-slot loss map read)."""

    discrete: bool = True

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@HEADS.register("vq_classification")
class VQClassificationHead(ImageHead):
    """Linear(hidden -> codebook_size); cross-entropy over VQ code indices."""

    discrete = True

    def __init__(self, hidden_size: int, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.proj = nn.Linear(hidden_size, codebook_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(prediction.float(), target.long(), reduction=reduction)


@HEADS.register("feature_regression")
class FeatureRegressionHead(ImageHead):
    """Linear(hidden -> feature_dim); regresses continuous features with 1 - cosine or MSE."""

    discrete = False

    def __init__(self, hidden_size: int, feature_dim: int, loss_type: str = "cosine") -> None:
        super().__init__()
        if loss_type not in ("cosine", "mse"):
            raise ValueError(f"feature_regression loss_type must be 'cosine' or 'mse', got {loss_type!r}")
        self.feature_dim = feature_dim
        self.loss_type = loss_type
        self.proj = nn.Linear(hidden_size, feature_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        prediction, target = prediction.float(), target.float().detach()
        if self.loss_type == "mse":
            if reduction == "mean":
                return F.mse_loss(prediction, target)
            return F.mse_loss(prediction, target, reduction="none").mean(-1)
        else:
            per_token = 1.0 - F.cosine_similarity(prediction, target, dim=-1)
        return per_token.mean() if reduction == "mean" else per_token
