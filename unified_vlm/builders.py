"""Turn config specs into modules, resolving ``builtin`` weights (shipped, cached, or trained once)."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from unified_vlm.assets import BUILTIN, cached, shipped
from unified_vlm.registry import ENCODERS

log = logging.getLogger(__name__)

TOKENIZER_CORPUS_WATCHES = 4000


def watch_text_corpus(num_watches: int = TOKENIZER_CORPUS_WATCHES, seed: int = 0) -> list[str]:
    """Every conversation turn of ``num_watches`` generated training watches (all tasks)."""
    from unified_vlm.datamodules.streams import WatchStream

    stream = WatchStream(split="train", num_watches=num_watches, seed=seed, image_size=32)
    return [turn["value"] for i in range(len(stream)) for turn in stream.record(i)["conversations"]]


def build_text_tokenizer(path: str):
    """``builtin`` -> the shipped watch tokenizer, else a cached one, else train it (seconds)."""
    from unified_vlm.text_tokenizer import load_text_tokenizer, train_text_tokenizer

    if path != BUILTIN:
        return load_text_tokenizer(path)
    found = shipped("watch_tokenizer")
    if found is not None:
        return load_text_tokenizer(found)
    target = cached("watch_tokenizer")
    if not target.is_dir():
        log.warning("no built-in text tokenizer at %s: training one on the watch texts (a few seconds)", target)
        save_text_tokenizer_atomically(train_text_tokenizer(watch_text_corpus()), target)
    return load_text_tokenizer(target)


def save_text_tokenizer_atomically(tokenizer, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def own_hyperparameters():
    """Run a nested Lightning job (training a missing built-in asset) with its own hyper-parameters.

    LightningCLI instantiates the model inside a context that hands its hyper-parameters to every
    ``save_hyperparameters()`` call; a module trained while the model is built would take the
    CLI's instead of its own (``AttributeDict has no attribute 'num_train'``)."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


def resolve_encoder_weights(name: str, weights: str | None) -> str | None:
    import unified_vlm.models.encoders  # noqa: F401  (registers the encoders)

    ENCODERS.get(name)  # an unknown name fails here, with the close matches
    if weights != BUILTIN or name == "vq_codes":  # vq_codes resolves builtin through build_vq_tokenizer
        return weights
    if name != "siglip":
        raise ValueError(f"encoder.weights: builtin only exists for the 'siglip' and 'vq_codes' encoders, not {name!r}; give a local path or null")
    found = shipped("watch_encoder")
    if found is not None:
        return str(found)
    from unified_vlm.models.encoder_pretrain import load_or_pretrain_encoder

    with own_hyperparameters():
        return str(load_or_pretrain_encoder(None))


def build_encoder(spec) -> nn.Module:
    weights = resolve_encoder_weights(spec.name, spec.weights)
    kwargs = dict(spec.options)
    if weights is not None:
        kwargs["weights"] = weights
    return ENCODERS.create(spec.name, **kwargs)


def build_vq_tokenizer(path: str | None):
    """``builtin`` (shipped, else cached, else trained once), a ``train-vq`` directory, or a
    LlamaGen VQ-16 checkpoint file (``.pt``/``.pth``/``.safetensors``)."""
    from unified_vlm.models.vq_module import load_or_train_vq_tokenizer
    from unified_vlm.models.vq_tokenizer import VQTokenizer

    if path is None:
        raise ValueError("no VQ tokenizer given (null): a VQ space needs a tokenizer (a local dir, a LlamaGen file or builtin)")
    if path == BUILTIN:
        found = shipped("watch_vq")
        if found is not None:
            return VQTokenizer.from_pretrained(found)
        with own_hyperparameters():
            return load_or_train_vq_tokenizer(None)
    if os.path.isfile(path):
        from unified_vlm.models.llamagen_vq import LlamaGenVQ

        return LlamaGenVQ.from_checkpoint(path)
    return VQTokenizer.from_pretrained(path)


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
