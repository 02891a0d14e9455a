"""Turn config specs into modules. ``builtin`` weights are looked up (shipped or cached) through
``unified_vlm.assets``; training a missing one happens there, before a model is built."""
from __future__ import annotations

from torch import nn

from unified_vlm.assets import BUILTIN, require_builtin
from unified_vlm.registry import ENCODERS, HEADS


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


# ------------------------------------------------------------------ compatibility checks
def projector_sharing(encoder, image_output, encoder_dim: int, output_dim: int) -> tuple[bool, str]:
    """(share, why): do generation inputs go through the understanding projector?

    ``image_output.share_projector`` decides when set; null shares exactly for aligned pairs, which
    read and write one space (VQ codes in and out, or the same feature tower). Sharing needs equal
    feature sizes on both sides. ``encoder`` is the EncoderSpec, ``image_output`` the ImageOutputSpec.
    """
    from unified_vlm.models.config import to_primitive

    aligned = (encoder.name == "vq_codes" and image_output.space == "vq") or (
        image_output.space == "features" and image_output.encoder in (None, to_primitive(encoder))
    )
    share = aligned if image_output.share_projector is None else image_output.share_projector
    if share and encoder_dim != output_dim:
        raise ValueError(
            f"image_output.share_projector=true needs equal feature sizes, but the encoder gives "
            f"{encoder_dim} and the output space {output_dim}; "
            "set share_projector: false"
        )
    why = "explicit" if image_output.share_projector is not None else ("aligned spaces" if aligned else "misaligned spaces")
    return share, why


def check_head_fits_space(image_output, discrete: bool) -> None:
    """The head named by ``image_output`` predicts the kind of target its output space has."""
    if getattr(HEADS.get(image_output.head), "discrete", True) != discrete:
        raise ValueError(
            f"head {image_output.head!r} does not fit output space {image_output.space!r}: "
            f"{'discrete' if discrete else 'continuous'} targets need "
            f"{'vq_classification' if discrete else 'feature_regression'}"
        )
