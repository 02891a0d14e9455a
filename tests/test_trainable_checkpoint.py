"""``model.checkpoint_weights: trainable``: checkpoints without the frozen base, which ``fit``
resumes from to the same weights, ``test`` and ``init_from`` reload, and which a model with other
frozen weights refuses naming the module."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from test_checkpoint_safety import config, weights

from unified_vlm.cli import main
from unified_vlm.models import staged, trainable_checkpoint
from unified_vlm.models.unified import UnifiedVLM

LORA = {"train": "lora", "lora": {"r": 2, "alpha": 4, "dropout": 0.0}}


def lora_model(kwargs, seed: int = 0, **changes) -> UnifiedVLM:
    torch.manual_seed(seed)
    return UnifiedVLM(**{**kwargs, "backbone": {**kwargs["backbone"], **LORA}, "checkpoint_weights": "trainable", **changes})


def saved(model: UnifiedVLM) -> dict:
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    return checkpoint


def test_only_trainable_parameters_and_buffers_are_saved_and_loading_restores_the_rest(tiny_model_kwargs):
    model = lora_model(tiny_model_kwargs)
    checkpoint = saved(model)
    state = checkpoint["state_dict"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable <= set(state) and not frozen & set(state)
    persistent_buffers = set(model.state_dict()) - trainable - frozen
    assert persistent_buffers and persistent_buffers <= set(state)
    assert checkpoint["trainable_only"]["dropped"] == len(frozen)
    assert set(checkpoint["trainable_only"]["fingerprint"]) == {"encoder", "output_space", "lm"}

    fresh = lora_model(tiny_model_kwargs)  # same seed: the same from-config base; other adapters below
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: the frozen tensors were put back
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_another_frozen_base_is_refused_naming_the_module(tiny_model_kwargs):
    checkpoint = saved(lora_model(tiny_model_kwargs))
    other = lora_model(tiny_model_kwargs)
    with torch.no_grad():  # another LM base (as from another path), the same encoder and VQ tokenizer
        next(p for n, p in other.lm.named_parameters() if not p.requires_grad).mul_(1.01)
    with pytest.raises(ValueError, match=r"frozen weights of 'lm' it was trained on are not this model's"):
        other.on_load_checkpoint(checkpoint)


def test_a_part_trained_here_but_frozen_there_is_refused(tiny_model_kwargs):
    checkpoint = saved(lora_model(tiny_model_kwargs))
    torch.manual_seed(0)
    full = UnifiedVLM(**tiny_model_kwargs)  # trains the whole LM, whose base the checkpoint left out
    with pytest.raises(ValueError, match=r"tensor\(s\) this model trains are not in it .*same training policy"):
        full.on_load_checkpoint(checkpoint)


def test_init_from_a_trainable_only_checkpoint(tiny_model_kwargs, tmp_path):
    model = lora_model(tiny_model_kwargs)
    with torch.no_grad():
        next(model.head.parameters()).add_(0.5)
    path = tmp_path / "last.ckpt"
    torch.save(saved(model), path)
    target = lora_model(tiny_model_kwargs)
    assert staged.load_model_weights(target, str(path)) == len(model.state_dict())
    assert torch.equal(next(target.head.parameters()), next(model.head.parameters()))


def test_the_mode_is_checked(tiny_model_kwargs):
    with pytest.raises(ValueError, match=r"model.checkpoint_weights must be one of \['all', 'trainable'\]"):
        trainable_checkpoint.check_mode("frozen")
    with pytest.raises(ValueError, match="model.checkpoint_weights"):
        UnifiedVLM(**{**tiny_model_kwargs, "checkpoint_weights": "lora"})


def lora_run(tmp_path, vq_dir, name: str, mode: str, **trainer) -> list[str]:
    args = config(tmp_path, vq_dir, name, **trainer)
    tiny = tmp_path / name / "tiny.yaml"
    raw = yaml.safe_load(tiny.read_text())
    raw["model"]["backbone"].update(LORA)
    raw["model"]["checkpoint_weights"] = mode
    tiny.write_text(yaml.safe_dump(raw))
    return args


def test_fit_resumes_from_a_trainable_only_checkpoint_to_the_full_runs_weights(tmp_path, tiny_vq_dir):
    main(lora_run(tmp_path, tiny_vq_dir, "full", "all"))
    full = tmp_path / "full" / "version_0" / "checkpoints" / "last.ckpt"

    crash = {"class_path": "test_checkpoint_safety.CrashAtStep", "init_args": {"step": 2}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(lora_run(tmp_path, tiny_vq_dir, "killed", "trainable", callbacks=[crash]))
    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.stat().st_size < full.stat().st_size
    main(lora_run(tmp_path, tiny_vq_dir, "resumed", "trainable") + ["--ckpt_path", str(last)])
    resumed = weights(tmp_path / "resumed" / "version_0" / "checkpoints" / "last.ckpt")
    straight = weights(full)
    assert set(resumed) < set(straight)
    different = [k for k in resumed if not torch.equal(resumed[k], straight[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"

    # test reloads it (the frozen base comes from the config's files again)
    run = tmp_path / "resumed" / "version_0"
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert (run.parent / "version_1" / "test_scores.json").is_file()


def test_a_moved_base_is_named_and_its_new_location_accepted(tmp_path, tiny_vq_dir, capsys):
    base = tmp_path / "vq_base"
    shutil.copytree(tiny_vq_dir, base)
    args = lora_run(tmp_path, tiny_vq_dir, "moved", "trainable", max_steps=2)
    tiny = tmp_path / "moved" / "tiny.yaml"
    raw = yaml.safe_load(tiny.read_text())
    raw["model"]["image_output"]["tokenizer"] = str(base)
    tiny.write_text(yaml.safe_dump(raw))
    main(args)
    run = tmp_path / "moved" / "version_0"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    base.rename(tmp_path / "vq_elsewhere")
    for command in (["test", "--ckpt_path", ckpt], ["test", "--config", str(run / "config.yaml"), "--ckpt_path", ckpt]):
        assert main(command) == 2
        assert "frozen base is read from model.image_output.tokenizer=" in capsys.readouterr().err
    assert main(["test", "--config", str(run / "config.yaml"), "--model.image_output.tokenizer", str(tmp_path / "vq_elsewhere"),
                 "--ckpt_path", ckpt]) == 0
    assert (run.parent / "version_1" / "test_scores.json").is_file()
