"""The affine distortion of the understanding input (docs/paper.md 5.2 b): the map itself, its bounds,
its place in the model (understanding only), and that checkpoints carry it exactly."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.models.config import DistortionSpec
from unified_vlm.models.distortion import AffineDistortion, affine_parameters, build_distortion
from unified_vlm.models.unified import UnifiedVLM


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def vq_kwargs(tiny_model_kwargs, tiny_vq_dir):
    return {**tiny_model_kwargs, "encoder": {"name": "vq_codes", "weights": tiny_vq_dir, "options": {}}, "und_projector": "linear"}


def make(kwargs, distortion):
    torch.manual_seed(0)
    return UnifiedVLM(**kwargs, und_distortion=distortion)


@pytest.mark.parametrize("dim", [8, 768])
def test_strength_zero_is_an_invertible_rotation(dim):
    matrix, bias = affine_parameters(dim, 0.0, seed=42)
    eye = torch.eye(dim, dtype=torch.float64)
    assert torch.allclose(matrix.T @ matrix, eye, atol=1e-10) and torch.equal(bias, torch.zeros(dim, dtype=torch.float64))
    assert not torch.allclose(matrix, eye, atol=0.1)  # a real rotation, not the identity
    distortion = AffineDistortion(dim, DistortionSpec(strength=0.0))
    x = torch.randn(3, 5, dim)
    y = distortion(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # lengths kept
    assert torch.allclose(distortion.inverse(y), x, atol=1e-5)


@pytest.mark.parametrize("strength", [0.1, 0.3, 0.9])
def test_scale_factors_and_translation_stay_within_the_strength(strength):
    matrix, bias = affine_parameters(8, strength, seed=3, translation=True)
    factors = torch.linalg.svdvals(matrix)  # A = Q S: the singular values are S's factors
    assert (factors > 1 - strength).all() and (factors <= 1 + strength + 1e-12).all()
    assert factors.max() - factors.min() > 0  # not a uniform scale
    assert (bias > -strength).all() and (bias <= strength).all() and bias.abs().max() > 0
    distortion = AffineDistortion(8, DistortionSpec(strength=strength, seed=3, translation=True))
    x = torch.randn(10, 8)
    assert torch.allclose(distortion.inverse(distortion(x)), x, atol=1e-4)
    assert not any(True for _ in distortion.parameters())  # fixed, never trained


def test_the_seed_fixes_the_map():
    a, _ = affine_parameters(8, 0.2, seed=42)
    b, _ = affine_parameters(8, 0.2, seed=42)
    c, _ = affine_parameters(8, 0.2, seed=43)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    rotation, _ = affine_parameters(8, 0.0, seed=42)
    assert torch.allclose(torch.linalg.qr(a).Q.abs(), rotation.abs(), atol=1e-10)  # same Q, only S changes


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"strength": -0.1}, ">= 0"),
        ({"strength": 1.0}, "below 1"),
        ({"strength": float("nan")}, "finite"),
        ({"strength": 0.1, "seed": -1}, "seed"),
        ({"strength": 0.1, "translation": "yes"}, "translation"),
    ],
)
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        build_distortion(spec, 8)


def test_unknown_spec_keys_are_refused():
    with pytest.raises(TypeError, match="strenght"):
        build_distortion({"strenght": 0.1}, 8)


@pytest.mark.parametrize("encoder", ["vq_codes", "siglip"])
def test_only_the_understanding_input_is_distorted(encoder, tiny_model_kwargs, vq_kwargs, watch_records):
    kwargs = vq_kwargs if encoder == "vq_codes" else tiny_model_kwargs
    plain = make(kwargs, None)
    bent = make(kwargs, {"strength": 0.3, "seed": 42, "translation": True})
    assert bent.und_distortion.dim == bent.encoder.feature_dim == (8 if encoder == "vq_codes" else 32)
    assert bent.hparams["und_distortion"] == {"strength": 0.3, "seed": 42, "translation": True}
    # Same initial weights: building the map draws from its own generator, not the global one.
    own = {k: v for k, v in bent.state_dict().items() if not k.startswith("und_distortion.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in own.items())
    plain.eval(), bent.eval()

    images = torch.stack([r["image"] for r in watch_records[:3]])
    with torch.no_grad():
        expected = bent.und_projector(bent.und_distortion(bent.encoder(images)))
        assert torch.allclose(bent.encode_understanding(images), expected, atol=1e-6)
        assert not torch.allclose(bent.encode_understanding(images), plain.encode_understanding(images), atol=1e-3)

        generation = ConversationCollator.for_model(bent)([r for r in watch_records if r["task"] == "generation"][:3])
        understanding = ConversationCollator.for_model(bent)([r for r in watch_records if r["task"] == "vqa"][:3])
        assert torch.equal(bent(generation)["loss"], plain(generation)["loss"])  # inputs and targets untouched
        assert not torch.equal(bent(understanding)["loss"], plain(understanding)["loss"])
    bent.train()
    bent.zero_grad()
    bent(understanding)["loss"].backward()
    assert bent.und_projector.weight.grad is not None if encoder == "vq_codes" else bent.und_projector[0].weight.grad is not None


def test_checkpoints_carry_the_map_and_reload_identically(tmp_path, vq_kwargs, watch_records):
    model = make(vq_kwargs, {"strength": 0.2, "seed": 7})
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert torch.equal(saved["state_dict"]["und_distortion.matrix"], model.und_distortion.matrix)
    assert saved["hyper_parameters"]["und_distortion"] == {"strength": 0.2, "seed": 7, "translation": False}
    loaded = UnifiedVLM.load_from_checkpoint(path)
    assert torch.equal(loaded.und_distortion.matrix, model.und_distortion.matrix)
    assert torch.equal(loaded.und_distortion.bias, model.und_distortion.bias)
    # The buffers are reproducible from the hyperparameters alone.
    rebuilt = AffineDistortion(8, DistortionSpec(strength=0.2, seed=7))
    assert torch.equal(rebuilt.matrix, saved["state_dict"]["und_distortion.matrix"])
    batch = ConversationCollator.for_model(model)([r for r in watch_records if r["task"] == "vqa"][:3])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(batch)["loss"], loaded(batch)["loss"])


def test_the_config_key_is_typed_for_the_cli():
    """``model.und_distortion`` parses from YAML like every other key, and bad values fail there."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(UnifiedVLM, "model")
    parsed = parser.parse_object({"model": {"und_distortion": {"strength": 0.1, "translation": True}}})
    assert (parsed.model.und_distortion.strength, parsed.model.und_distortion.seed) == (0.1, 42)
    assert parser.parse_object({"model": {}}).model.und_distortion is None
    # Instantiation checks the spec before any model part is built.
    with pytest.raises(ValueError, match="strength must be >= 0"):
        parser.instantiate(parser.parse_object({"model": {"und_distortion": {"strength": -0.5}}}))
