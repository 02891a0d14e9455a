"""Registries: helpful errors, and the contract over every projector, head and backbone."""
from __future__ import annotations

import pytest
import torch

import unified_vlm.models  # noqa: F401  (registers every component)
from unified_vlm.registry import BACKBONES, HEADS, PROJECTORS, Registry


def test_unknown_name_lists_close_matches():
    with pytest.raises(KeyError, match="Did you mean: qwen2"):
        BACKBONES.get("qwen")


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(TypeError, match="does not take option\\(s\\) \\['hiden_size'\\]"):
        BACKBONES.create("qwen2", vocab_size=10, hiden_size=8)


def test_double_registration_is_refused():
    registry = Registry("thing")
    registry.register("a")(lambda: 1)
    with pytest.raises(KeyError, match="already registered"):
        registry.register("a")(lambda: 2)
    assert registry.list("a*") == ["a"]


def _check_gradients(module: torch.nn.Module, loss: torch.Tensor) -> None:
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name", PROJECTORS.list())
def test_projector_contract(name):
    projector = PROJECTORS.create(name, in_dim=8, out_dim=16)
    out = projector(torch.randn(2, 5, 8))
    assert out.shape == (2, 5, 16)
    _check_gradients(projector, out.square().mean())


@pytest.mark.parametrize("name", HEADS.list())
def test_head_contract(name):
    head = HEADS.get(name)
    if head.discrete:
        module, target = HEADS.create(name, hidden_size=16, codebook_size=32), torch.randint(32, (7,))
    else:
        module, target = HEADS.create(name, hidden_size=16, feature_dim=8), torch.randn(7, 8)
    prediction = module(torch.randn(7, 16))
    _check_gradients(module, module.loss(prediction, target))


@pytest.mark.parametrize("name", [n for n in BACKBONES.list() if n != "pretrained"])
def test_backbone_contract(name):
    torch.manual_seed(0)
    lm = BACKBONES.create(name, vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    ids = torch.randint(50, (2, 9))
    out = lm(input_ids=ids, labels=ids)
    _check_gradients(lm, out.loss)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pretrained_backbone_loads_a_local_directory(tmp_path, family):
    torch.manual_seed(0)
    saved = BACKBONES.create(family, vocab_size=60, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    saved.save_pretrained(tmp_path)
    loaded = BACKBONES.create("pretrained", vocab_size=64, path=str(tmp_path), dtype="float32")
    assert loaded.get_input_embeddings().num_embeddings == 64  # resized for added special tokens
    ids = torch.randint(60, (1, 6))
    assert torch.allclose(saved(input_ids=ids).logits, loaded(input_ids=ids).logits[..., :60], atol=1e-5)


def test_pretrained_backbone_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BACKBONES.create("pretrained", vocab_size=10, path=str(tmp_path / "nope"))
