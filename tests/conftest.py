"""Shared fixtures: offline mode, a private weights cache, tiny components, global-state reset."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TINY_IMAGE = 16


@pytest.fixture(autouse=True)
def _restore_global_state():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Anything a test trains as a 'builtin' fallback lands here, never in ~/.cache."""
    if "UNIFIED_VLM_CACHE" not in os.environ:
        os.environ["UNIFIED_VLM_CACHE"] = str(tmp_path_factory.mktemp("uvlm_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_vq_dir(tmp_path_factory):
    """An untrained 16 px VQ tokenizer (4x4 = 16 tokens) saved the way real ones are."""
    from unified_vlm.models.vq_tokenizer import VQTokenizer, VQTokenizerConfig

    torch.manual_seed(0)
    config = VQTokenizerConfig(image_size=TINY_IMAGE, channels=(8, 16), latent_dim=16, codebook_size=32, codebook_dim=8)
    path = tmp_path_factory.mktemp("tiny_vq")
    VQTokenizer(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_kwargs(tiny_vq_dir):
    """UnifiedVLM arguments for a model that runs a step in well under a second."""
    return {
        "encoder": {
            "name": "siglip",
            "weights": None,
            "freeze": True,
            "options": {"image_size": TINY_IMAGE, "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        },
        "backbone": {"name": "qwen2", "options": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}},
        "image_output": {"tokenizer": tiny_vq_dir},
        "max_length": 256,
    }


@pytest.fixture(scope="session")
def watch_records():
    """A few streamed records of each task at the tiny resolution, images as tensors."""
    from unified_vlm.datamodules.streams import WatchStream
    from unified_vlm.datamodules.unified_datamodule import TensorImages

    return [TensorImages(WatchStream(split="train", num_watches=4, seed=0, image_size=TINY_IMAGE))[i] for i in range(12)]
