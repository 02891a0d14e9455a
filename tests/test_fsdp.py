"""``--trainer.strategy unified_fsdp``: the wrap policy read off the model (decoder layers as units,
frozen towers replicated), and what FSDP cannot run here refused with what to change. Training under
FSDP needs a GPU (torch's FSDP refuses CPU devices): see the README for where it was run."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from test_checkpoint_safety import config
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from unified_vlm.cli import main
from unified_vlm.fsdp import NAME, BackboneFSDP, decoder_layer_classes, decoding_settings_refused, frozen_towers
from unified_vlm.models.unified import UnifiedVLM


def build(kwargs, **changes) -> UnifiedVLM:
    torch.manual_seed(0)
    return UnifiedVLM(**{**kwargs, **changes})


def test_decoder_layers_are_the_units_with_and_without_lora(tiny_model_kwargs):
    assert decoder_layer_classes(build(tiny_model_kwargs).lm) == {Qwen2DecoderLayer}
    lora = build(tiny_model_kwargs, backbone={**tiny_model_kwargs["backbone"], "train": "lora", "lora": {"r": 2}})
    assert decoder_layer_classes(lora.lm) == {Qwen2DecoderLayer}
    llama = build(tiny_model_kwargs, backbone={**tiny_model_kwargs["backbone"], "name": "llama"})
    assert decoder_layer_classes(llama.lm) == {LlamaDecoderLayer}
    with pytest.raises(ValueError, match="no decoder layers found in the backbone Linear"):
        decoder_layer_classes(torch.nn.Linear(2, 2))


def test_frozen_towers_are_replicated_and_trained_ones_sharded(tiny_model_kwargs):
    model = build(tiny_model_kwargs)
    assert frozen_towers(model) == [model.encoder, model.output_space]
    trained = build(tiny_model_kwargs, encoder={**tiny_model_kwargs["encoder"], "freeze": False})
    assert frozen_towers(trained) == [trained.output_space]

    settings = BackboneFSDP().wrap_settings(model)
    assert isinstance(settings["auto_wrap_policy"], ModuleWrapPolicy)
    assert settings["auto_wrap_policy"]._module_classes == {Qwen2DecoderLayer}
    assert settings["ignored_modules"] == [model.encoder, model.output_space]
    assert "ignored_modules" not in BackboneFSDP(ignore_frozen_towers=False).wrap_settings(model)
    assert NAME in StrategyRegistry and StrategyRegistry[NAME]["strategy"] is BackboneFSDP


def test_decoding_under_fsdp_is_named_with_the_options_that_turn_it_off():
    fit = {"test_after_fit": True, "vqa_probe": {"max_records": 64}, "generation_probe": {"max_images": 0}}
    assert decoding_settings_refused("fit", fit) == ["--test_after_fit false", "--vqa_probe.max_records 0"]
    assert decoding_settings_refused("fit", {"test_after_fit": False, "vqa_probe": {"max_records": 0}}) == []
    assert "--trainer.strategy ddp" in decoding_settings_refused("test", {})[0]


def test_fsdp_on_cpu_is_refused_before_training(tmp_path, tiny_vq_dir, capsys):
    args = config(tmp_path, tiny_vq_dir, "fsdp") + ["--trainer.strategy", NAME, "--trainer.devices", "1"]
    assert main(args) == 2
    assert "FSDP needs a GPU here" in capsys.readouterr().err
    assert not (tmp_path / "fsdp" / "version_0" / "checkpoints").exists()
