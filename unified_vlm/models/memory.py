"""``python -m unified_vlm memory CONFIG``: parameters per module and GPU memory per device, with no weights.

The model of a config is composed as ``fit`` composes it, on the meta device (shapes, no storage),
so a 7B paper config is sized in seconds on a laptop. Base weights that are not on this machine are
stood in for by their published architectures (``KNOWN``: Vicuna-7B-v1.5, SigLIP-base-224,
LlamaGen VQ-16), recognised by the file or directory name the config gives; a path that exists is
read for its architecture only (``config.json``), never for weights.

Memory per device, for DDP and FSDP (full sharding over every device), under the config's backbone
policy and the other one (full fine-tuning vs LoRA):

- weights: every parameter at its dtype; FSDP shards all but the frozen vision towers, which
  ``unified_fsdp`` keeps replicated;
- gradients: one per trainable parameter, at its dtype; FSDP shards them;
- AdamW states: two per trainable parameter, at its dtype; FSDP shards them;
- activations (rough, the part to treat as an order of magnitude): per decoder layer
  ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models"); with gradient checkpointing, one layer's worth plus
  the ``2*s*b*h`` bytes kept at each layer boundary; plus the head's fp32 logits and their gradient.
  ``s`` is the longest record (image tokens plus ``--text-tokens``), ``b`` the per-device batch
  (global batch / (devices x accumulation)).

Not counted: the CUDA context and allocator slack (often 1-3 GiB), the data loader, evaluation.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional
from unittest import mock

import torch
import yaml
from torch import nn

GIB = 1024**3


def _known_backbone(name: str):
    from transformers import LlamaConfig

    if "vicuna-7b" in name or "llama-2-7b" in name:
        return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    return None


KNOWN_SIGLIP = {"siglip-base-patch16-224": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_layers": 12,
                                            "num_heads": 12, "intermediate_size": 3072}}
KNOWN_VQ = ("vq_ds16_c2i",)  # LlamaGen VQ-16 (its defaults: LlamaGenVQConfig)


class UnknownArchitecture(ValueError):
    """A base-weights path that is neither on this machine nor a known architecture."""


def _stand_in_backbone(vocab_size: int, path: str, dtype: str = "auto") -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(path)
    config = AutoConfig.from_pretrained(directory, local_files_only=True) if (directory / "config.json").is_file() \
        else _known_backbone(directory.name.lower())
    if config is None:
        raise UnknownArchitecture(f"backbone path {path}: not on this machine and not a known architecture "
                                  "(vicuna-7b*, llama-2-7b*); give a directory with its config.json")
    config.vocab_size = max(config.vocab_size, vocab_size)
    torch_dtype = getattr(torch, dtype) if dtype not in (None, "auto") else torch.float32
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)


def _resolve_encoder(spec: Optional[dict]) -> Optional[dict]:
    """An encoder spec whose missing weights dir is replaced by its known architecture (random init)."""
    if not spec or spec.get("name") not in ("siglip",) or spec.get("weights") in (None, "builtin"):
        return spec
    if Path(spec["weights"]).exists():
        return spec
    known = next((v for k, v in KNOWN_SIGLIP.items() if k in Path(spec["weights"]).name), None)
    if known is None:
        raise UnknownArchitecture(f"encoder weights {spec['weights']}: not on this machine and not a known "
                                  f"architecture ({', '.join(KNOWN_SIGLIP)})")
    return {**spec, "weights": None, "options": {**(spec.get("options") or {}), **known}}


def _architecture_of(original):
    """``HFVisionEncoder.load_model`` that reads a weights dir's config.json only (no weights)."""
    def load_model(cls, weights, attn_implementation, **sizes):
        import transformers

        if weights is None:
            return original.__func__(cls, weights, attn_implementation, **sizes)
        config = getattr(transformers, cls.HF_CONFIG).from_pretrained(weights, local_files_only=True)
        return getattr(transformers, cls.HF_MODEL)(config)
    return classmethod(load_model)


class _NoRenderer(nn.Module):
    """Stands in for a ``features`` space's pixel renderer, which runs at generation only."""

    def render(self, features):
        raise NotImplementedError("an architecture-only model renders nothing")


def _feature_space_without_renderer(encoder, renderer, **_):
    from unified_vlm.models.output_spaces import FeatureOutputSpace

    return FeatureOutputSpace(encoder, _NoRenderer())


def _vq_architecture(path):
    """A ``train-vq`` directory's tokenizer without its weights (its config.json only)."""
    import json

    from unified_vlm.models.part_files import CONFIG_NAME
    from unified_vlm.models.vq_tokenizer import VQTokenizer, VQTokenizerConfig

    config = Path(path) / CONFIG_NAME
    return VQTokenizer(VQTokenizerConfig.from_dict(json.loads(config.read_text()))) if config.is_file() else None


def _stand_in_vq_tokenizer(path):
    from unified_vlm.assets import BUILTIN, require_builtin

    path = str(require_builtin("vq")) if path == BUILTIN else path
    found = _vq_architecture(path) if Path(path).exists() else None
    if found is not None:
        return found
    if any(k in Path(path).name for k in KNOWN_VQ):
        from unified_vlm.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

        return LlamaGenVQ(LlamaGenVQConfig())
    raise UnknownArchitecture(f"VQ tokenizer {path}: not a train-vq directory here and not a known one ({', '.join(KNOWN_VQ)})")


@contextlib.contextmanager
def architecture_only() -> Iterator[None]:
    """Build on the meta device, with the stand-ins of the module doc for base weights."""
    from unified_vlm.models import encoders, output_spaces, vq_loading
    from unified_vlm.registry import BACKBONES

    with torch.device("meta"), \
            mock.patch.dict(BACKBONES._entries, {"pretrained": _stand_in_backbone}), \
            mock.patch.object(vq_loading, "load_vq_tokenizer", _stand_in_vq_tokenizer), \
            mock.patch.object(encoders.HFVisionEncoder, "load_model", _architecture_of(encoders.HFVisionEncoder.__dict__["load_model"])), \
            mock.patch.object(output_spaces, "build_feature_output_space", _feature_space_without_renderer):
        yield


def model_config(config_path: str | Path, overrides: Optional[dict] = None) -> dict:
    """The ``model`` section of a fit config (one YAML file), with ``overrides`` merged per key."""
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    model = copy.deepcopy(raw.get("model") or {})
    for key, value in (overrides or {}).items():
        model[key] = {**(model.get(key) or {}), **value} if isinstance(value, dict) else value
    return model


def build_on_meta(model: dict) -> nn.Module:
    """The ``UnifiedVLM`` of a model config on the meta device (see the module doc)."""
    from unified_vlm.models.unified import UnifiedVLM

    model = copy.deepcopy(model)
    text = model.get("text_tokenizer", "builtin")
    if text not in (None, "builtin") and not Path(text).exists():
        model["text_tokenizer"] = "builtin"  # the backbone's own vocabulary size is used (see _stand_in_backbone)
    model["encoder"] = _resolve_encoder(model.get("encoder"))
    output = model.get("image_output") or {}
    if output.get("encoder"):
        model["image_output"] = {**output, "encoder": _resolve_encoder(output["encoder"])}
    model.pop("init_from", None)
    with architecture_only():
        return UnifiedVLM(**model)


@dataclass
class Estimate:
    strategy: str
    policy: str
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def sequence_length(model: nn.Module, text_tokens: int) -> int:
    return max(model.encoder.num_tokens, model.output_space.num_tokens) + text_tokens


def activation_bytes(model: nn.Module, batch: int, seq: int) -> float:
    """The rough activation memory of one training step per device (see the module doc)."""
    config = model.lm.config
    h, a, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    per_layer = seq * batch * h * (34 + 5 * a * seq / h)
    lm = model.lm
    checkpointed = bool(getattr(lm, "is_activation_checkpointing", None) if hasattr(lm, "is_activation_checkpointing")
                        else getattr(lm, "is_gradient_checkpointing", False))
    body = per_layer + layers * 2 * seq * batch * h if checkpointed else layers * per_layer
    vocab = max(getattr(config, "vocab_size", 0), getattr(model.output_space, "target_size", 0) or 0)
    return body + 2 * 4 * seq * batch * vocab


def estimate(model: nn.Module, devices: int, batch: int, seq: int, strategy: str, policy: str) -> Estimate:
    """Memory per device (GiB) of training ``model`` under ``strategy`` (ddp | fsdp)."""
    params = list({id(p): p for p in model.parameters()}.values())
    from unified_vlm.models.parameter_table import frozen_towers

    tower_ids = {id(p) for m in frozen_towers(model) for p in m.parameters()}
    trainable = [p for p in params if p.requires_grad]
    shard = devices if strategy == "fsdp" else 1
    weights = _bytes(p for p in params if id(p) in tower_ids) + _bytes(p for p in params if id(p) not in tower_ids) / shard
    grads = _bytes(trainable) / shard
    optim = 2 * _bytes(trainable) / shard
    return Estimate(strategy, policy, weights / GIB, grads / GIB, optim / GIB, activation_bytes(model, batch, seq) / GIB)


def devices_and_batch(config_path: str | Path, devices: Optional[int] = None) -> tuple[int, int]:
    """(devices in all, per-device batch) of a fit config: trainer.devices x num_nodes unless
    ``devices`` is given, and global batch / (devices x accumulation)."""
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    trainer, data = raw.get("trainer") or {}, raw.get("data") or {}
    if devices is None:
        d = trainer.get("devices", 1)
        devices = (d if isinstance(d, int) and d > 0 else 1) * int(trainer.get("num_nodes") or 1)
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    return devices, max(1, int(data.get("global_batch_size", 1)) // (devices * accumulate))


def report(config_path: str | Path, devices: Optional[int] = None, text_tokens: int = 128) -> tuple[list[dict], list[Estimate]]:
    """(parameter table of the configured model, memory estimates for ddp/fsdp x its policy and the other)."""
    devices, batch = devices_and_batch(config_path, devices)
    model_cfg = model_config(config_path)
    configured = (model_cfg.get("backbone") or {}).get("train", "full")
    other = "full" if configured == "lora" else "lora"
    estimates, table = [], None
    for policy in (configured, other):
        backbone: dict[str, Any] = {"train": policy}
        if policy == "full":
            backbone["lora"] = {}
        elif not (model_cfg.get("backbone") or {}).get("lora"):
            backbone["lora"] = {"r": 128, "alpha": 256, "dropout": 0.05}  # the paper's
        model = build_on_meta(model_config(config_path, {"backbone": backbone}))
        if table is None:
            table = model.parameter_table()
        seq = sequence_length(model, text_tokens)
        for strategy in ("ddp", "fsdp"):
            estimates.append(estimate(model, devices, batch, seq, strategy, policy))
    return table, estimates


def format_report(config_path, table: list[dict], estimates: list[Estimate], devices: int, batch: int) -> str:
    from unified_vlm.models.parameter_table import format_rows

    lines = [f"{config_path}: parameters per module (built on the meta device)", format_rows(table), "",
             f"memory per device (GiB) on {devices} device(s), per-device batch {batch}; activations are rough",
             f"{'strategy':<10}{'backbone':<10}{'weights':>10}{'grads':>10}{'AdamW':>10}{'activ.':>10}{'total':>10}"]
    for e in estimates:
        lines.append(f"{e.strategy:<10}{e.policy:<10}{e.weights:>10.2f}{e.gradients:>10.2f}{e.optimizer:>10.2f}"
                     f"{e.activations:>10.2f}{e.total:>10.2f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unified_vlm memory",
        description="Parameters per module and GPU memory per device (DDP, FSDP; full and LoRA) of a config, "
                    "built on the meta device: no weights are read or downloaded.")
    parser.add_argument("config", help="a fit config, e.g. configs/paper_siglip_vq.yaml")
    parser.add_argument("--devices", type=int, default=None, help="devices in all (default: trainer.devices x num_nodes)")
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens of the longest record beside its image tokens")
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        print(f"error: no config file {args.config}", file=sys.stderr)
        return 2
    try:
        table, estimates = report(args.config, args.devices, args.text_tokens)
    except (UnknownArchitecture, ValueError) as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    devices, batch = devices_and_batch(args.config, args.devices)
    print(format_report(args.config, table, estimates, devices, batch))
    return 0
