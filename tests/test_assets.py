"""The built-in weights shipped in unified_vlm/assets are what their documented commands make,
and they work: the tokenizer is reproducible, the encoder's tokens carry the watch attributes,
the VQ tokenizer reconstructs watches."""
from __future__ import annotations

import pytest
import torch

from unified_vlm.assets import shipped
from unified_vlm.datamodules.unified_datamodule import pil_to_tensor
from unified_vlm.datamodules.watch import CORNERS, WEATHERS, render_watch, sample_watch


def watches(split: str, n: int, size: int = 64):
    attrs = [sample_watch(0, split, i) for i in range(n)]
    return attrs, torch.stack([pil_to_tensor(render_watch(a, size)) for a in attrs])


@pytest.mark.skipif(shipped("watch_tokenizer") is None, reason="no shipped tokenizer")
def test_shipped_tokenizer_is_what_build_assets_trains():
    from unified_vlm.pretraining.train_text_tokenizer import watch_text_corpus
    from unified_vlm.text_tokenizer import load_text_tokenizer, tokenizer_to_json, train_text_tokenizer

    assert tokenizer_to_json(load_text_tokenizer(shipped("watch_tokenizer"))) == tokenizer_to_json(
        train_text_tokenizer(watch_text_corpus())
    )


@pytest.mark.skipif(shipped("watch_encoder") is None, reason="no shipped encoder")
def test_shipped_encoder_tokens_carry_the_attributes():
    """A linear probe on the frozen encoder's first token reads weather and both corners."""
    from unified_vlm.models.encoders import SiglipEncoder

    torch.manual_seed(0)
    encoder = SiglipEncoder(weights=str(shipped("watch_encoder"))).eval()
    train_attrs, train_images = watches("probe-train", 384)
    test_attrs, test_images = watches("probe-test", 128)
    with torch.no_grad():
        train_x, test_x = encoder(train_images)[:, 0].float(), encoder(test_images)[:, 0].float()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    for field, classes in (("weather", WEATHERS), ("weather_pos", CORNERS), ("battery_pos", CORNERS)):
        y = torch.tensor([classes.index(getattr(a, field)) for a in train_attrs])
        y_test = torch.tensor([classes.index(getattr(a, field)) for a in test_attrs])
        probe = torch.nn.Linear(train_x.shape[1], len(classes))
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(train_x), y).backward()
            opt.step()
        accuracy = (probe(test_x).argmax(-1) == y_test).float().mean().item()
        assert accuracy >= 0.9, f"{field}: probe accuracy {accuracy:.2f}"


@pytest.mark.skipif(shipped("watch_vq") is None, reason="no shipped VQ tokenizer")
def test_shipped_vq_tokenizer_reconstructs_watches():
    from unified_vlm.models.vq_tokenizer import VQTokenizer

    vq = VQTokenizer.from_pretrained(shipped("watch_vq")).eval()
    _, images = watches("vq-check", 32)
    with torch.no_grad():
        codes = vq.encode(images)
        recon = vq.decode(codes).clamp(0, 1)
    psnr = 10 * torch.log10(1 / ((recon - images) ** 2).mean())
    assert codes.shape == (32, vq.num_tokens) and psnr > 20, f"PSNR {psnr:.1f} dB"
    assert codes.unique().numel() > 0.25 * vq.codebook_size  # the codebook is in use


def test_builtin_kinds_name_what_a_model_config_needs():
    from unified_vlm.pretraining.build_assets import builtin_kinds

    assert builtin_kinds({}) == ["tokenizer", "encoder", "vq"]  # the defaults: siglip in, vq out
    vq_vq = {"encoder": {"name": "vq_codes", "weights": "builtin"}, "image_output": {"space": "vq", "tokenizer": "builtin"}}
    assert builtin_kinds(vq_vq) == ["tokenizer", "vq"]
    local = {"text_tokenizer": "/tok", "encoder": {"name": "siglip", "weights": "/enc"},
             "image_output": {"space": "features", "encoder": None}}
    assert builtin_kinds(local) == []  # the feature tower copies the (local) input encoder


def test_a_missing_builtin_is_an_error_that_says_how_to_make_it(tmp_path, monkeypatch):
    import unified_vlm.assets as assets

    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path / "package")
    monkeypatch.setenv("UNIFIED_VLM_CACHE", str(tmp_path / "cache"))
    assert assets.find_builtin("vq") is None
    with pytest.raises(assets.BuiltinAssetMissing, match="build-assets --parts vq"):
        assets.require_builtin("vq")
    cached = tmp_path / "cache" / assets.BUILTIN_ASSETS["vq"].cache_name
    cached.mkdir(parents=True)
    assert assets.find_builtin("vq") is None  # an incomplete cache directory does not count
    (cached / "config.json").write_text("{}")
    assert assets.find_builtin("vq") == cached
