"""Conditioning of understanding-encoder features before the projector (``model.und_feature_norm``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class FeatureWhitening(nn.Module):
    """PCA (ZCA) whitening of frozen encoder features, estimated from the first training features.

    Why: a frozen encoder's token can be dominated by a few high-variance directions (the tiny
    watch encoder's pooled token: face colour and hands hold most of its variance, the weather
    icon 1.3 % and the corner items 2.3 %). Whitening gives every direction unit variance, so a
    projector starts with all of them equally loud. On the tiny watch default it did not make the
    language model read the weather sooner (README, "What limits understanding"); it is kept as an
    option for encoders whose scales differ wildly.

    The statistics are a running average over the first ``fit_samples`` feature rows seen in
    training (summed over processes under DDP), then frozen; they are buffers, so checkpoints
    carry them and evaluation uses exactly the training transform.
    """

    def __init__(self, dim: int, fit_samples: int = 16384, eps: float = 1e-2) -> None:
        super().__init__()
        self.fit_samples, self.eps = fit_samples, eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("second_moment", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("transform", torch.eye(dim))
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        stats = torch.cat([x.new_tensor([len(x)]), x.sum(0), (x.T @ x).flatten()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        n, dim = stats[0], x.shape[1]
        total = self.count + n
        self.mean.mul_(self.count / total).add_(stats[1:1 + dim] / total)
        self.second_moment.mul_(self.count / total).add_(stats[1 + dim:].view(dim, dim) / total)
        self.count.copy_(total)
        cov = self.second_moment - torch.outer(self.mean, self.mean)
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval = eigval.clamp(min=0) + self.eps * eigval.clamp(min=0).mean()
        self.transform.copy_((eigvec @ torch.diag(eigval.rsqrt()) @ eigvec.T).float())
        self.center.copy_(self.mean.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.count < self.fit_samples:
            self._update(x)
        return (x.float() - self.center) @ self.transform


def build_feature_norm(kind: Optional[str], dim: int) -> Optional[nn.Module]:
    """Condition encoder features before the projector.

    ``whiten``: :class:`FeatureWhitening` (decorrelate and scale every direction to unit
    variance). ``batch``: per-dimension standardisation with running statistics (BatchNorm
    without affine parameters). ``layer``: LayerNorm per token. None: raw features, as LLaVA and
    the paper feed them.
    """
    if kind is None:
        return None
    if kind == "whiten":
        return FeatureWhitening(dim)
    if kind == "batch":
        return nn.BatchNorm1d(dim, affine=False, momentum=0.01)
    if kind == "layer":
        return nn.LayerNorm(dim, elementwise_affine=False)
    raise ValueError(f"und_feature_norm must be whiten, batch, layer or null, got {kind!r}")
