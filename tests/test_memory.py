"""``memory``: the model of a config composed on the meta device (no weights read), its parameters
per module, and memory per device for DDP / FSDP under full fine-tuning and LoRA."""
from __future__ import annotations

from pathlib import Path

import yaml

from unified_vlm.cli import main
from unified_vlm.models.memory import build_on_meta, model_config, report
from unified_vlm.models.unified import UnifiedVLM

ROOT = Path(__file__).resolve().parents[1]


def rows(table):
    return {r["module"]: (r["policy"], r["trainable"], r["frozen"]) for r in table}


def test_the_paper_config_is_sized_without_its_weights():
    table, estimates = report(ROOT / "configs" / "paper_siglip_vq.yaml")
    by = rows(table)
    # Vicuna-7B-v1.5 (LLaMA-2 7B) and LoRA r=128 on its 7 Linear kinds in 32 layers:
    # 32 x 128 x (4 x (4096 + 4096) + 3 x (4096 + 11008)) = 319,815,680 adapter weights
    assert by["lm"] == ("lora", 319_815_680, 6_738_415_616)
    assert by["encoder"] == ("frozen", 0, 92_884_224)  # SigLIP-base-224 vision tower
    assert by["head"][1] == 4096 * 16384 + 16384  # the VQ-16 codebook head
    cells = {(e.strategy, e.policy): e for e in estimates}
    assert set(cells) == {("ddp", "lora"), ("fsdp", "lora"), ("ddp", "full"), ("fsdp", "full")}
    for policy in ("lora", "full"):  # FSDP shards all but the frozen towers over 3 devices
        ddp, fsdp = cells["ddp", policy], cells["fsdp", policy]
        assert fsdp.weights < ddp.weights / 2 and abs(fsdp.gradients * 3 - ddp.gradients) < 1e-6
        assert ddp.activations == fsdp.activations > 0
    assert cells["ddp", "full"].optimizer > 8 * cells["ddp", "lora"].optimizer
    assert abs(cells["ddp", "lora"].weights - (6_738_415_616 * 2 + 319_815_680 * 4 + 87_093_248 * 4
                                               + 92_884_224 * 4 + 71_883_403 * 4) / 1024**3) < 0.05


def test_a_tiny_config_on_meta_matches_the_real_model():
    config = model_config(ROOT / "configs" / "tiny_siglip_vq.yaml")
    meta = build_on_meta(config)
    assert all(p.is_meta for p in meta.parameters())
    real = UnifiedVLM(**config)
    assert rows(meta.parameter_table()) == rows(real.parameter_table())


def test_unknown_base_weights_and_missing_configs_are_named(tmp_path, capsys):
    raw = yaml.safe_load((ROOT / "configs" / "paper_siglip_vq.yaml").read_text())
    raw["model"]["backbone"]["options"]["path"] = "/nowhere/my-own-13b"
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["memory", str(config)]) == 2
    assert "backbone path /nowhere/my-own-13b: not on this machine and not a known architecture" in capsys.readouterr().err
    assert main(["memory", str(tmp_path / "none.yaml")]) == 2
    assert "no config file" in capsys.readouterr().err
