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
    """Discrete VQ codes (docs/paper.md 2.2): targets are code indices, inputs the l2-normalised
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
        return self.tokenizer.code_dim

    @property
    def target_size(self) -> int:
        return self.tokenizer.codebook_size

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


class FeatureOutputSpace(nn.Module):
    """Continuous features of a frozen vision encoder (docs/paper.md 2.4: SigLIP-SigLIP, VQ-SigLIP).

    Targets are the encoder's features (B, T, D), regressed by the ``feature_regression`` head;
    ``target_size`` is D. ``input_features`` hands the targets over unchanged, both the ground
    truth at training time and the model's own regressions at inference. docs/paper.md 2.5 feeds the
    regressed vector back un-normalised even though the cosine loss fixes only its direction, so
    its length drifts freely; we keep that (it is the paper's protocol) and make the pixel side
    insensitive to it instead: :class:`~unified_vlm.models.feature_decoder.FeatureDecoder`
    l2-normalises every token first and :class:`~unified_vlm.models.feature_decoder.NearestNeighbourRenderer`
    compares directions only, so ``decode(c * f) == decode(f)`` for any per-token ``c > 0``.

    ``decode`` renders pixels (B, 3, S, S) in [0, 1] through ``renderer`` (any module with
    ``render(features)``; ``check_encoder(encoder)`` is called when it has one). The encoder and
    the renderer are frozen and stay in eval mode. The encoder is frozen *in place*: to reuse the
    understanding tower as the generation tower (the paper's ``vision_tower_gen=same``) while
    training the understanding tower, pass a copy.
    """

    discrete = False

    def __init__(self, encoder: nn.Module, renderer: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(renderer, "render", None)):
            raise TypeError(f"renderer {type(renderer).__name__} has no render(features) method")
        for name in ("num_tokens", "feature_dim"):
            if not isinstance(getattr(encoder, name, None), int):
                raise TypeError(f"encoder {type(encoder).__name__} has no integer {name!r}; FeatureOutputSpace needs a vision encoder")
        self.encoder = encoder
        self.renderer = renderer
        for module in (self.encoder, self.renderer):
            module.requires_grad_(False)
            module.eval()
        check = getattr(renderer, "check_encoder", None)
        if callable(check):
            check(encoder)

    @property
    def num_tokens(self) -> int:
        return self.encoder.num_tokens

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    @property
    def target_size(self) -> int:
        return self.encoder.feature_dim

    @property
    def image_size(self) -> int:
        """Side of the decoded images."""
        return self.renderer.image_size

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen encoder features (B, T, D), float32, no gradient."""
        return self.encoder(images.float()).float()

    def input_features(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets as they are: no renormalisation (docs/paper.md 2.5; see the class docstring)."""
        return targets

    @torch.no_grad()
    def decode(self, targets: torch.Tensor) -> torch.Tensor:
        """Features (B, T, D) -> images (B, 3, S, S) in [0, 1]."""
        if targets.ndim != 3 or targets.shape[-1] != self.feature_dim:
            raise ValueError(f"expected features of shape (B, T, {self.feature_dim}), got {tuple(targets.shape)}")
        return self.renderer.render(targets.float()).float().clamp(0, 1)

    def train(self, mode: bool = True):  # frozen: stays in eval mode
        return super().train(False)


def build_feature_output_space(encoder: nn.Module, renderer: str, image_size: int | None = None,
                               seed: int = 0, batch_size: int = 64) -> FeatureOutputSpace:
    """A :class:`FeatureOutputSpace` over ``encoder`` with the renderer named by ``renderer``:

    * a directory written by ``python -m unified_vlm train-feature-decoder`` (a
      :class:`~unified_vlm.models.feature_decoder.FeatureDecoder`); it must have been trained on
      this encoder's features (checked on a few probe watches);
    * ``retrieval:N``: a :class:`~unified_vlm.models.feature_decoder.NearestNeighbourRenderer`
      over train watches 0..N-1 of ``seed``, rendered at ``image_size`` (default: the encoder's
      input size), built now (about N encoder forwards).
    """
    from unified_vlm.models.feature_decoder import FeatureDecoder, NearestNeighbourRenderer

    if not isinstance(renderer, str) or not renderer:
        raise ValueError(f"renderer must be a decoder directory or 'retrieval:N', got {renderer!r}")
    if renderer == "retrieval" or renderer.startswith("retrieval:"):
        _, _, count = renderer.partition(":")
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"renderer {renderer!r}: write retrieval:N with N >= 1 training watches, e.g. retrieval:2000")
        device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
        index = NearestNeighbourRenderer.build(encoder, int(count), image_size=image_size, seed=seed, batch_size=batch_size)
        return FeatureOutputSpace(encoder, index.to(device))
    decoder = FeatureDecoder.from_pretrained(renderer)
    if image_size is not None and image_size != decoder.image_size:
        raise ValueError(f"the decoder at {renderer} renders {decoder.image_size} px images, not the requested {image_size} px")
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    return FeatureOutputSpace(encoder, decoder.to(device))
