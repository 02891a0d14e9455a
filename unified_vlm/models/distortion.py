"""A fixed affine distortion of the understanding-side features (docs/paper.md 5.2 b).

The paper's alignment experiment moves the understanding *input* space away from the
generation *output* space by a known amount: every understanding feature vector x becomes
y = x A + b with A = Q S, Q orthogonal and S a diagonal of scale factors close to 1. The
generation side (teacher-forced inputs and targets) is untouched, so in VQ-VQ the one shared
projector must serve two spaces that differ by the map. Strength s = 0 is a pure rotation, which
a linear projector can undo exactly: the control.

The map is a pure function of (feature size, strength, seed, translation), built with a CPU
``torch.Generator`` in float64, and kept in buffers, so checkpoints carry the exact matrix and a
run can be reproduced from its hyperparameters alone.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unified_vlm.models.config import DistortionSpec


def affine_parameters(dim: int, strength: float, seed: int, translation: bool = False) -> tuple[Tensor, Tensor]:
    """(A, b) in float64: A = Q S, Q from the QR of a seeded uniform [0, 1) matrix (the paper's
    construction), S = diag(factors uniform in (1 - s, 1 + s]), b uniform in (-s, s] or zero."""
    DistortionSpec(strength=strength, seed=seed, translation=translation)  # validates
    if dim < 1:
        raise ValueError(f"an affine distortion needs a feature size of at least 1, got {dim}")
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.rand(dim, dim, generator=generator, dtype=torch.float64))
    # QR is unique only up to column signs; fixing diag(R) > 0 makes Q depend on the draw alone,
    # not on the LAPACK build.
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    # 1 + s - 2 s u with u in [0, 1) lies in (1 - s, 1 + s]; s - 2 s u in (-s, s].
    scale = 1.0 + strength - 2.0 * strength * torch.rand(dim, generator=generator, dtype=torch.float64)
    shift = strength - 2.0 * strength * torch.rand(dim, generator=generator, dtype=torch.float64)
    bias = shift if translation else torch.zeros(dim, dtype=torch.float64)
    return q * scale, bias  # Q @ diag(scale) scales Q's columns


class AffineDistortion(nn.Module):
    """y = x A + b on the last dimension; no trainable parameter, A and b are buffers."""

    def __init__(self, dim: int, spec: DistortionSpec) -> None:
        super().__init__()
        self.spec, self.dim = spec, dim
        matrix, bias = affine_parameters(dim, spec.strength, spec.seed, spec.translation)
        self.register_buffer("matrix", matrix.float())
        self.register_buffer("bias", bias.float())

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"the affine distortion maps {self.dim}-d features, got a last dimension of {x.shape[-1]}")
        return x.float() @ self.matrix + self.bias

    def inverse(self, y: Tensor) -> Tensor:
        """x from y (A is invertible for every allowed strength): for checks and analysis."""
        return torch.linalg.solve(self.matrix.double().T, (y.double() - self.bias.double()).unsqueeze(-1)).squeeze(-1).float()

    def extra_repr(self) -> str:
        s = self.spec
        return f"dim={self.dim}, strength={s.strength}, seed={s.seed}, translation={s.translation}"


def build_distortion(spec: DistortionSpec | dict | None, dim: int) -> AffineDistortion | None:
    """The understanding-side distortion for ``dim``-d encoder features, or None."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        from unified_vlm.models.config import coerce

        spec = coerce(DistortionSpec, spec)
    if not isinstance(spec, DistortionSpec):
        raise TypeError(f"und_distortion must be a DistortionSpec, a dict or null, got {type(spec).__name__}")
    return AffineDistortion(dim, spec)
