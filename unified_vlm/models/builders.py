"""Turn config specs into modules. ``builtin`` weights are looked up (shipped or cached) through
``unified_vlm.assets``; training a missing one happens there, before a model is built."""
from __future__ import annotations


from torch import nn

from unified_vlm.assets import BUILTIN, require_builtin
from unified_vlm.registry import ENCODERS


def build_text_tokenizer(path: str):
    """``builtin`` (the shipped watch tokenizer, or its cached copy) or a local tokenizer directory."""
    from unified_vlm.text_tokenizer import load_text_tokenizer

    return load_text_tokenizer(require_builtin("tokenizer") if path == BUILTIN else path)


def resolve_encoder_weights(name: str, weights: str | None) -> str | None:
    """The local path behind ``weights`` for encoder ``name`` (``builtin`` resolved)."""
    ENCODERS.get(name)  # an unknown encoder name fails here, with close matches
    if weights != BUILTIN:
        return weights
    kind = {"siglip": "encoder", "vq_codes": "vq"}.get(name)
    if kind is None:
        raise ValueError(f"encoder.weights: builtin only exists for the 'siglip' and 'vq_codes' encoders, not {name!r}; give a local path or null")
    return str(require_builtin(kind))


def build_encoder(spec) -> nn.Module:
    weights = resolve_encoder_weights(spec.name, spec.weights)
    kwargs = dict(spec.options)
    if weights is not None:
        kwargs["weights"] = weights
    return ENCODERS.create(spec.name, **kwargs)


def build_vq_tokenizer(path: str | None):
    """``builtin`` (shipped or cached), a ``train-vq`` directory, or a LlamaGen VQ-16 checkpoint
    file (``.pt``/``.pth``/``.safetensors``)."""
    from unified_vlm.models.vq_loading import load_vq_tokenizer

    if path is None:
        raise ValueError("no VQ tokenizer given (null): a VQ space needs a tokenizer (a local dir, a LlamaGen file or builtin)")
    return load_vq_tokenizer(str(require_builtin("vq")) if path == BUILTIN else path)


def build_output_space(spec, understanding_encoder=None) -> nn.Module:
    """The generation-side space of ``spec`` (an ImageOutputSpec); ``understanding_encoder`` is
    the EncoderSpec a ``features`` space copies when ``spec.encoder`` is null."""
    from unified_vlm.models.config import EncoderSpec, coerce
    from unified_vlm.models.output_spaces import VQOutputSpace, build_feature_output_space

    if spec.space == "vq":
        return VQOutputSpace(build_vq_tokenizer(spec.tokenizer))
    if spec.space == "features":
        tower = coerce(EncoderSpec, spec.encoder) if spec.encoder is not None else understanding_encoder
        if tower is None:
            raise ValueError("image_output.space 'features' needs a generation tower: set image_output.encoder")
        if spec.renderer is None:
            raise ValueError(
                "image_output.renderer is null: a 'features' space needs a way to make pixels "
                "(retrieval:N, or a directory from `python -m unified_vlm train-feature-decoder`)"
            )
        return build_feature_output_space(build_encoder(tower), spec.renderer)
    raise ValueError(f"unknown image_output.space {spec.space!r}; available: vq, features")
