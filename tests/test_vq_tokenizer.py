"""Quantizer contract, VQ tokenizer round trips and persistence, and that training it learns."""
import json
import os

import lightning as L
import pytest
import torch

from unified_vlm.models.quantizers import FSQQuantizer, fsq_levels_for
from unified_vlm.models.vq_tokenizer import VQTokenizer, VQTokenizerConfig
from unified_vlm.pretraining.train_vq import (
    VQTokenizerModule,
    WatchImageDataModule,
    WatchImageDataset,
    detail_weights,
    load_or_train_vq_tokenizer,
    main,
)
from unified_vlm.registry import QUANTIZERS


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs gain nothing from 2 threads, and on a busy shared CPU the second OpenMP thread
    stalls every op (measured 200x slower); conftest restores the thread count afterwards."""
    torch.set_num_threads(1)


TINY = dict(image_size=16, channels=(8, 16), latent_dim=16, codebook_size=32, codebook_dim=8)


def tiny_tokenizer(**overrides) -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(VQTokenizerConfig(**{**TINY, **overrides}))


def watch_batch(n: int = 8, size: int = 16) -> torch.Tensor:
    dataset = WatchImageDataset("train", n, image_size=size, seed=0)
    return torch.stack([dataset[i] for i in range(n)])


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_every_quantizer_obeys_the_contract(name):
    torch.manual_seed(0)
    quantizer = QUANTIZERS.create(name, dim=16, codebook_size=64)
    encoder = torch.nn.Linear(12, 16)  # stands in for the image encoder
    z = encoder(torch.randn(3, 10, 12))

    quantized, indices, aux_loss = quantizer(z)
    assert quantized.shape == (3, 10, 16)
    assert indices.shape == (3, 10) and indices.dtype == torch.int64
    assert 0 <= int(indices.min()) and int(indices.max()) < quantizer.codebook_size == 64
    assert aux_loss.ndim == 0 and torch.isfinite(aux_loss)
    (quantized.square().mean() + aux_loss).backward()  # straight-through estimator reaches the encoder
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert torch.isfinite(encoder.weight.grad).all()

    quantizer.eval()
    with torch.no_grad():
        quantized, indices, _ = quantizer(z)
        torch.testing.assert_close(quantizer.indices_to_features(indices), quantized)
        codes = quantizer.code_features(indices)
    assert codes.shape == (3, 10, quantizer.code_dim)
    if name == "vq":  # the paper's VQ input features are l2-normalised 8-d codes
        assert quantizer.code_dim == 8
        torch.testing.assert_close(codes.norm(dim=-1), torch.ones(3, 10))


def test_fsq_levels_match_the_requested_codebook_size():
    assert fsq_levels_for(512) == (8, 8, 8) and fsq_levels_for(1024) == (8, 8, 4, 4)
    assert FSQQuantizer(dim=16, codebook_size=4096).codebook_size == 4096
    with pytest.raises(ValueError, match="codebook_size"):
        FSQQuantizer(dim=16, levels=(8, 5, 5), codebook_size=512)


def test_encode_code_features_and_decode_shapes():
    tokenizer = tiny_tokenizer().eval()
    assert tokenizer.grid == (4, 4) and tokenizer.num_tokens == 16 and tokenizer.downsample == 4
    images = watch_batch(2, size=24)  # another size is resized to the native 16 px
    codes = tokenizer.encode(images)
    assert codes.shape == (2, 16) and codes.dtype == torch.int64
    assert tokenizer.code_features(codes).shape == (2, 16, 8)
    decoded = tokenizer.decode(codes)
    assert decoded.shape == (2, 3, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1
    torch.testing.assert_close(tokenizer.decode(codes), decoded, rtol=0, atol=0)  # deterministic in eval


def test_codes_reproduce_the_quantized_latent_of_forward():
    tokenizer = tiny_tokenizer()
    tokenizer.train()(watch_batch(8))  # one training pass re-seeds dead codes from real latents
    tokenizer.eval()
    images = watch_batch(4)
    with torch.no_grad():
        out = tokenizer(images)
        codes = tokenizer.encode(images)
        assert torch.equal(codes, out["codes"])
        torch.testing.assert_close(tokenizer.quantizer.indices_to_features(codes), out["quantized"])
        torch.testing.assert_close(tokenizer.decode(codes), out["recon"].clamp(0, 1))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_save_and_load_give_identical_codes_and_pixels(tmp_path, norm):
    tokenizer = tiny_tokenizer(norm=norm)
    tokenizer.train()(watch_batch(8))
    tokenizer.eval()
    images = watch_batch(4)
    tokenizer.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]

    loaded = VQTokenizer.from_pretrained(tmp_path)
    assert not loaded.training and loaded.config == tokenizer.config
    codes = tokenizer.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), tokenizer.decode(codes))
    assert torch.equal(loaded.code_features(codes), tokenizer.code_features(codes))


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VQTokenizer.from_pretrained(tmp_path / "nowhere")
    tiny_tokenizer().save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VQTokenizer.from_pretrained(tmp_path)

    tiny_tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "latent_dim": 32}))
    with pytest.raises(ValueError, match="shape mismatches"):
        VQTokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "channels": [8, 16, 16]}))
    with pytest.raises(ValueError, match="unexpected keys|missing keys"):
        VQTokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "colour": 1}))
    with pytest.raises(ValueError, match="colour"):
        VQTokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "norm": "layer"}))
    with pytest.raises(ValueError, match="unknown norm"):
        VQTokenizer.from_pretrained(tmp_path)


def test_detail_weights_single_out_thin_hands():
    image = torch.full((1, 3, 9, 9), 0.3)  # flat face colour
    image[..., 4, :] = 1.0  # a one-pixel white hand
    weights = detail_weights(image, strength=30.0)
    assert weights.shape == (1, 1, 9, 9)
    assert float(weights[0, 0, 0, 0]) == pytest.approx(1.0, abs=1e-5)  # flat rows far from the hand keep weight 1
    assert float(weights[0, 0, 4, 4]) > 10 and float(weights[0, 0, 4, 4]) > float(weights[0, 0, 3, 4]) > 1
    assert torch.equal(detail_weights(image, strength=0.0), torch.ones(1, 1, 9, 9))


def test_a_few_steps_on_fixed_watches_reduce_reconstruction_loss():
    torch.manual_seed(0)
    module = VQTokenizerModule(image_size=32, channels=(16, 32), latent_dim=32, codebook_size=64, lr=3e-3)
    images = watch_batch(8, size=32)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    module.train()

    def recon_loss():
        _, _, parts = module._step(images)
        return parts, parts["l1"] + parts["mse"]

    _, first = recon_loss()
    for _ in range(40):
        parts, loss = recon_loss()
        optimizer.zero_grad()
        (loss + module.hparams.edge_weight * parts["edge"] + parts["aux"]).backward()
        optimizer.step()
    _, last = recon_loss()
    assert last < 0.5 * first, (float(first), float(last))


def test_lightning_module_trains_and_logs_psnr_and_codebook_usage():
    module = VQTokenizerModule(**TINY, warmup_steps=2)
    data = WatchImageDataModule(image_size=16, num_train=16, num_val=8, batch_size=4)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2, val_check_interval=3,
    )
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 3
    assert 0 < float(metrics["val/psnr"]) < 60 and float(metrics["train/psnr"]) > 0
    assert 0 < float(metrics["val/codebook_usage"]) <= 1 and float(metrics["val/perplexity"]) >= 1
    assert isinstance(module.hparams.channels, list)  # primitives only in hparams


def test_load_or_train_caches_then_loads(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_or_train_vq_tokenizer(str(tmp_path / "missing"))
    arch = dict(channels=(8, 16), latent_dim=16, codebook_size=32)
    cache = tmp_path / "cache"
    trained = load_or_train_vq_tokenizer(
        None, cache_dir=str(cache), image_size=16, max_steps=2, num_train=8, num_val=4, batch_size=4,
        progress_bar=False, precision="32-true", **arch,
    )
    assert sorted(os.listdir(cache)) == ["config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".vq_tokenizer")]  # temp dir gone
    cached = load_or_train_vq_tokenizer(None, cache_dir=str(cache), image_size=16, **arch)
    images = watch_batch(2)
    assert torch.equal(cached.encode(images), trained.encode(images))
    with pytest.raises(ValueError, match="latent_dim"):
        load_or_train_vq_tokenizer(None, cache_dir=str(cache), image_size=16, latent_dim=64)

    out = tmp_path / "cli"
    assert main(["--out", str(out), "--max-steps", "2", "--image-size", "16", "--channels", "8,16", "--latent-dim", "16",
                 "--codebook-size", "32", "--batch-size", "4", "--num-train", "8", "--no-progress-bar"]) == 0
    assert "val PSNR" in capsys.readouterr().out
    assert VQTokenizer.from_pretrained(out).config.channels == (8, 16)
