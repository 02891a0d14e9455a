"""LlamaGen's VQ-16 image tokenizer (docs/paper.md 2.2: ``vq_ds16_c2i.pt``), loadable from a local file.

A re-implementation of ``VQModel`` from LlamaGen's ``tokenizer/tokenizer_image/vq_model.py``
(FoundationVision/LlamaGen) with the same module tree, so its checkpoints load with
``strict=True``; wrapped in the interface of :class:`~unified_vlm.models.vq_tokenizer.VQTokenizer`
so :class:`~unified_vlm.models.output_spaces.VQOutputSpace` can use either.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_vlm.models.part_files import state_dict_mismatch

__all__ = ["LlamaGenVQ", "LlamaGenVQConfig", "load_llamagen_state_dict"]

CODEBOOK_USED = "quantize.codebook_used"  # LlamaGen's training-only usage buffer; optional on load
NUM_GROUPS = 32


@dataclass
class LlamaGenVQConfig:
    """Defaults are LlamaGen's ``VQ_16`` (``ModelArgs`` + Encoder/Decoder defaults).

    ``image_size`` is the resolution the tokenizer sees (inputs are resized to it), so the
    grid is ``image_size / 2**(len(ch_mult) - 1)`` per side: 256 px -> 16x16 = 256 tokens.
    ``codebook_show_usage`` adds LlamaGen's ``quantize.codebook_used`` buffer (training stats
    only); it is off by default and ignored either way when loading.
    """

    image_size: int = 256
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = False
    ch: int = 128
    ch_mult: tuple[int, ...] = field(default_factory=lambda: (1, 1, 2, 2, 4))
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout_p: float = 0.0
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % NUM_GROUPS]
        if bad:
            raise ValueError(f"GroupNorm({NUM_GROUPS}) needs widths divisible by {NUM_GROUPS}; ch={self.ch} x ch_mult gives {bad}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size={self.image_size} is not divisible by the downsample factor {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaGenVQConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LlamaGenVQConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)


# ----------------------------------------------------------------------- building blocks
# Attribute names below are LlamaGen's: they are the checkpoint's key names.


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NUM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v (LlamaGen's math, via SDPA)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as in LlamaGen
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in taming/LlamaGen


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, config: LlamaGenVQConfig) -> None:
        super().__init__()
        ch, mult, n_res = config.ch, config.ch_mult, config.num_res_blocks
        self.num_resolutions = len(mult)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i_level, m in enumerate(mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n_res):
                block.res.append(ResnetBlock(block_in, ch * m, config.dropout_p))
                block_in = ch * m
                if i_level == self.num_resolutions - 1:
                    block.attn.append(AttnBlock(block_in))
            if i_level != self.num_resolutions - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, config.dropout_p), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, config.dropout_p)])
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: LlamaGenVQConfig) -> None:
        super().__init__()
        ch, mult, n_res = config.ch, config.ch_mult, config.num_res_blocks
        self.num_resolutions = len(mult)
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, config.dropout_p), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, config.dropout_p)])
        self.conv_blocks = nn.ModuleList()  # coarsest level first, as in LlamaGen
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n_res + 1):
                block.res.append(ResnetBlock(block_in, ch * mult[i_level], config.dropout_p))
                block_in = ch * mult[i_level]
                if i_level == self.num_resolutions - 1:
                    block.attn.append(AttnBlock(block_in))
            if i_level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Inference half of LlamaGen's quantizer: nearest (l2-normalised) codebook entry."""

    def __init__(self, config: LlamaGenVQConfig) -> None:
        super().__init__()
        self.l2_norm = config.codebook_l2_norm
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / config.codebook_size, 1.0 / config.codebook_size)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if config.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def indices(self, z: Tensor) -> Tensor:
        """z (B, N, D) -> nearest code (B, N); same distance and tie-breaking as LlamaGen."""
        emb = self.codebook()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        d = flat.square().sum(1, keepdim=True) + emb.square().sum(1) - 2 * flat @ emb.t()
        return d.argmin(dim=1).reshape(z.shape[:-1])


# ----------------------------------------------------------------------------- model


class LlamaGenVQ(nn.Module):
    """LlamaGen ``VQModel`` with the VQTokenizer interface: images in [0, 1] <-> (B, N) raster codes."""

    def __init__(self, config: LlamaGenVQConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or LlamaGenVQConfig()
        self.downsample = config.downsample
        side = config.image_size // self.downsample
        self.grid = (side, side)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def code_dim(self) -> int:
        return self.config.codebook_embed_dim

    def resize(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> ``image_size`` (bilinear, antialiased when shrinking, like torchvision)."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        size = self.config.image_size
        if tuple(images.shape[-2:]) == (size, size):
            return images
        shrinking = images.shape[-1] > size or images.shape[-2] > size
        return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)

    def _latents(self, images: Tensor) -> Tensor:
        dtype = self.quant_conv.weight.dtype
        x = self.resize(images).to(dtype) * 2.0 - 1.0
        z = self.quant_conv(self.encoder(x))  # (B, D, h, w)
        return z.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> codes (B, num_tokens) int64."""
        return self.quantize.indices(self._latents(images)).long()

    def code_features(self, codes: Tensor) -> Tensor:
        """Codes (B, N) -> l2-normalised codebook vectors z_q (B, N, code_dim): the paper's VQ input features."""
        return self.quantize.codebook()[codes.long()]

    def _decode_features(self, features: Tensor) -> Tensor:
        b, _, d = features.shape
        h, w = self.grid
        z = features.transpose(1, 2).reshape(b, d, h, w).to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z))  # in [-1, 1] (unclamped)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, num_tokens) -> images (B, 3, image_size, image_size) in [0, 1]."""
        if codes.ndim != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"expected codes (B, {self.num_tokens}), got {tuple(codes.shape)}")
        out = self._decode_features(self.code_features(codes))
        return ((out.clamp(-1.0, 1.0) + 1.0) / 2.0).float()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Reconstruction for evaluation: codes and the decoded images in [0, 1]."""
        codes = self.encode(images)
        return {"codes": codes, "recon": self.decode(codes)}

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        config: LlamaGenVQConfig | None = None,
        map_location: str | torch.device = "cpu",
        **config_overrides: Any,
    ) -> LlamaGenVQ:
        """Load LlamaGen VQ weights (e.g. ``vq_ds16_c2i.pt``) from a local .pt/.pth/.safetensors file.

        ``config`` (default: VQ-16) with ``config_overrides`` applied (e.g. ``image_size=128``) must
        describe the file's architecture. Returned in eval mode.
        """
        base = asdict(config or LlamaGenVQConfig())
        config = LlamaGenVQConfig.from_dict({**base, **config_overrides})
        state = load_llamagen_state_dict(path)  # before building: a bad path fails fast
        model = cls(config)
        expected = model.state_dict()
        if CODEBOOK_USED not in expected:
            state.pop(CODEBOOK_USED, None)
        elif CODEBOOK_USED not in state:
            state[CODEBOOK_USED] = expected[CODEBOOK_USED]
        _check_state_dict(expected, state, path, config)
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()


def load_llamagen_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state dict in a LlamaGen checkpoint, on CPU.

    Takes ``{"ema": ...}``, ``{"model": ...}`` or ``{"state_dict": ...}`` (LlamaGen's own
    lookup order) or a bare state dict; strips a DDP ``module.`` prefix.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LlamaGen VQ checkpoint {path} not found (expected a local file such as vq_ds16_c2i.pt)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = load_file(path, device="cpu")
    else:
        # Full training checkpoints also pickle LlamaGen's argparse ``args``.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(f"could not read {path} as a torch checkpoint with weights_only=True: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else f"dict with keys {sorted(map(str, obj))[:8]}"
        raise ValueError(f"{path} does not hold a state dict (found {kind})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _check_state_dict(expected: dict[str, Tensor], found: dict[str, Tensor], path: Any, config: LlamaGenVQConfig) -> None:
    """Raise a ValueError that says how the file differs from the configured architecture."""
    problems = state_dict_mismatch(expected, found)
    if problems:
        raise ValueError(f"{path} does not hold a LlamaGen VQ-16 of this config ({asdict(config)}): {', '.join(problems)}")
