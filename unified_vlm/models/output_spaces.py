"""Generation-side image spaces: what the LM is teacher-forced with and learns to predict.

An output space turns target images into per-token targets, turns targets (ground truth at
training time, the model's own predictions at inference) into input features for the
generation projector, and decodes targets back to pixels. The model never branches on which
space it has.
"""
from __future__ import annotations

import torch
from torch import nn


class VQOutputSpace(nn.Module):
    """Discrete VQ codes (PAPER.md 2.2): targets are code indices, inputs the l2-normalised
    low-dimensional code vectors z_q, decoding through the VQ decoder. Always frozen."""

    discrete = True

    def __init__(self, tokenizer: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.tokenizer.requires_grad_(False)
        self.tokenizer.eval()

    @property
    def num_tokens(self) -> int:
        return self.tokenizer.num_tokens

    @property
    def feature_dim(self) -> int:
        return self.tokenizer.config.codebook_dim

    @property
    def target_size(self) -> int:
        return self.tokenizer.config.codebook_size

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(images.float()).long()

    def input_features(self, targets: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.code_features(targets.long())

    @torch.no_grad()
    def decode(self, targets: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(targets.long()).float().clamp(0, 1)

    def train(self, mode: bool = True):  # frozen: stays in eval mode
        return super().train(False)
