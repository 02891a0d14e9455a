"""Language backbones: any Hugging Face causal LM, tiny from a config or from a local directory,
and the training policy applied to it (full, LoRA through peft, or frozen)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from unified_vlm.registry import BACKBONES


def _tiny_config(config_cls, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                 max_position_embeddings, attn_implementation="sdpa", **extra):
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
        **extra,
    )


@BACKBONES.register("qwen2")
def qwen2_from_config(
    vocab_size: int,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 768,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A randomly initialised Qwen2 causal LM of the given size (no download).

    ``attn_implementation``: "sdpa" (default) or "eager"; eager trains faster on CPU for the
    short sequences of the tiny configs (README, measured).
    """
    config = _tiny_config(Qwen2Config, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                          intermediate_size, max_position_embeddings, attn_implementation, rope_theta=rope_theta)
    return Qwen2ForCausalLM(config)


@BACKBONES.register("llama")
def llama_from_config(
    vocab_size: int,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 768,
    max_position_embeddings: int = 2048,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A randomly initialised Llama causal LM (the Vicuna family) of the given size."""
    config = _tiny_config(LlamaConfig, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                          intermediate_size, max_position_embeddings, attn_implementation)
    return LlamaForCausalLM(config)


@BACKBONES.register("pretrained")
def pretrained_causal_lm(vocab_size: int, path: str, dtype: str = "auto") -> nn.Module:
    """Any HF causal LM saved in a local directory (``save_pretrained``); never downloads."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"backbone 'pretrained': no config.json in {directory}. Point backbone.options.path at a local "
            "directory written by save_pretrained (the run has no internet access)."
        )
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


TRAIN_POLICIES = ("full", "lora", "frozen")
LORA_DEFAULTS: dict[str, Any] = {
    "r": 128,
    "alpha": 256,
    "dropout": 0.05,
    "target_modules": "all-linear",
    "modules_to_save": None,
}


def apply_training_policy(
    model: nn.Module, train: str = "full", lora: Optional[dict[str, Any]] = None, gradient_checkpointing: bool = False
) -> nn.Module:
    """Return the backbone ready to train under ``train`` (see ``BackboneSpec``).

    LoRA wraps the model in a peft ``PeftModelForCausalLM`` (the paper's setting: adapters on
    every Linear of the LM, embeddings and output layer frozen unless named in modules_to_save).
    """
    if train not in TRAIN_POLICIES:
        raise ValueError(f"backbone.train must be one of {TRAIN_POLICIES}, got {train!r}")
    lora = dict(lora or {})
    if lora and train != "lora":
        raise ValueError(f"backbone.lora is set but backbone.train is {train!r}: set train: lora or remove lora")
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"backbone.lora has unknown key(s) {unknown}; known: {sorted(LORA_DEFAULTS)}")
    if train == "frozen":
        model.requires_grad_(False)
    elif train == "lora":
        from peft import LoraConfig, get_peft_model

        settings = {**LORA_DEFAULTS, **lora}
        config = LoraConfig(
            r=int(settings["r"]),
            lora_alpha=float(settings["alpha"]),
            lora_dropout=float(settings["dropout"]),
            target_modules=settings["target_modules"],
            modules_to_save=settings["modules_to_save"],
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model
