"""Staged training (docs/paper.md 5.4, 6): ``model.init_from`` starts a fit from another run's model
weights, ``model.freeze`` keeps named modules fixed; bad names and mismatched checkpoints fail."""
from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
from unified_vlm.models import staged
from unified_vlm.models.unified import UnifiedVLM


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make(kwargs, **changes):
    torch.manual_seed(0)
    return UnifiedVLM(**{**kwargs, **changes})


def fit(model, root, steps, ckpt_path=None, mode="mixed"):
    """A few optimiser steps on 4 streamed 16 px watches; returns the trainer."""
    data = UnifiedDataModule(mode=mode, num_train_watches=4, num_val_watches=1, image_size=16, global_batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def source(tiny_model_kwargs, tmp_path_factory):
    """A 'first stage' run: 3 steps, saved as a Lightning checkpoint (with optimizer state)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stage1")
    model = make(tiny_model_kwargs)
    trainer = fit(model, root, 3)
    path = root / "stage1.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def same(state, model, prefix):
    keys = [k for k in state if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(state[k], model.state_dict()[k]) for k in keys)


def test_init_from_loads_every_weight(tiny_model_kwargs, source):
    path, weights = source
    model = make(tiny_model_kwargs, init_from=str(path))
    assert not same(weights, model, "lm.")  # __init__ alone loads nothing
    assert staged.load_model_weights(model, str(path)) == len(weights)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_frozen_modules_stay_put_while_the_rest_trains(tiny_model_kwargs, source, tmp_path, caplog):
    path, weights = source
    model = make(tiny_model_kwargs, init_from=str(path), freeze=["und_projector", "lm"])
    with caplog.at_level(logging.INFO, logger="unified_vlm"):
        trainer = fit(model, tmp_path, 2)
    assert trainer.global_step == 2  # a new run: the source's step and optimizer are not restored
    assert same(weights, model, "und_projector.") and same(weights, model, "lm.")  # loaded, then untouched
    assert not same(weights, model, "head.") and not same(weights, model, "gen_projector.")  # trained on
    assert all(not p.requires_grad for p in model.und_projector.parameters())
    assert all(p.grad is None for p in model.lm.parameters())
    rows = {r["module"]: r for r in model.parameter_table()}
    assert rows["lm"]["policy"] == rows["und_projector"]["policy"] == "frozen"
    assert rows["lm"]["trainable"] == 0 and rows["head"]["trainable"] > 0 and rows["head"]["policy"] == "full"
    table = next(r.getMessage() for r in caplog.records if "parameters per module" in r.getMessage())
    assert any(line.split()[:2] == ["lm", "frozen"] for line in table.splitlines())
    assert any("loaded" in r.getMessage() and "init_from" in r.getMessage() for r in caplog.records)
    assert model.hparams["freeze"] == ["und_projector", "lm"] and model.hparams["init_from"] == str(path)


def test_freezing_lora_adapters_keeps_them_and_trains_the_projectors(tiny_model_kwargs, tmp_path):
    model = make(tiny_model_kwargs, backbone={**tiny_model_kwargs["backbone"], "train": "lora", "lora": {"r": 2, "alpha": 4}},
                 freeze=["lora"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(p.requires_grad for p in model.lm.parameters())
    fit(model, tmp_path, 2)
    lora = [k for k in before if "lora_" in k]
    assert lora and all(torch.equal(before[k], model.state_dict()[k]) for k in lora)
    assert not torch.equal(before["und_projector.0.weight"], model.und_projector[0].weight)
    assert model.training and all(not m.training for m in staged.frozen_modules(model, ["lora"]))  # no adapter dropout
    assert {r["module"]: r["policy"] for r in model.parameter_table()}["lm"] == "lora, frozen"


def test_a_resumed_fit_restores_its_own_checkpoint_not_init_from(tiny_model_kwargs, source, tmp_path):
    path, _ = source
    model = make(tiny_model_kwargs, init_from=str(tmp_path / "gone.ckpt"))
    trainer = fit(model, tmp_path, 4, ckpt_path=str(path))  # resumes the 3-step run; init_from is not read
    assert trainer.global_step == 4
    with pytest.raises(FileNotFoundError, match="gone.ckpt"):
        fit(make(tiny_model_kwargs, init_from=str(tmp_path / "gone.ckpt")), tmp_path, 1)


@pytest.mark.parametrize(
    "freeze, match",
    [
        (["projector"], "unknown module 'projector'"),
        (["encoder"], "encoder.freeze"),
        (["lora"], "no LoRA adapters"),
        (["und_token_embedding"], "has none"),
        (["gen_projector"], None),  # allowed: SigLIP-VQ has its own generation projector
        ("lm", "list of module names"),
    ],
)
def test_freeze_names_are_checked(tiny_model_kwargs, freeze, match):
    if match is None:
        assert make(tiny_model_kwargs, freeze=freeze).frozen == freeze
        return
    with pytest.raises(ValueError, match=match):
        make(tiny_model_kwargs, freeze=freeze)


def test_a_shared_projector_must_be_frozen_under_both_names(tiny_model_kwargs, tiny_vq_dir):
    vq = {**tiny_model_kwargs, "encoder": {"name": "vq_codes", "weights": tiny_vq_dir, "options": {}}, "und_projector": "linear"}
    with pytest.raises(ValueError, match="name both or neither"):
        make(vq, freeze=["gen_projector"])
    model = make(vq, freeze=["und_projector", "gen_projector"])
    assert not any(p.requires_grad for p in model.gen_projector.parameters())


def test_a_checkpoint_of_another_shape_is_refused_by_name(tiny_model_kwargs, source):
    path, _ = source
    wider = make(tiny_model_kwargs,
                 backbone={"name": "qwen2", "options": {"hidden_size": 48, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}})
    with pytest.raises(ValueError, match=r"shapes differ for .*lm\.model\.embed_tokens\.weight \(checkpoint \(\d+, 32\), model \(\d+, 48\)\)"):
        staged.load_model_weights(wider, str(path))
    linear = make(tiny_model_kwargs, und_projector="linear")
    with pytest.raises(ValueError, match=r"missing in the checkpoint: .*und_projector\.weight.*not in this model: .*und_projector\.0\.weight"):
        staged.load_model_weights(linear, str(path))


def test_nothing_left_to_train_is_an_error(tiny_model_kwargs, tmp_path):
    model = make(tiny_model_kwargs, freeze=["lm", "und_projector", "gen_projector", "head"])
    with pytest.raises(ValueError, match="nothing to train"):
        fit(model, tmp_path, 1)
