"""Pixels from continuous vision features: the renderers behind :class:`FeatureOutputSpace`.

The paper's SigLIP-output models (SigLIP-SigLIP, VQ-SigLIP; docs/paper.md 2.4) regress frozen SigLIP
features and their code has no way back to pixels (docs/paper.md 7.2). Two renderers close that gap,
both with the interface ``render(features (B, T, D)) -> images (B, 3, S, S) in [0, 1]``:

* :class:`FeatureDecoder`, a small convolutional decoder trained to reconstruct the watch from
  the frozen encoder's features (``python -m unified_vlm train-feature-decoder``);
* :class:`NearestNeighbourRenderer`, which returns the training watch whose features are the
  most similar (no training, cannot invent a picture, but never blurs one either).

Why the decoder normalises its input (the choice the spec leaves open)
-----------------------------------------------------------------------
The LM is trained with ``1 - cosine`` against the target features, which fixes each token's
*direction* and leaves its *length* free; at inference the regressed vectors are fed back and
handed over as they are (docs/paper.md 2.5). A decoder trained on raw features would see tokens of an
arbitrary length that it has never seen, and its output would depend on a quantity the LM was
never asked to get right. So every token is l2-normalised and rescaled to ``sqrt(D)`` (unit RMS
per entry) before anything else: ``decode(c * f) == decode(f)`` for any per-token ``c > 0``,
which is exactly the invariance of the loss the features were trained with.

l2 rather than a LayerNorm without affine: LayerNorm is invariant to the scale *and* removes the
token's mean over channels, a direction the cosine loss does constrain. That throws away
information the LM was asked to predict (and SigLIP's post-LayerNorm features, with their
learned affine, do carry a per-token mean). l2 keeps every direction and discards only the
length. After the normalisation each channel is standardised with statistics of the training
features (buffers saved with the weights; the std has a floor at 0.1x its mean so a channel that
is almost constant in training cannot amplify the LM's error in it).

The decoder is conditioned twice: the token grid is the starting feature map, and the mean of
all tokens modulates every GroupNorm (scale and shift, as in diffusion decoders). Plain
GroupNorm normalises each image's activations, which washes out the flat face colour that
dominates these pictures; the modulation gives it back at every resolution.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_vlm.models.part_files import CONFIG_NAME, WEIGHTS_NAME, load_part_weights, read_part_config, save_part

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FeatureDecoder",
    "FeatureDecoderConfig",
    "NearestNeighbourRenderer",
    "encode_watches",
    "normalize_tokens",
    "token_layout",
    "watch_images",
]

INPUT_NORMS = ("l2", "layer", "none")
PROBE_SPLIT, PROBE_SEED = "val", 0  # the watches whose features a decoder remembers (encoder check)
ENCODER_MATCH_COSINE = 0.98


# ---------------------------------------------------------------------------------------- helpers
def token_layout(num_tokens: int, prefix_tokens: int | None = None) -> tuple[int, int]:
    """``(prefix, grid)``: how many leading tokens are global (pooled, CLS) and the side of the
    square patch grid after them. One token alone is a pooled feature: ``(1, 0)``.

    With ``prefix_tokens`` None it is inferred: a square count is a plain grid, a square plus
    one has one global token in front (SigLIP "pooled+patch", CLIP "cls_patch").
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if prefix_tokens is None:
        if num_tokens == 1:
            return 1, 0
        for prefix in (0, 1):
            side = math.isqrt(num_tokens - prefix)
            if side > 0 and side * side == num_tokens - prefix:
                return prefix, side
        raise ValueError(
            f"cannot lay out {num_tokens} tokens as a square grid (optionally after one global token); "
            "pass prefix_tokens explicitly"
        )
    if not 0 <= prefix_tokens <= num_tokens:
        raise ValueError(f"prefix_tokens must be in [0, {num_tokens}], got {prefix_tokens}")
    rest = num_tokens - prefix_tokens
    side = math.isqrt(rest)
    if side * side != rest or (side == 0 and prefix_tokens == 0):
        raise ValueError(f"{num_tokens} tokens minus {prefix_tokens} prefix token(s) = {rest} is not a square grid")
    return prefix_tokens, side


def normalize_tokens(features: Tensor, kind: str = "l2") -> Tensor:
    """Per-token input normalisation: ``l2`` -> unit norm times sqrt(D) (scale-invariant, keeps every
    direction), ``layer`` -> LayerNorm without affine, ``none`` -> as is. Computed in float32."""
    features = features.float()
    if kind == "l2":
        return F.normalize(features, dim=-1) * math.sqrt(features.shape[-1])
    if kind == "layer":
        return F.layer_norm(features, features.shape[-1:])
    if kind == "none":
        return features
    raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {kind!r}")


def watch_images(count: int, size: int, split: str = "train", seed: int = 0, start: int = 0) -> Tensor:
    """Watches ``start .. start+count-1`` of ``split`` as a float batch (count, 3, size, size) in [0, 1]."""
    from unified_vlm.chat_format import image_to_tensor
    from unified_vlm.datamodules.watch import render_watch, sample_watch  # the one data module models/ may read

    if count < 1:
        return torch.zeros(0, 3, size, size)
    return torch.stack([image_to_tensor(render_watch(sample_watch(seed, split, start + i), size)) for i in range(count)])


@torch.no_grad()
def encode_watches(encoder: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """Frozen-encoder features (N, T, D) in float32, computed in eval mode without autocast."""
    was_training = encoder.training
    encoder.eval()
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    out = []
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, len(images), batch_size):
                out.append(encoder(images[start:start + batch_size].to(device).float()).float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _group_norm_groups(channels: int) -> int:
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


# ---------------------------------------------------------------------------------------- decoder
@dataclass
class FeatureDecoderConfig:
    """Architecture of a :class:`FeatureDecoder`; saved as ``config.json`` beside the weights.

    ``num_tokens`` / ``feature_dim`` are the encoder's; ``image_size`` the output side S.
    ``prefix_tokens`` None = inferred by :func:`token_layout`. Stage channels halve from
    ``max_channels`` (capped) at the token grid down to ``base_channels`` at S.
    """

    num_tokens: int = 64
    feature_dim: int = 128
    image_size: int = 64
    prefix_tokens: int | None = None
    base_channels: int = 32
    max_channels: int = 128
    num_res_blocks: int = 1
    cond_dim: int = 128
    input_norm: str = "l2"
    probe_images: int = 4

    def __post_init__(self) -> None:
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {self.image_size}")
        self.prefix_tokens, _ = token_layout(self.num_tokens, self.prefix_tokens)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureDecoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FeatureDecoderConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine, then a scale and shift predicted from the global condition
    (zero-initialised, so it starts as plain normalisation)."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_group_norm_groups(channels), channels, affine=False)
        self.to_scale_shift = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.to_scale_shift(cond)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = AdaGroupNorm(channels, cond_dim), AdaGroupNorm(channels, cond_dim)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x, cond)))
        return x + self.conv2(F.silu(self.norm2(h, cond)))


class UpStage(nn.Module):
    """Nearest x2 upsample, 3x3 conv to the stage width, GroupNorm + SiLU, residual blocks."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, num_res_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(in_channels, out_channels, 3 if upsample else 1, padding=1 if upsample else 0)
        self.norm = AdaGroupNorm(out_channels, cond_dim)
        self.blocks = nn.ModuleList(ResBlock(out_channels, cond_dim) for _ in range(num_res_blocks))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.silu(self.norm(self.conv(x), cond))
        for block in self.blocks:
            x = block(x, cond)
        return x


class FeatureDecoder(nn.Module):
    """Token features (B, T, D) -> image (B, 3, S, S): a conv decoder from the token grid.

    Grid tokens (T = g*g, or 1 + g*g with a global token in front) become a g x g map; a single
    pooled token goes through a linear layer to a 4 x 4 map. Global (prefix) tokens enter through
    the conditioning vector, the mean of all tokens. Upsample + conv stages (GroupNorm
    modulated by the mean token, SiLU) reach S; a final bilinear resize handles an S that is
    not the start size times a power of two. Inputs are normalised per token first (module
    docstring): the output does not depend on each token's length.

    ``forward`` returns unclamped values (trained against [0, 1] targets); :meth:`render` clamps.
    Buffers saved with the weights: the input statistics (``input_mean``/``input_std``, fitted by
    :meth:`fit_input_stats`) and ``probe_features``, the training encoder's features of a few
    fixed watches, which :meth:`check_encoder` compares against the encoder it is paired with.
    """

    def __init__(self, config: FeatureDecoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.prefix_tokens, self.grid_size = token_layout(c.num_tokens, c.prefix_tokens)
        start = self.grid_size if self.grid_size > 0 else 4
        self.num_upsamples = max(0, math.ceil(math.log2(c.image_size / start))) if c.image_size > start else 0
        widths = [min(c.max_channels, c.base_channels * 2 ** (self.num_upsamples - i)) for i in range(self.num_upsamples + 1)]
        self.stage_channels = widths
        self.cond = nn.Sequential(nn.Linear(c.feature_dim, c.cond_dim), nn.SiLU(), nn.Linear(c.cond_dim, c.cond_dim))
        if self.grid_size > 0:
            self.stem = nn.Conv2d(c.feature_dim, widths[0], 1)
        else:
            self.stem = nn.Linear(c.feature_dim, widths[0] * 16)
        self.stages = nn.ModuleList(
            UpStage(widths[max(0, i - 1)], widths[i], c.cond_dim, c.num_res_blocks, upsample=i > 0)
            for i in range(len(widths))
        )
        self.out_norm = AdaGroupNorm(widths[-1], c.cond_dim)
        self.out_conv = nn.Conv2d(widths[-1], 3, 3, padding=1)
        with torch.no_grad():  # start near mid-grey instead of far outside [0, 1]
            self.out_conv.weight.mul_(0.1)
            self.out_conv.bias.fill_(0.5)
        self.register_buffer("input_mean", torch.zeros(c.feature_dim))
        self.register_buffer("input_std", torch.ones(c.feature_dim))
        self.register_buffer("input_stats_fitted", torch.zeros(()))
        self.register_buffer("probe_features", torch.zeros(c.probe_images, c.num_tokens, c.feature_dim))
        self.register_buffer("probe_recorded", torch.zeros(()))

    # -- properties shared with NearestNeighbourRenderer
    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    # -- input conditioning
    def normalize(self, features: Tensor) -> Tensor:
        """Per-token normalisation, then the fitted per-channel standardisation (float32)."""
        x = normalize_tokens(features, self.config.input_norm)
        return (x - self.input_mean) / self.input_std

    @torch.no_grad()
    def fit_input_stats(self, features: Tensor, std_floor: float = 0.1) -> None:
        """Per-channel mean/std of the normalised training features (N, T, D); the std is floored
        at ``std_floor`` times its mean over channels."""
        x = normalize_tokens(features, self.config.input_norm).reshape(-1, self.feature_dim)
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = std.clamp_min(std_floor * float(std.mean()) + 1e-6)
        self.input_mean.copy_(mean.to(self.input_mean))
        self.input_std.copy_(std.to(self.input_std))
        self.input_stats_fitted.fill_(1)

    @torch.no_grad()
    def record_probe(self, encoder: nn.Module) -> None:
        """Remember ``encoder``'s features of the probe watches (see :meth:`check_encoder`)."""
        n = self.config.probe_images
        if n == 0:
            return
        feats = encode_watches(encoder, watch_images(n, self.image_size, PROBE_SPLIT, PROBE_SEED))
        if feats.shape[1:] != self.probe_features.shape[1:]:
            raise ValueError(f"encoder gives {tuple(feats.shape[1:])} features, decoder expects {tuple(self.probe_features.shape[1:])}")
        self.probe_features.copy_(feats.to(self.probe_features))
        self.probe_recorded.fill_(1)

    def check_encoder(self, encoder: nn.Module) -> None:
        """Raise ValueError when ``encoder`` does not produce the features this decoder was trained on:
        a different token count or width, or (when a probe was recorded) a mean per-token cosine
        below 0.98 with the training encoder's features of the probe watches."""
        tokens, dim = getattr(encoder, "num_tokens", None), getattr(encoder, "feature_dim", None)
        if (tokens, dim) != (self.num_tokens, self.feature_dim):
            raise ValueError(
                f"feature decoder expects {self.num_tokens} tokens of width {self.feature_dim}, but the encoder gives "
                f"{tokens} x {dim}; train a decoder for this encoder (python -m unified_vlm train-feature-decoder) "
                "or check its feature_select / feature_layer"
            )
        if not bool(self.probe_recorded) or self.config.probe_images == 0:
            return
        feats = encode_watches(encoder, watch_images(self.config.probe_images, self.image_size, PROBE_SPLIT, PROBE_SEED))
        cosine = float(F.cosine_similarity(feats, self.probe_features.float().cpu(), dim=-1).mean())
        if cosine < ENCODER_MATCH_COSINE:
            raise ValueError(
                f"this feature decoder was trained on a different encoder: on the probe watches the given encoder's "
                f"features have mean cosine {cosine:.3f} with the training encoder's (need >= {ENCODER_MATCH_COSINE}); "
                "pass the same encoder weights and feature_layer / feature_select it was trained with"
            )

    # -- forward
    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 3 or features.shape[1:] != (self.num_tokens, self.feature_dim):
            raise ValueError(
                f"feature decoder expects features (B, {self.num_tokens}, {self.feature_dim}), got {tuple(features.shape)}"
            )
        x = self.normalize(features)
        param = self.out_conv.weight
        x = x.to(param.dtype)
        cond = self.cond(x.mean(dim=1))
        if self.grid_size > 0:
            grid = x[:, self.prefix_tokens:]
            b, g = grid.shape[0], self.grid_size
            h = self.stem(grid.transpose(1, 2).reshape(b, self.feature_dim, g, g))
        else:
            h = self.stem(x[:, 0]).view(x.shape[0], -1, 4, 4)
        for stage in self.stages:
            h = stage(h, cond)
        h = self.out_conv(F.silu(self.out_norm(h, cond)))
        if h.shape[-1] != self.image_size:
            h = F.interpolate(h, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return h

    @torch.no_grad()
    def render(self, features: Tensor) -> Tensor:
        """Images (B, 3, S, S) in [0, 1], float32."""
        return self(features).float().clamp(0, 1)

    # -- persistence
    def save_pretrained(self, directory: str | os.PathLike, **info: Any) -> None:
        """Write ``config.json`` (architecture, plus ``info`` such as the encoder and metrics under
        "info") and ``model.safetensors`` into ``directory`` (created if needed)."""
        save_part(directory, {**asdict(self.config), "info": info}, self)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> FeatureDecoder:
        """Load a decoder written by :meth:`save_pretrained`; returned in eval mode."""
        data = read_part_config(directory, "feature decoder",
                                "FeatureDecoder.save_pretrained or `python -m unified_vlm train-feature-decoder --out DIR`")
        data.pop("info", None)
        model = cls(FeatureDecoderConfig.from_dict(data))
        load_part_weights(model, directory, "feature decoder", str(map_location))
        return model.to(map_location).eval()

    @staticmethod
    def read_info(directory: str | os.PathLike) -> dict[str, Any]:
        """The "info" saved beside the architecture (encoder, training metrics)."""
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            return json.load(f).get("info", {})


# ---------------------------------------------------------------------------------------- retrieval
class NearestNeighbourRenderer(nn.Module):
    """Renders by retrieval: the training watch whose pooled feature is closest in cosine.

    Keys are pooled features: each token l2-normalised, averaged over tokens, l2-normalised. The
    per-token normalisation matters for generated queries: the cosine loss leaves each regressed
    token's length free, and without it long tokens would dominate the pool. The index (keys and
    uint8 images) is rebuilt deterministically from the encoder, so its buffers are not saved in
    checkpoints.
    """

    def __init__(self, keys: Tensor, images: Tensor, num_tokens: int | None = None) -> None:
        super().__init__()
        if keys.ndim != 2 or images.ndim != 4 or len(keys) != len(images) or len(keys) == 0:
            raise ValueError(f"need keys (N, D) and images (N, 3, S, S) with the same N >= 1, got {tuple(keys.shape)} and {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        self.register_buffer("keys", F.normalize(keys.float(), dim=-1), persistent=False)
        self.register_buffer("images", images, persistent=False)
        self._num_tokens = num_tokens

    @classmethod
    def build(cls, encoder: nn.Module, num_images: int, image_size: int | None = None, split: str = "train",
              seed: int = 0, batch_size: int = 64) -> NearestNeighbourRenderer:
        """Index watches ``0 .. num_images-1`` of ``split`` rendered at ``image_size`` (default: the
        encoder's input size), keyed by the frozen ``encoder``'s pooled features."""
        if num_images < 1:
            raise ValueError(f"a retrieval renderer needs at least one image, got {num_images}")
        size = int(image_size or encoder.image_size)
        keys, images = [], []
        for start in range(0, num_images, batch_size):
            batch = watch_images(min(batch_size, num_images - start), size, split, seed, start)
            keys.append(cls.pool(encode_watches(encoder, batch, batch_size)))
            images.append((batch * 255).round().to(torch.uint8))
        return cls(torch.cat(keys), torch.cat(images), num_tokens=getattr(encoder, "num_tokens", None))

    @staticmethod
    def pool(features: Tensor) -> Tensor:
        """(B, T, D) -> (B, D): per-token l2-normalise, mean over tokens, l2-normalise."""
        return F.normalize(F.normalize(features.float(), dim=-1).mean(dim=1), dim=-1)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def feature_dim(self) -> int:
        return int(self.keys.shape[1])

    @property
    def num_tokens(self) -> int | None:
        return self._num_tokens

    def __len__(self) -> int:
        return len(self.keys)

    @torch.no_grad()
    def retrieve(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Index and cosine of the nearest training image for each query (B, T, D)."""
        if features.ndim != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"retrieval expects features (B, T, {self.feature_dim}), got {tuple(features.shape)}")
        scores = self.pool(features.to(self.keys.device)) @ self.keys.float().T  # float: keys may be bf16
        best = scores.max(dim=1)
        return best.indices, best.values

    @torch.no_grad()
    def render(self, features: Tensor) -> Tensor:
        """The retrieved training images (B, 3, S, S) in [0, 1], float32."""
        index, _ = self.retrieve(features)
        return self.images[index].float() / 255.0

    def check_encoder(self, encoder: nn.Module) -> None:
        dim = getattr(encoder, "feature_dim", None)
        if dim != self.feature_dim:
            raise ValueError(f"retrieval index has {self.feature_dim}-d keys but the encoder gives {dim}-d features")
