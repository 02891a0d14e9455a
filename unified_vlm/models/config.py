"""Typed configuration of a unified VLM: the source of truth for YAML configs and ``--help``.

Every field is a primitive (str, int, float, bool, dict of primitives), so hyperparameters
saved in checkpoints reload across versions without pickled objects.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional


@dataclass
class EncoderSpec:
    """The understanding-side vision encoder."""

    name: str = "siglip"
    """Registered encoder name (``python -m unified_vlm list``)."""
    weights: Optional[str] = "builtin"
    """Local weights directory; ``builtin`` = the watch encoder shipped with the package (pretrained
    and cached on first use when absent); null = random initialisation from ``options``."""
    freeze: bool = True
    """Freeze the encoder (the paper always does)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the encoder factory (e.g. feature_layer, feature_select)."""


@dataclass
class BackboneSpec:
    """The language backbone."""

    name: str = "qwen2"
    """Registered backbone: ``qwen2`` / ``llama`` (tiny, from a config) or ``pretrained`` (local dir)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the backbone factory (hidden_size, num_layers, ... or path)."""
    train: str = "full"
    """Training policy: ``full`` (every weight), ``lora`` (peft adapters; base weights frozen) or
    ``frozen`` (no backbone weight trains; projectors and head still do)."""
    lora: dict[str, Any] = field(default_factory=dict)
    """LoRA settings when ``train: lora``: r, alpha, dropout, target_modules (``all-linear`` = every
    Linear but the output layer, the paper's q/k/v/o/gate/up/down), modules_to_save (modules
    trained in full beside the adapters, e.g. [embed_tokens, lm_head]). Paper: r 128, alpha 256,
    dropout 0.05."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory on big backbones, costs time)."""


@dataclass
class ImageOutputSpec:
    """The generation side: what image tokens the LM reads and predicts."""

    space: str = "vq"
    """Output space: ``vq`` (discrete VQ codes, head ``vq_classification``) or ``features``
    (continuous features of a frozen vision tower, head ``feature_regression``; the paper's
    SigLIP output)."""
    tokenizer: Optional[str] = "builtin"
    """``vq`` only: a VQ tokenizer directory, a LlamaGen VQ-16 checkpoint file, or ``builtin`` (the
    shipped watch tokenizer, trained and cached if absent)."""
    encoder: Optional[dict[str, Any]] = None
    """``features`` only: the generation tower as an encoder spec ({name, weights, freeze, options});
    null = the same spec as the understanding encoder (the paper's ``vision_tower_gen=same``)."""
    renderer: Optional[str] = "retrieval:2000"
    """``features`` only: how generated features become pixels: a directory written by
    ``train-feature-decoder``, or ``retrieval:N`` (nearest of N training watches by feature)."""
    head: str = "vq_classification"
    """Registered output head."""
    head_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the head, e.g. ``{loss_type: mse}`` for ``feature_regression``
    (``cosine``, 1 - cosine similarity, is its default)."""
    loss_weight: float = 0.2
    """alpha in loss = text CE + alpha * image loss (paper: 0.2 for VQ heads, 1.0 for continuous)."""
    projector: str = "linear"
    """Projector type for generation-side inputs (teacher-forced image tokens)."""
    prompt_dropout: float = 0.0
    """Probability that a training generation record's prompt is emptied (classifier-free
    guidance learns the unconditional prediction from these; LlamaGen uses 0.1)."""
    position_embedding: str = "none"
    """Identity of each generated image slot: ``none`` (the paper's: image tokens carry only the
    LM's 1-D positions after a prompt of varying length) or ``learned`` (a learned vector per slot
    added to the teacher-forced image-token inputs, as minDALL-E and small text-to-image models do,
    so "the top-left cell" is the same input wherever the prompt ends)."""
    share_projector: Optional[bool] = None
    """Feed generation inputs through the understanding projector. null = share exactly when input
    and output spaces are aligned (both VQ); the choice is logged at start-up (docs/paper.md 7.3)."""

    def __post_init__(self) -> None:
        if self.position_embedding not in ("none", "learned"):
            raise ValueError(f"image_output.position_embedding must be 'none' or 'learned', got {self.position_embedding!r}")


@dataclass
class OptimSpec:
    """AdamW with linear warmup and cosine decay, one learning rate per parameter group."""

    lr: float = 1e-3
    """Learning rate of the language backbone."""
    projector_lr: float = 1e-3
    """Learning rate of projectors and output heads (paper: mm_projector_lr)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.03
    """Fraction of the total steps spent in linear warmup (paper: 0.03)."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""

    def __post_init__(self) -> None:
        for name in ("lr", "projector_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must not be negative, got {getattr(self, name)} (the loss would climb)")


@dataclass
class SamplingSpec:
    """Decoding settings used at test/predict time."""

    max_new_tokens: int = 24
    """Text tokens generated per answer (answers are short: 'HH:MM:SS', 'N%', a corner)."""
    temperature: float = 0.0
    """0 = greedy for text; image tokens use ``image_temperature``."""
    image_temperature: float = 0.0
    """Sampling temperature for image tokens (0 = greedy, the paper's setting)."""
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    """Seed of the sampler, so a fixed seed gives the same images."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale for image tokens (1 = off); the model needs training with
    ``image_output.prompt_dropout`` > 0 to have learned the unconditional prompt."""


@dataclass
class DistortionSpec:
    """A fixed affine map y = x A + b on the understanding encoder's features (docs/paper.md 5.2 b).

    A = Q S: Q orthogonal (QR of a seeded uniform random matrix), S diagonal with factors uniform
    in (1 - strength, 1 + strength]; b uniform in (-strength, strength] when ``translation``, else
    zero. Generation inputs and targets are never distorted.
    """

    strength: float = 0.0
    """s in [0, 1): 0 = a pure rotation (the control; a linear projector can undo it exactly);
    the paper used 0.1, 0.2 and 0.3. Below 1 so that every scale factor stays positive."""
    seed: int = 42
    """Seed of Q, S and b (the paper's seed is 42); the same seed gives the same map everywhere."""
    translation: bool = False
    """Add b (the paper's committed matrices have b = 0; its notebook would add one)."""

    def __post_init__(self) -> None:
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"und_distortion.strength must be a finite number, got {s!r}")
        if s < 0:
            raise ValueError(f"und_distortion.strength must be >= 0 (0 = pure rotation), got {s}")
        if s >= 1:
            raise ValueError(
                f"und_distortion.strength must be below 1, got {s}: scale factors are drawn from (1 - s, 1 + s], "
                "so s >= 1 allows zero or negative factors and a map that cannot be inverted"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"und_distortion.seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.translation, bool):
            raise ValueError(f"und_distortion.translation must be true or false, got {self.translation!r}")


def coerce(spec_type, value):
    """Accept a spec dataclass, a plain dict (from a checkpoint) or None (defaults)."""
    if value is None:
        return spec_type()
    if isinstance(value, spec_type):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(spec_type)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TypeError(f"{spec_type.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        return spec_type(**value)
    raise TypeError(f"expected {spec_type.__name__} or dict, got {type(value).__name__}")


def to_primitive(spec) -> dict:
    out = asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
