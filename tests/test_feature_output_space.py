"""Continuous (feature) output space: contract, pixel decoder, retrieval renderer, persistence, CLI."""
import json
import os

import pytest
import torch

from unified_vlm.models.feature_decoder import (
    FeatureDecoder,
    FeatureDecoderConfig,
    NearestNeighbourRenderer,
    token_layout,
    watch_images,
)
from unified_vlm.models.output_spaces import FeatureOutputSpace, build_feature_output_space
from unified_vlm.models.part_files import CONFIG_NAME, WEIGHTS_NAME
from unified_vlm.pretraining.train_feature_decoder import FeatureDecoderModule
from unified_vlm.registry import ENCODERS

SIZE = 32
TINY = {"image_size": SIZE, "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TINY_DECODER = {"image_size": SIZE, "base_channels": 8, "max_channels": 16, "cond_dim": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from 2 threads on the shared CPU (conftest restores the count)."""
    torch.set_num_threads(1)


def tiny_encoder(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return ENCODERS.create("siglip", **{**TINY, **overrides}).eval()


def tiny_decoder(encoder, seed: int = 0, **overrides) -> FeatureDecoder:
    torch.manual_seed(seed)
    config = FeatureDecoderConfig(num_tokens=encoder.num_tokens, feature_dim=encoder.feature_dim, **{**TINY_DECODER, **overrides})
    return FeatureDecoder(config).eval()


@pytest.fixture(scope="module")
def images():
    return watch_images(8, SIZE)


def test_output_space_contract(images):
    encoder = tiny_encoder()
    space = FeatureOutputSpace(encoder, tiny_decoder(encoder))
    assert space.discrete is False
    assert (space.num_tokens, space.feature_dim, space.target_size, space.image_size) == (16, 32, 32, SIZE)
    assert not any(p.requires_grad for p in space.parameters())
    space.train()
    assert not space.training and not space.encoder.training and not space.renderer.training

    targets = space.targets(images[:3].requires_grad_(False))
    assert targets.shape == (3, 16, 32) and targets.dtype == torch.float32 and not targets.requires_grad
    torch.testing.assert_close(targets, encoder(images[:3]))
    assert space.input_features(targets) is targets  # fed back un-normalised (docs/paper.md 2.5)
    decoded = space.decode(targets)
    assert decoded.shape == (3, 3, SIZE, SIZE) and decoded.dtype == torch.float32
    assert 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    with pytest.raises(ValueError, match="expected features of shape"):
        space.decode(targets[..., :8])
    with pytest.raises(TypeError, match="render"):
        FeatureOutputSpace(encoder, torch.nn.Identity())


@pytest.mark.parametrize("tokens, expected", [(64, (0, 8)), (65, (1, 8)), (1, (1, 0)), (196, (0, 14)), (577, (1, 24))])
def test_token_layout(tokens, expected):
    assert token_layout(tokens) == expected


def test_token_layout_errors():
    with pytest.raises(ValueError, match="prefix_tokens"):
        token_layout(51)
    assert token_layout(68, prefix_tokens=4) == (4, 8)
    with pytest.raises(ValueError, match="not a square"):
        token_layout(66, prefix_tokens=1)


@pytest.mark.parametrize("select", ["pooled", "pooled+patch"])
def test_decoder_handles_pooled_and_prefix_tokens(select, images):
    encoder = tiny_encoder(feature_select=select)
    decoder = tiny_decoder(encoder)
    assert decoder.render(encoder(images[:2])).shape == (2, 3, SIZE, SIZE)


def test_decoder_learns_in_30_steps(images):
    encoder = tiny_encoder()
    torch.manual_seed(0)
    module = FeatureDecoderModule(encoder, FeatureDecoderConfig(num_tokens=16, feature_dim=32, **TINY_DECODER))
    module.fit_input_stats(images)
    optimizer = torch.optim.AdamW(module.decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, parts, _ = module.compute_loss(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses
    assert not any(p.grad is not None for p in encoder.parameters())  # the encoder stays frozen
    assert torch.isfinite(parts["psnr"])


def test_decoding_ignores_each_tokens_length(images):
    """The cosine loss fixes only directions: rescaled (un-normalised) regressions decode the same."""
    encoder = tiny_encoder()
    features = encoder(images[:2]).detach()
    scale = torch.rand(2, features.shape[1], 1, generator=torch.Generator().manual_seed(0)) * 20 + 0.05
    decoder = tiny_decoder(encoder)
    decoder.fit_input_stats(features)
    torch.testing.assert_close(decoder.render(features * scale), decoder.render(features), atol=1e-5, rtol=0)
    raw = tiny_decoder(encoder, input_norm="none")  # the same test is not vacuous
    assert not torch.allclose(raw.render(features * scale), raw.render(features), atol=1e-3)


def test_save_load_round_trip_and_errors(tmp_path, images):
    encoder = tiny_encoder()
    decoder = tiny_decoder(encoder)
    decoder.fit_input_stats(encoder(images).detach())
    decoder.record_probe(encoder)
    decoder.save_pretrained(tmp_path / "dec", note="x")
    loaded = FeatureDecoder.from_pretrained(tmp_path / "dec")
    assert not loaded.training and FeatureDecoder.read_info(tmp_path / "dec") == {"note": "x"}
    features = encoder(images).detach()
    torch.testing.assert_close(loaded.render(features), decoder.render(features), atol=0, rtol=0)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureDecoder.from_pretrained(tmp_path / "missing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        FeatureDecoder.from_pretrained(tmp_path / "empty")
    config = json.loads((tmp_path / "dec" / CONFIG_NAME).read_text())
    config["max_channels"] = 32  # architecture no longer matches the saved weights
    (tmp_path / "dec" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the architecture"):
        FeatureDecoder.from_pretrained(tmp_path / "dec")
    config.pop("max_channels")
    config["width"] = 3
    (tmp_path / "dec" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown FeatureDecoderConfig field"):
        FeatureDecoder.from_pretrained(tmp_path / "dec")


def test_decoder_refuses_another_encoder(tmp_path, images):
    encoder = tiny_encoder()
    decoder = tiny_decoder(encoder)
    decoder.record_probe(encoder)
    decoder.save_pretrained(tmp_path / "dec")
    space = build_feature_output_space(encoder, str(tmp_path / "dec"))
    assert isinstance(space.renderer, FeatureDecoder)
    with pytest.raises(ValueError, match="trained on a different encoder"):
        build_feature_output_space(tiny_encoder(seed=1), str(tmp_path / "dec"))
    with pytest.raises(ValueError, match="expects 16 tokens of width 32"):
        build_feature_output_space(tiny_encoder(feature_select="pooled+patch"), str(tmp_path / "dec"))
    with pytest.raises(ValueError, match="renders 32 px"):
        build_feature_output_space(encoder, str(tmp_path / "dec"), image_size=64)
    with pytest.raises(FileNotFoundError, match="train-feature-decoder"):
        build_feature_output_space(encoder, str(tmp_path / "nowhere"))


def test_retrieval_returns_the_training_image(images):
    encoder = tiny_encoder()
    space = build_feature_output_space(encoder, "retrieval:16")
    assert isinstance(space.renderer, NearestNeighbourRenderer) and len(space.renderer) == 16
    queries = images[[3, 0, 7]]  # watches 3, 0, 7 of the train split are in the index
    features = space.targets(queries)
    index, score = space.renderer.retrieve(features)
    assert index.tolist() == [3, 0, 7] and torch.allclose(score, torch.ones(3), atol=1e-5)
    expected = (queries * 255).round() / 255
    torch.testing.assert_close(space.decode(features), expected, atol=0, rtol=0)
    scaled = features * torch.rand(3, 16, 1, generator=torch.Generator().manual_seed(0)).add(0.1) * 10
    torch.testing.assert_close(space.decode(scaled), expected, atol=0, rtol=0)
    assert not any(name in space.state_dict() for name in ("renderer.keys", "renderer.images"))  # rebuilt, not saved


@pytest.mark.parametrize("spec", ["retrieval:", "retrieval:abc", "retrieval:0", ""])
def test_bad_renderer_specs(spec):
    with pytest.raises(ValueError, match="retrieval:N|renderer must be"):
        build_feature_output_space(tiny_encoder(), spec)


def test_cli_trains_and_saves_atomically(tmp_path):
    from unified_vlm.cli import main as cli_main

    tiny_encoder().save_pretrained(str(tmp_path / "enc"))
    out = tmp_path / "runs" / "decoder"
    argv = ["train-feature-decoder", "--encoder", str(tmp_path / "enc"), "--feature-select", "patch", "--out", str(out),
            "--max-steps", "3", "--num-train", "8", "--num-val", "4", "--batch-size", "4", "--precision", "32-true",
            "--image-size", str(SIZE), "--base-channels", "8", "--max-channels", "16", "--no-progress-bar", "--threads", "1"]
    assert cli_main(argv) == 0
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert os.listdir(out.parent) == ["decoder"]  # no temp dirs left behind
    info = FeatureDecoder.read_info(out)
    assert info["encoder"]["feature_select"] == "patch" and info["metrics"]["steps"] == 3
    decoder = FeatureDecoder.from_pretrained(out)
    assert bool(decoder.input_stats_fitted) and bool(decoder.probe_recorded)
    encoder = ENCODERS.create("siglip", weights=str(tmp_path / "enc"), feature_select="patch")
    assert build_feature_output_space(encoder, str(out)).decode(torch.randn(1, 16, 32)).shape == (1, 3, SIZE, SIZE)
    with pytest.raises(FileExistsError, match="--overwrite"):  # refused before any training
        cli_main(argv)


def test_both_renderers_decode_in_bfloat16(images):
    """Under ``precision="bf16-true"`` Lightning casts the whole model, buffers included."""
    encoder = tiny_encoder()
    for space in (FeatureOutputSpace(encoder, tiny_decoder(encoder)), build_feature_output_space(encoder, "retrieval:4")):
        features = space.targets(images[:2])
        space.to(torch.bfloat16)
        decoded = space.decode(features)
        assert decoded.shape == (2, 3, SIZE, SIZE) and decoded.dtype == torch.float32
        space.float()
