"""Pixels from continuous vision features: the renderers behind :class:`FeatureOutputSpace`.

The paper's SigLIP-output models (SigLIP-SigLIP, VQ-SigLIP; PAPER.md 2.4) regress frozen SigLIP
features and their code has no way back to pixels (PAPER.md 7.2). Two renderers close that gap,
both with the interface ``render(features (B, T, D)) -> images (B, 3, S, S) in [0, 1]``:

* :class:`FeatureDecoder`, a small convolutional decoder trained to reconstruct the watch from
  the frozen encoder's features (``python -m unified_vlm train-feature-decoder``);
* :class:`NearestNeighbourRenderer`, which returns the training watch whose features are the
  most similar (no training, cannot invent a picture, but never blurs one either).

Why the decoder normalises its input (the choice the spec leaves open)
-----------------------------------------------------------------------
The LM is trained with ``1 - cosine`` against the target features, which fixes each token's
*direction* and leaves its *length* free; at inference the regressed vectors are fed back and
handed over as they are (PAPER.md 2.5). A decoder trained on raw features would see tokens of an
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

import argparse
import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unified_vlm.assets import publish_dir

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FeatureDecoder",
    "FeatureDecoderConfig",
    "FeatureDecoderModule",
    "NearestNeighbourRenderer",
    "encode_watches",
    "load_encoder",
    "main",
    "normalize_tokens",
    "token_layout",
    "train_feature_decoder",
    "watch_images",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
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
    from unified_vlm.datamodules.unified_datamodule import pil_to_tensor
    from unified_vlm.datamodules.watch import render_watch, sample_watch

    if count < 1:
        return torch.zeros(0, 3, size, size)
    return torch.stack([pil_to_tensor(render_watch(sample_watch(seed, split, start + i), size)) for i in range(count)])


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


def _check_state_dict(expected: dict[str, Tensor], found: dict[str, Tensor], directory: Any) -> None:
    """Raise a ValueError that says how saved weights differ from the architecture in config.json."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: saved {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if found[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"shape mismatches {shapes[:8]}{' ...' if len(shapes) > 8 else ''}")
    if problems:
        raise ValueError(
            f"feature decoder weights in {directory} do not match the architecture in its {CONFIG_NAME} "
            f"(wrong files or an edited config): {'; '.join(problems)}"
        )


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
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump({**asdict(self.config), "info": info}, f, indent=2, sort_keys=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> FeatureDecoder:
        """Load a decoder written by :meth:`save_pretrained`; returned in eval mode."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"feature decoder directory {str(directory)!r} does not exist "
                "(train one with `python -m unified_vlm train-feature-decoder --out DIR`)"
            )
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(
                    f"feature decoder file {os.path.join(directory, name)} not found (a decoder directory needs "
                    f"{CONFIG_NAME} and {WEIGHTS_NAME}, as written by FeatureDecoder.save_pretrained)"
                )
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            data = json.load(f)
        data.pop("info", None)
        model = cls(FeatureDecoderConfig.from_dict(data))
        state = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(map_location))
        _check_state_dict(model.state_dict(), state, directory)
        model.load_state_dict(state)
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


# ---------------------------------------------------------------------------------------- training
class FeatureDecoderModule(L.LightningModule):
    """Trains a :class:`FeatureDecoder` to reconstruct watches from a frozen encoder's features.

    Loss: detail-weighted L1 + ``mse_weight`` x MSE + ``edge_weight`` x edge loss (the pixel
    losses of the VQ tokenizer, ``vq_module``; ``detail_weight=0``, ``edge_weight=0`` give plain
    L1 + MSE). PSNR (on clamped outputs) is logged, not optimised. ``feature_noise`` adds
    Gaussian noise of that RMS to the normalised features during training (1.0 = the features'
    own RMS; 0.3 keeps a cosine of about 0.96 with the clean token), a knob for robustness to
    imperfect regressions. The encoder stays frozen and in eval mode.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_config: FeatureDecoderConfig | dict | None = None,
        lr: float = 1e-3,
        warmup_steps: int = 50,
        weight_decay: float = 0.0,
        mse_weight: float = 1.0,
        edge_weight: float = 0.5,
        detail_weight: float = 40.0,
        feature_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if decoder_config is None:
            decoder_config = FeatureDecoderConfig(
                num_tokens=encoder.num_tokens, feature_dim=encoder.feature_dim, image_size=encoder.image_size
            )
        elif isinstance(decoder_config, dict):
            decoder_config = FeatureDecoderConfig.from_dict(decoder_config)
        self.save_hyperparameters({"decoder_config": asdict(decoder_config), "lr": lr, "warmup_steps": warmup_steps,
                                   "weight_decay": weight_decay, "mse_weight": mse_weight, "edge_weight": edge_weight,
                                   "detail_weight": detail_weight, "feature_noise": feature_noise})
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.decoder = FeatureDecoder(decoder_config)
        self.decoder.check_encoder(encoder)  # token count and width (no probe recorded yet)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.encoder(images.float()).float()

    @torch.no_grad()
    def fit_input_stats(self, images: Tensor) -> None:
        self.decoder.fit_input_stats(encode_watches(self.encoder, images))

    def compute_loss(self, images: Tensor, features: Tensor | None = None, noise: float = 0.0) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(loss, parts incl. psnr, reconstruction) for images (B, 3, S, S) in [0, 1]."""
        from unified_vlm.models.vq_module import detail_weights, edge_loss

        feats = self.features(images) if features is None else features
        if noise > 0:
            feats = normalize_tokens(feats, self.decoder.config.input_norm)
            feats = feats + noise * torch.randn_like(feats)
        size = self.decoder.image_size
        target = images.float()
        if target.shape[-1] != size:
            target = F.interpolate(target, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        recon = self.decoder(feats).float()
        weights = detail_weights(target, self.hparams.detail_weight)
        weights = weights / weights.mean()
        parts = {
            "l1": (weights * (recon - target).abs()).mean(),
            "mse": (weights * (recon - target).square()).mean(),
            "edge": edge_loss(recon, target),
        }
        loss = parts["l1"] + self.hparams.mse_weight * parts["mse"] + self.hparams.edge_weight * parts["edge"]
        plain_mse = F.mse_loss(recon.detach().clamp(0, 1), target)
        parts["psnr"] = 10 * torch.log10(1.0 / plain_mse.clamp_min(1e-10))
        return loss, parts, recon

    def training_step(self, images: Tensor, batch_idx: int) -> Tensor:
        if not bool(self.decoder.input_stats_fitted):  # fallback; train_feature_decoder fits beforehand
            self.decoder.fit_input_stats(self.features(images))
        loss, parts, _ = self.compute_loss(images, noise=self.hparams.feature_noise)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/psnr", parts.pop("psnr"), prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        return loss

    def validation_step(self, images: Tensor, batch_idx: int) -> None:
        loss, parts, _ = self.compute_loss(images)
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/psnr", parts["psnr"], prog_bar=True, sync_dist=True)
        self.log("val/l1", parts["l1"], sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.decoder.parameters():
            (no_decay if param.ndim < 2 else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.99),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine to zero over the step budget, else over the time budget."""
        warmup = max(1, self.hparams.warmup_steps)
        if step < warmup:
            return (step + 1) / warmup
        trainer = self._trainer
        progress = 0.0
        if trainer is not None:
            if getattr(self, "_total_steps", None) is None:
                self._total_steps = float(trainer.estimated_stepping_batches)
            total = self._total_steps
            timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
            if math.isfinite(total):
                progress = (step - warmup) / max(1, total - warmup)
            elif timer is not None and timer._duration:
                progress = timer.time_elapsed("train") / timer._duration
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def load_encoder(encoder: str | os.PathLike | nn.Module | dict | Any, encoder_name: str = "siglip",
                 **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """An encoder module and a description of it, from ``builtin``, a local weights dir, a spec
    (``EncoderSpec`` or its dict) or a module. ``options`` (feature_select, feature_layer, ...) go
    to the encoder factory; None values are dropped (the weights dir's saved options apply)."""
    from unified_vlm.builders import build_encoder
    from unified_vlm.models.config import EncoderSpec, coerce
    from unified_vlm.models.encoders import HFVisionEncoder

    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(encoder, nn.Module):
        if options:
            raise ValueError(f"encoder options {sorted(options)} cannot be applied to an already built encoder")
        module, spec = encoder, {"name": type(encoder).__name__}
    else:
        if isinstance(encoder, (str, os.PathLike)):
            spec = EncoderSpec(name=encoder_name, weights=str(encoder), options=dict(options))
        else:
            spec = coerce(EncoderSpec, encoder)
            spec = dataclasses.replace(spec, options={**spec.options, **options})
        module = build_encoder(spec)
        spec = {"name": spec.name, "weights": spec.weights, "options": dict(spec.options)}
    if isinstance(module, HFVisionEncoder):
        spec.update(module.options())
    spec.update(num_tokens=module.num_tokens, feature_dim=module.feature_dim, image_size=module.image_size)
    return module.requires_grad_(False).eval(), spec


def _check_out_dir(directory: str, overwrite: bool) -> None:
    """An existing ``directory`` may be replaced only with ``overwrite`` and only if it holds nothing
    but a decoder's two files (checked before training too, so a run cannot fail at the end)."""
    if os.path.exists(directory):
        if not overwrite:
            raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
        if not os.path.isdir(directory):
            raise FileExistsError(f"{directory} exists and is not a directory; pick another --out")
        stray = set(os.listdir(directory)) - {CONFIG_NAME, WEIGHTS_NAME}
        if stray:
            raise FileExistsError(f"{directory} exists and holds other files ({sorted(stray)[:5]}); pick another --out")


def _save_atomically(decoder: FeatureDecoder, directory: str, overwrite: bool, **info: Any) -> None:
    """Write into a temp dir beside ``directory`` and ``os.replace`` it into place, so a reader never
    sees half a decoder (see :func:`_check_out_dir` for when an existing one is replaced)."""
    _check_out_dir(os.path.abspath(directory), overwrite)
    publish_dir(lambda tmp: decoder.save_pretrained(tmp, **info), directory, "feature_decoder")


def train_feature_decoder(
    encoder_spec_or_dir: str | os.PathLike | nn.Module | dict | Any = "builtin",
    out_dir: str | None = None,
    minutes: float = 5.0,
    *,
    encoder_name: str = "siglip",
    feature_select: str | None = None,
    feature_layer: int | None = None,
    image_size: int | None = None,
    max_steps: int = -1,
    batch_size: int = 32,
    num_train: int = 20000,
    num_val: int = 256,
    stats_images: int = 256,
    seed: int = 0,
    precision: str = "bf16-mixed",
    accelerator: str = "auto",
    threads: int | None = None,
    progress_bar: bool = True,
    overwrite: bool = True,
    decoder_kwargs: dict[str, Any] | None = None,
    **module_kwargs: Any,
) -> tuple[FeatureDecoder, dict[str, float]]:
    """Train a decoder for ``minutes`` (or ``max_steps``) on watch images, validate, save to ``out_dir``.

    ``encoder_spec_or_dir``: ``builtin``, a local weights dir (of ``encoder_name``), an
    ``EncoderSpec``/dict, or an encoder module; ``feature_select`` / ``feature_layer`` override the
    saved reading options (not for a module). ``image_size`` = output side (default: the
    encoder's input size). ``decoder_kwargs`` go to :class:`FeatureDecoderConfig`, the rest to
    :class:`FeatureDecoderModule`. Returns the decoder (CPU, eval) and the final validation metrics.
    """
    from unified_vlm.models.vq_module import WatchImageDataModule

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if out_dir is not None:
            _check_out_dir(os.path.abspath(out_dir), overwrite)
        encoder, encoder_info = load_encoder(encoder_spec_or_dir, encoder_name, feature_select=feature_select,
                                             feature_layer=feature_layer)
        size = int(image_size or encoder.image_size)
        config = FeatureDecoderConfig(**{"num_tokens": encoder.num_tokens, "feature_dim": encoder.feature_dim,
                                         "image_size": size, **(decoder_kwargs or {})})
        module_kwargs.setdefault("warmup_steps", 50)
        L.seed_everything(seed, workers=True)
        module = FeatureDecoderModule(encoder, config, **module_kwargs)
        module.fit_input_stats(watch_images(min(stats_images, num_train), size, "train", seed))
        module.decoder.record_probe(encoder)
        data = WatchImageDataModule(size, num_train, num_val, seed, batch_size)
        trainer = L.Trainer(
            accelerator=accelerator, devices=1, precision=precision,
            max_time=timedelta(minutes=minutes), max_steps=max_steps,
            val_check_interval=0.25,
            gradient_clip_val=1.0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=progress_bar,
        )
        trainer.fit(module, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()}
        metrics["steps"] = float(trainer.global_step)
        decoder = module.decoder.cpu().eval()
        if out_dir is not None and trainer.is_global_zero:
            _save_atomically(decoder, out_dir, overwrite, encoder=encoder_info, metrics=metrics,
                             train={"minutes": minutes, "batch_size": batch_size, "seed": seed, **module_kwargs})
        return decoder, metrics
    finally:
        torch.set_num_threads(previous_threads)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unified_vlm train-feature-decoder --encoder builtin --feature-select patch --out DIR --minutes 5``:
    train a pixel decoder for a frozen encoder's features, save it, print the validation PSNR."""
    p = argparse.ArgumentParser(prog="python -m unified_vlm train-feature-decoder", description=main.__doc__)
    p.add_argument("--encoder", default="builtin", help="builtin, or a local encoder weights directory")
    p.add_argument("--encoder-name", default="siglip", help="registered encoder that reads --encoder (default siglip)")
    p.add_argument("--feature-select", default=None, help="encoder token selection (default: the weights dir's saved one)")
    p.add_argument("--feature-layer", type=int, default=None, help="encoder layer (default: the weights dir's saved one)")
    p.add_argument("--out", required=True, help="directory to write config.json + model.safetensors into")
    p.add_argument("--overwrite", action="store_true", help="replace an existing decoder directory")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: time only)")
    p.add_argument("--image-size", type=int, default=None, help="output side (default: the encoder's input size)")
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--max-channels", type=int, default=128)
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--input-norm", default="l2", choices=INPUT_NORMS, help="per-token input normalisation (l2: see module doc)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--mse-weight", type=float, default=1.0)
    p.add_argument("--edge-weight", type=float, default=0.5)
    p.add_argument("--detail-weight", type=float, default=40.0, help="extra L1/MSE weight on thin details (hands, icons)")
    p.add_argument("--feature-noise", type=float, default=0.0, help="training noise on the normalised features")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-val", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (use 1 on a CPU busy with other work)")
    p.add_argument("--no-progress-bar", action="store_true")
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "train-feature-decoder":
        argv = argv[1:]
    a = p.parse_args(argv)
    _, metrics = train_feature_decoder(
        a.encoder, a.out, a.minutes, encoder_name=a.encoder_name, feature_select=a.feature_select,
        feature_layer=a.feature_layer, image_size=a.image_size, max_steps=a.max_steps, batch_size=a.batch_size,
        num_train=a.num_train, num_val=a.num_val, seed=a.seed, precision=a.precision, threads=a.threads,
        progress_bar=not a.no_progress_bar, overwrite=a.overwrite,
        decoder_kwargs={"base_channels": a.base_channels, "max_channels": a.max_channels,
                        "num_res_blocks": a.num_res_blocks, "input_norm": a.input_norm},
        lr=a.lr, warmup_steps=a.warmup_steps, mse_weight=a.mse_weight, edge_weight=a.edge_weight,
        detail_weight=a.detail_weight, feature_noise=a.feature_noise,
    )
    print(f"saved feature decoder to {a.out} after {int(metrics['steps'])} steps: "
          f"val PSNR {metrics.get('val/psnr', float('nan')):.2f} dB, val L1 {metrics.get('val/l1', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
