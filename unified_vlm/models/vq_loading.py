"""Load a VQ tokenizer from a local path: a ``train-vq`` directory or a LlamaGen VQ-16 checkpoint file."""
from __future__ import annotations

import os

from torch import nn


def load_vq_tokenizer(path: str | os.PathLike) -> nn.Module:
    """A :class:`VQTokenizer` from a directory, or a :class:`LlamaGenVQ` from a checkpoint file."""
    if os.path.isfile(path):
        from unified_vlm.models.llamagen_vq import LlamaGenVQ

        return LlamaGenVQ.from_checkpoint(str(path))
    from unified_vlm.models.vq_tokenizer import VQTokenizer

    return VQTokenizer.from_pretrained(str(path))
