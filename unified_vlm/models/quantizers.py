"""Registered quantizers with one uniform contract (wrapping vector-quantize-pytorch).

The library's quantizers disagree on small things (FSQ returns no aux loss and int32 indices;
VQ and FSQ/LFQ decode indices through differently named methods). The rest of unified_vlm
should not care which one it holds, so every entry of ``QUANTIZERS`` obeys:

* ``forward(z (B, N, D)) -> (quantized (B, N, D), indices (B, N) int64, aux_loss scalar)``;
  gradients reach ``z`` through a straight-through style estimator in training mode.
* ``indices_to_features(indices (B, N)) -> (B, N, D)``: equal to ``quantized`` in eval mode,
  so a decoder can run on generated indices.
* ``code_features(indices) -> (B, N, code_dim)``: the low-dimensional code vectors. The paper
  feeds these (8-d, l2-normalised for LlamaGen's VQ-16) into the LLM as VQ input features.
* attributes ``codebook_size`` and ``code_dim``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from unified_vlm.registry import QUANTIZERS

__all__ = ["VQQuantizer", "FSQQuantizer", "LFQQuantizer", "fsq_levels_for"]


@QUANTIZERS.register("vq")
class VQQuantizer(nn.Module):
    """Vector quantizer with an l2-normalised, low-dim factorised codebook (LlamaGen VQ-16 style).

    ``dim`` is projected to ``codebook_dim`` (a factorised lookup), l2-normalised and matched by
    cosine similarity; the codebook is an EMA of its assigned inputs, and codes used less than
    ``threshold_ema_dead_code`` times (EMA count) are re-seeded from the batch so few die.
    ``kmeans_init`` is off by default: it initialises on the first forward even in eval mode,
    so a saved untrained tokenizer would change its codebook when first used; dead-code
    revival re-seeds unused codes from real latents within the first training steps anyway.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 512,
        codebook_dim: int = 8,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        kmeans_init: bool = False,
        threshold_ema_dead_code: float = 2.0,
    ) -> None:
        super().__init__()
        self.vq = VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            decay=decay,
            commitment_weight=commitment_weight,
            kmeans_init=kmeans_init,
            threshold_ema_dead_code=threshold_ema_dead_code,
            use_cosine_sim=True,
        )
        self.codebook_size = codebook_size
        self.code_dim = codebook_dim

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, aux_loss = self.vq(z)
        if not self.training:  # the library returns a shared zero buffer that may require grad
            aux_loss = aux_loss.detach()
        return quantized, indices.long(), aux_loss.reshape(())

    def code_features(self, indices: Tensor) -> Tensor:
        # The EMA update re-normalises the codebook already; normalising again is a cheap guard.
        return F.normalize(self.vq.get_codes_from_indices(indices), dim=-1)

    def indices_to_features(self, indices: Tensor) -> Tensor:
        return self.vq.get_output_from_indices(indices)


def fsq_levels_for(codebook_size: int) -> tuple[int, ...]:
    """FSQ levels whose product is exactly ``codebook_size`` (a power of two >= 16), using 8s and 4s.

    Level 2 is avoided because the library needs ``preserve_symmetry`` for it.
    """
    bits = math.log2(codebook_size)
    if not bits.is_integer() or bits < 4:
        raise ValueError(
            f"cannot derive FSQ levels for codebook_size={codebook_size}: pass levels=... explicitly "
            "(the FSQ codebook size is the product of the levels)"
        )
    bits = int(bits)
    fours = {0: 0, 1: 2, 2: 1}[bits % 3]
    return (8,) * ((bits - 2 * fours) // 3) + (4,) * fours


@QUANTIZERS.register("fsq")
class FSQQuantizer(nn.Module):
    """Finite scalar quantization: an implicit grid codebook, no codebook collapse, no aux loss.

    Give either ``levels`` or a power-of-two ``codebook_size`` (levels are then derived); if both
    are given they must agree, so a config never silently gets a different vocabulary size.
    """

    def __init__(self, dim: int, levels: tuple[int, ...] | list[int] | None = None, codebook_size: int | None = None) -> None:
        super().__init__()
        if levels is None:
            levels = fsq_levels_for(codebook_size if codebook_size is not None else 512)
        levels = [int(level) for level in levels]
        if codebook_size is not None and math.prod(levels) != codebook_size:
            raise ValueError(
                f"FSQ levels {levels} give {math.prod(levels)} codes but codebook_size={codebook_size}; "
                "drop one of them or make them agree"
            )
        self.fsq = FSQ(levels=levels, dim=dim)
        self.codebook_size = math.prod(levels)
        self.code_dim = len(levels)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices = self.fsq(z)
        return quantized, indices.long(), z.new_zeros((), dtype=torch.float32)

    def code_features(self, indices: Tensor) -> Tensor:
        # The grid point in [-1, 1]^len(levels), before the output projection.
        return self.fsq._indices_to_codes(indices)

    def indices_to_features(self, indices: Tensor) -> Tensor:
        return self.fsq.indices_to_codes(indices)


@QUANTIZERS.register("lfq")
class LFQQuantizer(nn.Module):
    """Lookup-free quantization: each code is a sign pattern of log2(codebook_size) bits.

    The aux loss is the library's entropy loss (confident per token, diverse per batch) plus an
    optional commitment term.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 512,
        entropy_loss_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_gamma: float = 1.0,
    ) -> None:
        super().__init__()
        self.lfq = LFQ(
            dim=dim,
            codebook_size=codebook_size,
            entropy_loss_weight=entropy_loss_weight,
            commitment_loss_weight=commitment_weight,
            diversity_gamma=diversity_gamma,
        )
        self.codebook_size = codebook_size
        self.code_dim = int(math.log2(codebook_size))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, aux_loss = self.lfq(z)
        return quantized, indices.long(), aux_loss.reshape(())

    def code_features(self, indices: Tensor) -> Tensor:
        # Code vectors are +-1 per bit, before the output projection.
        return self.lfq.indices_to_codes(indices, project_out=False)

    def indices_to_features(self, indices: Tensor) -> Tensor:
        return self.lfq.indices_to_codes(indices)
