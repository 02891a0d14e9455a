"""``export``: LoRA merged into a Hugging Face backbone directory plus the other parts, loaded back
to the same outputs; bad runs and occupied directories are refused naming what to change."""
from __future__ import annotations

import pytest
import torch
from test_trainable_checkpoint import LORA, lora_run
from transformers import AutoModelForCausalLM

from unified_vlm.cli import main
from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.models.export import BACKBONE_DIR, ExportError, export_model, find_checkpoint, load_exported
from unified_vlm.models.unified import UnifiedVLM


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_an_exported_lora_model_loads_back_to_the_same_outputs(tiny_model_kwargs, watch_records, tmp_path):
    torch.manual_seed(0)
    model = UnifiedVLM(**{**tiny_model_kwargs, "backbone": {**tiny_model_kwargs["backbone"], **LORA}})
    with torch.no_grad():  # trained adapters: LoRA's B starts at zero, which would merge to nothing
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith(("head.", "und_projector.")):
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    out = export_model(model, tmp_path / "export")
    assert (out / BACKBONE_DIR / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out / BACKBONE_DIR, local_files_only=True)
    assert not any("lora" in n for n, _ in hf.named_parameters())  # merged, a plain causal LM

    loaded = load_exported(out)
    batch = ConversationCollator.for_model(model)(watch_records[:6])
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for key in ("loss", "text_loss", "image_loss"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    ids = torch.tensor([[model.ids["bos"]] if "bos" in model.ids else [1]])
    with torch.no_grad():
        assert torch.allclose(model.lm(input_ids=ids).logits, loaded.lm(input_ids=ids).logits, atol=1e-5)

    with pytest.raises(ExportError, match="exists and is not empty; choose a new directory or pass --overwrite"):
        export_model(model, out)
    assert load_exported(out) is not None  # the refused export left the first one intact


def test_the_export_command_and_its_errors(tmp_path, tiny_vq_dir, capsys):
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "no such run directory or checkpoint file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no checkpoint in it" in capsys.readouterr().err

    main(lora_run(tmp_path, tiny_vq_dir, "run", "all", max_steps=2))
    run = tmp_path / "run"
    assert find_checkpoint(run) == run / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    loaded = load_exported(tmp_path / "out")
    assert loaded.backbone_policy == "full" and not any("lora" in n for n in loaded.state_dict())
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "out"), "--overwrite"]) == 0
