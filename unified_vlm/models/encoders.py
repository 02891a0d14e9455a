"""Vision encoders ("vision towers"): images in [0, 1] -> token features for the LLM.

Every encoder does its own preprocessing (resize to its input size, its normalisation), so
callers hand over raw [0, 1] images of any square resolution and get ``(B, num_tokens,
feature_dim)``. Which tokens come out is a constructor choice (``feature_select``), because the
VLM's sequence layout depends on ``num_tokens`` and must be known before the first batch.

Parameters that the selected tokens do not depend on (layers after ``feature_layer``, a pooling
head that is not selected) are frozen at construction: a trainable tower then needs no
``find_unused_parameters`` under DDP, and "every trainable parameter gets a gradient" holds.

Weights load only from local directories or files: nothing here touches the network.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_vlm.registry import ENCODERS

OPTIONS_FILE = "unified_vlm_encoder.json"  # our options, saved beside the HF weights and config
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionEncoder(nn.Module):
    """Base: maps images in [0,1] (B,3,H,W), any H=W, to token features (B, num_tokens, feature_dim)."""

    num_tokens: int
    feature_dim: int
    image_size: int

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize (bilinear, antialiased) to the encoder's size and normalise, as its processor would."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        images = images.float()
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return (images - self.pixel_mean) / self.pixel_std


def _check_weights_dir(weights: str, model_types: Sequence[str], what: str) -> None:
    """Fail early with a message that names the directory, instead of a hub lookup or a KeyError."""
    config_path = os.path.join(weights, "config.json")
    if not os.path.isdir(weights):
        raise FileNotFoundError(f"{what} weights directory {weights!r} does not exist (weights load only from local dirs)")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{what} weights directory {weights!r} has no config.json")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"{weights!r} holds a {model_type!r} model, not a {what} vision model (expected model_type in {list(model_types)})"
        )


def _read_options(weights: Optional[str]) -> dict:
    path = os.path.join(weights, OPTIONS_FILE) if weights else None
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _freeze(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        module.requires_grad_(False)


def _layer_count(feature_layer: int, num_layers: int) -> int:
    """How many transformer layers hidden_states[feature_layer] has passed through."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(f"feature_layer {feature_layer} is out of range for {num_layers} layers")
    return feature_layer % (num_layers + 1)


def pool_patch_grid(patch: Tensor, side: int) -> Tensor:
    """(B, g*g, D) row-major patch tokens -> (B, side*side, D) by adaptive average pooling of the grid."""
    b, n, d = patch.shape
    g = math.isqrt(n)
    grid = patch.transpose(1, 2).reshape(b, d, g, g)
    return F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)


class HFVisionEncoder(VisionEncoder):
    """A transformers vision tower whose reading options travel with its weights directory."""

    name: str
    feature_layer: int
    feature_select: str
    HF_MODEL: str  # the transformers model class, e.g. "SiglipVisionModel"
    HF_CONFIG: str  # and its config class
    MODEL_TYPES: tuple[str, ...]  # config.json model_type values a weights dir may hold
    DISPLAY_NAME: str

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(model.config.image_size, mean=mean, std=std)
        self.model = model
        self.feature_dim = model.config.hidden_size
        self.num_patches = (model.config.image_size // model.config.patch_size) ** 2

    @staticmethod
    def resolve_options(weights: Optional[str], feature_layer: Optional[int], feature_select: Optional[str],
                        defaults: tuple[int, str], selects: Sequence[str]) -> tuple[int, str]:
        """Explicit arguments win, then the weights dir's saved options, then ``defaults``."""
        saved = _read_options(weights)
        layer = saved.get("feature_layer", defaults[0]) if feature_layer is None else feature_layer
        select = saved.get("feature_select", defaults[1]) if feature_select is None else feature_select
        if select not in selects:
            raise ValueError(f"feature_select must be one of {tuple(selects)}, got {select!r}")
        return int(layer), select

    @classmethod
    def load_model(cls, weights: Optional[str], attn_implementation: str, *, image_size: int, patch_size: int,
                   hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int) -> nn.Module:
        """The transformers tower: from ``weights`` (a local dir, checked to hold this kind of
        model), or random from the tiny architecture arguments when ``weights`` is None."""
        import transformers

        model_class = getattr(transformers, cls.HF_MODEL)
        if weights is not None:
            _check_weights_dir(weights, cls.MODEL_TYPES, cls.DISPLAY_NAME)
            return model_class.from_pretrained(weights, attn_implementation=attn_implementation)
        config = getattr(transformers, cls.HF_CONFIG)(
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, intermediate_size=intermediate_size, attn_implementation=attn_implementation,
        )
        return model_class(config)

    def options(self) -> dict:
        return {"encoder": self.name, "feature_layer": self.feature_layer, "feature_select": self.feature_select}

    def save_pretrained(self, directory: str, **extra) -> None:
        """HF weights + config, plus our options (and any ``extra`` notes such as training metrics)."""
        self.model.save_pretrained(directory)
        with open(os.path.join(directory, OPTIONS_FILE), "w") as f:
            json.dump({**self.options(), **extra}, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, **overrides) -> "HFVisionEncoder":
        return cls(weights=directory, **overrides)


@ENCODERS.register("siglip")
class SiglipEncoder(HFVisionEncoder):
    """SigLIP vision tower (transformers ``SiglipVisionModel``), tiny and random by default.

    feature_layer: -1 is the model's output ``last_hidden_state`` (after its final LayerNorm, the
    tensor the pooling head reads); any other index is ``hidden_states[i]`` (the raw residual
    stream, as LLaVA reads it; the paper uses -2 with Google's checkpoint).
    feature_select: "patch" = every patch token (SigLIP has no CLS, so this is the paper's
    ``cls_patch``, also accepted as a name), "pooled" = the attention-pooling head's output as
    one token, "pooled+patch" = that token followed by the patch tokens.
    patch_pool: k averages the patch grid to k x k tokens (row-major), e.g. 2 gives one token per
    quadrant: 4 instead of 64 patch tokens for a language model that is slow per token.
    When ``weights`` is a directory, the architecture comes from its config; options left as
    None come from the directory's ``unified_vlm_encoder.json`` (written by ``save_pretrained``),
    else -1 and "patch". ``attn_implementation`` "eager" trains about 30 % faster than "sdpa" on
    CPU at 64 tokens (measured); pass "sdpa" for large towers.
    """

    name = "siglip"
    SELECTS = ("patch", "cls_patch", "pooled", "pooled+patch")
    HF_MODEL, HF_CONFIG = "SiglipVisionModel", "SiglipVisionConfig"
    MODEL_TYPES, DISPLAY_NAME = ("siglip_vision_model", "siglip"), "SigLIP"

    def __init__(
        self,
        weights: Optional[str] = None,
        image_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int = 512,
        feature_layer: Optional[int] = None,
        feature_select: Optional[str] = None,
        attn_implementation: str = "eager",
        patch_pool: Optional[int] = None,
    ) -> None:
        feature_layer, feature_select = self.resolve_options(weights, feature_layer, feature_select, (-1, "patch"), self.SELECTS)
        model = self.load_model(weights, attn_implementation, image_size=image_size, patch_size=patch_size,
                                hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                intermediate_size=intermediate_size)
        super().__init__(model, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.feature_layer = feature_layer
        self.feature_select = "patch" if feature_select == "cls_patch" else feature_select
        self.uses_pooled = "pooled" in self.feature_select
        self.uses_patch = "patch" in self.feature_select
        if self.uses_pooled and not model.config.vision_use_head:
            raise ValueError("feature_select uses the pooled token but this SigLIP has no pooling head")
        self.patch_pool = patch_pool
        grid = math.isqrt(self.num_patches)
        if patch_pool is not None and not (self.uses_patch and 1 <= patch_pool <= grid):
            raise ValueError(f"patch_pool must be in [1, {grid}] and needs patch tokens in feature_select, got {patch_pool}")
        patches = self.num_patches if patch_pool is None else patch_pool ** 2
        self.num_tokens = int(self.uses_pooled) + patches * int(self.uses_patch)
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        layers = self.model.encoder.layers
        needs_all = self.uses_pooled or self.feature_layer == -1
        used = len(layers) if needs_all else _layer_count(self.feature_layer, len(layers))
        _freeze(list(layers[used:]))
        if not needs_all:
            _freeze([self.model.post_layernorm])
        if getattr(self.model, "head", None) is not None and not self.uses_pooled:
            _freeze([self.model.head])

    def encode(self, images: Tensor) -> dict[str, Optional[Tensor]]:
        """Both views at once: ``patch`` (B, N, D) at ``feature_layer`` and ``pooled`` (B, D) or None."""
        pixels = self.preprocess(images).to(self.model.dtype)
        want_hidden = self.uses_patch and self.feature_layer != -1
        out = self.model(pixel_values=pixels, output_hidden_states=want_hidden)
        patch = out.hidden_states[self.feature_layer] if want_hidden else out.last_hidden_state
        return {"patch": patch, "pooled": out.pooler_output}

    def forward(self, images: Tensor) -> Tensor:
        views = self.encode(images)
        tokens = []
        if self.uses_pooled:
            tokens.append(views["pooled"].unsqueeze(1))
        if self.uses_patch:
            tokens.append(views["patch"] if self.patch_pool is None else pool_patch_grid(views["patch"], self.patch_pool))
        return torch.cat(tokens, dim=1)


@ENCODERS.register("clip")
class ClipEncoder(HFVisionEncoder):
    """CLIP vision tower (transformers ``CLIPVisionModel``), tiny and random by default.

    LLaVA's reading: ``hidden_states[feature_layer]`` (default -2), and feature_select "patch"
    drops the CLS token while "cls_patch" keeps it in front of the patch tokens. Options left as
    None come from a weights directory's saved options, else LLaVA's -2 and "patch".
    """

    name = "clip"
    SELECTS = ("patch", "cls_patch")
    HF_MODEL, HF_CONFIG = "CLIPVisionModel", "CLIPVisionConfig"
    MODEL_TYPES, DISPLAY_NAME = ("clip_vision_model", "clip"), "CLIP"

    def __init__(
        self,
        weights: Optional[str] = None,
        image_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int = 512,
        feature_layer: Optional[int] = None,
        feature_select: Optional[str] = None,
        attn_implementation: str = "eager",
    ) -> None:
        feature_layer, feature_select = self.resolve_options(weights, feature_layer, feature_select, (-2, "patch"), self.SELECTS)
        model = self.load_model(weights, attn_implementation, image_size=image_size, patch_size=patch_size,
                                hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                intermediate_size=intermediate_size)
        super().__init__(model, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        self.feature_layer, self.feature_select = feature_layer, feature_select
        self.num_tokens = self.num_patches + int(feature_select == "cls_patch")
        layers = model.encoder.layers
        _freeze(list(layers[_layer_count(self.feature_layer, len(layers)):]) + [model.post_layernorm])

    def forward(self, images: Tensor) -> Tensor:
        pixels = self.preprocess(images).to(self.model.dtype)
        tokens = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.feature_layer]
        return tokens if self.feature_select == "cls_patch" else tokens[:, 1:]


@ENCODERS.register("timm")
class TimmEncoder(VisionEncoder):
    """Any timm backbone via ``forward_features``; ViT prefix tokens (CLS, registers) are dropped
    by feature_select "patch" and kept by "cls_patch"; CNN feature maps become row-major tokens.

    Never downloads: ``pretrained`` is refused without ``weights`` (a local checkpoint file).
    Images are resized to ``image_size`` (None: the model's default size), which with
    ``patch_size`` also reaches models that take them (ViTs); ``model_kwargs`` go to
    ``timm.create_model`` (e.g. ``{"depth": 2}`` for a tiny test model).
    """

    SELECTS = ("patch", "cls_patch")

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        pretrained: bool = False,
        weights: Optional[str] = None,
        image_size: Optional[int] = 64,
        patch_size: Optional[int] = 8,
        feature_select: str = "patch",
        model_kwargs: Optional[dict] = None,
    ) -> None:
        import timm

        if feature_select not in self.SELECTS:
            raise ValueError(f"feature_select must be one of {self.SELECTS}, got {feature_select!r}")
        if pretrained and weights is None:
            raise ValueError("pretrained=True needs weights=<local checkpoint file>: timm hub downloads are not used")
        if weights is not None and not os.path.isfile(weights):
            raise FileNotFoundError(f"timm checkpoint file {weights!r} does not exist")
        load = dict(pretrained=True, pretrained_cfg_overlay={"file": weights}) if weights else dict(pretrained=False)
        sizes = {k: v for k, v in (("img_size", image_size), ("patch_size", patch_size)) if v is not None}
        try:
            model = timm.create_model(model_name, num_classes=0, **load, **sizes, **(model_kwargs or {}))
        except TypeError:  # CNNs take neither: they run at any input size
            model = timm.create_model(model_name, num_classes=0, **load, **(model_kwargs or {}))
        cfg = model.pretrained_cfg
        super().__init__(image_size or cfg["input_size"][-1], mean=cfg.get("mean", (0.5,) * 3), std=cfg.get("std", (0.5,) * 3))
        self.model = model
        self.feature_select = feature_select
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        self.eval()  # the shape probe must not touch BatchNorm statistics
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, self.image_size, self.image_size))
        self.train()
        self.num_tokens, self.feature_dim = probe.shape[1], probe.shape[2]

    def forward(self, images: Tensor) -> Tensor:
        features = self.model.forward_features(self.preprocess(images))
        if features.ndim == 4:  # CNN: (B, C, H, W) -> (B, H*W, C)
            return features.flatten(2).transpose(1, 2)
        return features if self.feature_select == "cls_patch" else features[:, self.num_prefix_tokens:]


@ENCODERS.register("vq_codes")
class VQCodeEncoder(VisionEncoder):
    """The paper's VQ input (docs/paper.md 2.2): a frozen VQ tokenizer's quantised, l2-normalised code
    vectors z_q, one token per code in raster order (8-dim for LlamaGen VQ-16).

    ``weights``: a VQ tokenizer directory written by ``train-vq`` / ``save_pretrained``, a LlamaGen
    VQ-16 checkpoint file (``vq_ds16_c2i.pt`` or ``.safetensors``), or ``builtin`` (the shipped
    watch VQ). The tokenizer resizes images itself, so any square input size works. It is always
    frozen: its codes are discrete, so no gradient could reach it anyway.
    """

    def __init__(self, weights: Optional[str] = "builtin") -> None:
        from unified_vlm.assets import BUILTIN, require_builtin
        from unified_vlm.models.vq_loading import load_vq_tokenizer

        if weights is None:
            raise ValueError("encoder 'vq_codes' needs weights: a VQ tokenizer dir, a LlamaGen checkpoint file or builtin")
        tokenizer = load_vq_tokenizer(require_builtin("vq") if weights == BUILTIN else weights)
        size = int(getattr(tokenizer.config, "image_size", 0) or 0)
        super().__init__(size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self.tokenizer = tokenizer
        self.tokenizer.requires_grad_(False)
        self.tokenizer.eval()
        self.num_tokens, self.feature_dim = tokenizer.num_tokens, tokenizer.code_dim

    def train(self, mode: bool = True):  # frozen: stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return self.tokenizer.code_features(self.tokenizer.encode(images.float())).float()
