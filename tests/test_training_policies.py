"""Training policies of the composed model on tiny parts: VQ-VQ sharing, LoRA / frozen backbones,
gradient checkpointing, the per-module parameter table, whitening, and classifier-free guidance."""
from __future__ import annotations

import pytest
import torch

from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.evaluation.record_tasks import generate_images
from unified_vlm.models.feature_norm import FeatureWhitening
from unified_vlm.models.unified import UnifiedVLM


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make(kwargs, **changes):
    torch.manual_seed(0)
    merged = dict(kwargs)
    for key, value in changes.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return UnifiedVLM(**merged)


def gradient_report(model, batch):
    model.train()
    model.zero_grad()
    out = model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"no or non-finite gradient for {missing}"
    return out


def test_vq_vq_shares_the_projector_and_trains(tiny_model_kwargs, tiny_vq_dir, watch_records):
    model = make(tiny_model_kwargs, encoder={"name": "vq_codes", "weights": tiny_vq_dir, "options": {}}, und_projector="linear")
    assert model.shares_projector and model.gen_projector is model.und_projector
    assert model.encoder.num_tokens == model.output_space.num_tokens == 16
    gradient_report(model, ConversationCollator.for_model(model)(watch_records[:6]))
    assert [r["module"] for r in model.parameter_table()].count("und_projector+gen") == 1


def test_lora_trains_only_adapters_projectors_and_head(tiny_model_kwargs, watch_records):
    model = make(tiny_model_kwargs, backbone={"train": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lm_trainable = {n for n in trainable if n.startswith("lm.")}
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    assert any(n.startswith("und_projector.") for n in trainable) and any(n.startswith("head.") for n in trainable)
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)
    gradient_report(model, ConversationCollator.for_model(model)(watch_records[:6]))
    row = {r["module"]: r for r in model.parameter_table()}["lm"]
    assert row["policy"] == "lora" and 0 < row["trainable"] < row["frozen"]


def test_lora_modules_to_save_trains_embeddings(tiny_model_kwargs, watch_records):
    model = make(tiny_model_kwargs, backbone={"train": "lora", "lora": {"r": 2, "modules_to_save": ["embed_tokens", "lm_head"]}})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    gradient_report(model, ConversationCollator.for_model(model)(watch_records[:6]))


def test_frozen_backbone_trains_only_the_adapters(tiny_model_kwargs, watch_records):
    model = make(tiny_model_kwargs, backbone={"train": "frozen"})
    assert not any(p.requires_grad for p in model.lm.parameters())
    gradient_report(model, ConversationCollator.for_model(model)(watch_records[:6]))
    text = model.format_parameter_table()
    assert "lm" in text and "frozen" in text and "total" in text


@pytest.mark.parametrize(
    "backbone, match",
    [
        ({"train": "partial"}, "backbone.train"),
        ({"train": "full", "lora": {"r": 4}}, "train: lora"),
        ({"train": "lora", "lora": {"rank": 4}}, "unknown key"),
    ],
)
def test_bad_backbone_policies_are_refused_at_construction(tiny_model_kwargs, backbone, match):
    with pytest.raises(ValueError, match=match):
        make(tiny_model_kwargs, backbone=backbone)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_kwargs, watch_records):
    plain = make(tiny_model_kwargs)
    ckpt = make(tiny_model_kwargs, backbone={"gradient_checkpointing": True})
    batch = ConversationCollator.for_model(plain)(watch_records[:6])
    a, b = gradient_report(plain, batch), gradient_report(ckpt, batch)
    torch.testing.assert_close(a["loss"], b["loss"])
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_whitening_decorrelates_and_freezes_after_its_budget():
    torch.manual_seed(0)
    mix = torch.randn(6, 6) * torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1, 0.05])
    data = torch.randn(4000, 6) @ mix + 3.0
    white = FeatureWhitening(6, fit_samples=2000, eps=1e-6).train()
    for chunk in data.split(500):
        out = white(chunk)
    assert white.count.item() == 2000  # stopped updating after the budget
    out = white.eval()(data)
    torch.testing.assert_close(out.mean(0), torch.zeros(6), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), torch.eye(6), atol=0.1, rtol=0)
    state = white.state_dict()
    assert {"mean", "transform", "count"} <= set(state)
    clone = FeatureWhitening(6)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.eval()(data[:10]), white(data[:10]))


def test_prompt_dropout_empties_only_generation_prompts_in_training(tiny_model_kwargs, watch_records):
    model = make(tiny_model_kwargs, image_output={"prompt_dropout": 0.999})
    collator = ConversationCollator.for_model(model)
    gen = [r for r in watch_records if r["task"] == "generation"][:2]
    vqa = [r for r in watch_records if r["task"] == "vqa"][:2]
    torch.manual_seed(0)
    dropped = collator(gen + vqa, training=True)
    kept = collator(gen + vqa)
    empty = [collator.encode(collator.drop_prompt(r))["input_ids"] for r in gen]
    for i, ids in enumerate(empty):
        assert torch.equal(dropped["input_ids"][i, : len(ids)], ids)
        assert not torch.equal(kept["input_ids"][i, : len(ids)], ids)
    for i in (2, 3):  # VQA untouched (the batches differ only in padding)
        n = int(kept["attention_mask"][i].sum())
        assert torch.equal(dropped["input_ids"][i, :n], kept["input_ids"][i, :n])
    uncond = collator.unconditional_prompt()
    assert torch.equal(empty[0][: len(uncond)], torch.tensor(uncond))
    with pytest.raises(ValueError, match="prompt_dropout"):
        make(tiny_model_kwargs, image_output={"prompt_dropout": 1.0})


def test_classifier_free_guidance(tiny_model_kwargs, watch_records):
    model = make(tiny_model_kwargs).eval()
    gen = [r for r in watch_records if r["task"] == "generation"][:2]
    prompts = [model.chat_format.encode_prompt(r["conversations"], 0) for r in gen]
    uncond = [model.chat_format.unconditional_prompt()] * 2
    kwargs = dict(max_new_tokens=3, image_policy="force")
    plain = model.generate(prompts, **kwargs)
    scale_one = model.generate(prompts, cfg_scale=1.0, uncond_prompts=uncond, **kwargs)
    guided = model.generate(prompts, cfg_scale=3.0, uncond_prompts=uncond, **kwargs)
    guided_full = model.generate(prompts, cfg_scale=3.0, uncond_prompts=uncond, use_cache=False, **kwargs)
    for p, o, g, f in zip(plain, scale_one, guided, guided_full):
        assert torch.equal(p.image_tokens, o.image_tokens)  # scale 1 is exactly unguided
        assert p.text_ids == g.text_ids  # guidance touches image tokens only
        assert torch.equal(g.image_tokens, f.image_tokens)  # KV cache agrees under guidance
    assert any(not torch.equal(p.image_tokens, g.image_tokens) for p, g in zip(plain, guided))
    with pytest.raises(ValueError, match="uncond"):
        model.generate(prompts, cfg_scale=2.0, **kwargs)
    images = generate_images(model, gen, cfg_scale=2.0, max_new_tokens=2)
    assert all(img is not None and img.shape == (3, 16, 16) for img in images)


def test_turn_averaged_text_loss_weighs_every_turn_equally(tiny_model_kwargs):
    token = make(tiny_model_kwargs)
    turn = make(tiny_model_kwargs, text_loss_average="turn")
    end, ign = token.ids["end_turn"], -100
    targets = torch.tensor([[5, end, ign, 7, 8, end], [9, 9, 9, 9, end, ign]])
    logits = torch.randn(2, 6, len(token.tokenizer), generator=torch.Generator().manual_seed(0))
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    by_turn = [ce[0, 0:2].mean(), ce[0, 3:6].mean(), ce[1, 0:5].mean()]
    torch.testing.assert_close(turn.text_loss(logits, targets), torch.stack(by_turn).mean())
    valid = targets != ign
    torch.testing.assert_close(token.text_loss(logits, targets), ce[valid].mean())
    with pytest.raises(ValueError, match="text_loss_average"):
        make(tiny_model_kwargs, text_loss_average="sample")


def test_siglip_siglip_regresses_features_shares_the_projector_and_renders(tiny_model_kwargs, watch_records):
    model = make(
        tiny_model_kwargs,
        image_output={"space": "features", "tokenizer": None, "head": "feature_regression", "loss_weight": 1.0,
                      "renderer": "retrieval:8", "projector": "mlp"},
    )
    assert model.shares_projector and model.output_space.encoder is not model.encoder  # a frozen copy
    assert model.output_space.num_tokens == model.encoder.num_tokens
    out = gradient_report(model, ConversationCollator.for_model(model)(watch_records[:6]))
    assert 0 < out["image_loss"] <= 2  # 1 - cosine
    model.eval()
    gen = [r for r in watch_records if r["task"] == "generation"][:2]
    images = generate_images(model, gen, max_new_tokens=2)
    assert all(img is not None and img.shape == (3, 16, 16) for img in images)


def test_vq_siglip_is_misaligned(tiny_model_kwargs, tiny_vq_dir, watch_records):
    model = make(
        tiny_model_kwargs,
        encoder={"name": "vq_codes", "weights": tiny_vq_dir, "options": {}},
        und_projector="linear",
        image_output={"space": "features", "tokenizer": None, "head": "feature_regression", "renderer": "retrieval:4",
                      "encoder": tiny_model_kwargs["encoder"], "projector": "mlp"},
    )
    assert not model.shares_projector and model.output_space.feature_dim == 32
    gradient_report(model, ConversationCollator.for_model(model)(watch_records[:6]))


@pytest.mark.parametrize(
    "image_output, match",
    [
        ({"space": "features", "head": "vq_classification", "renderer": "retrieval:4"}, "does not fit"),
        ({"space": "features", "head": "feature_regression", "renderer": None}, "renderer"),
        ({"space": "pixels"}, "available: vq, features"),
        ({"space": "features", "head": "feature_regression", "renderer": "retrieval:x"}, "retrieval:N"),
    ],
)
def test_incompatible_output_configs_fail_at_construction(tiny_model_kwargs, image_output, match):
    with pytest.raises(ValueError, match=match):
        make(tiny_model_kwargs, image_output=image_output)
