"""Invariants of the composed UnifiedVLM on a tiny model: gradients, KV cache, sampling, reload."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.evaluation.record_tasks import generate_images
from unified_vlm.models.decoding import filter_logits
from unified_vlm.models.unified import UnifiedVLM


@pytest.fixture(scope="module")
def model(tiny_model_kwargs):
    torch.manual_seed(0)
    return UnifiedVLM(**tiny_model_kwargs)


def test_forward_backward_gradients(model, watch_records):
    model.train()
    batch = ConversationCollator.for_model(model)(watch_records[:6])  # two watches x (generation, vqa, caption)
    assert batch["und_pixel_values"].shape[0] == 4 and batch["gen_pixel_values"].shape[0] == 2
    model.zero_grad()
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["image_loss"] > 0 and out["text_loss"] > 0
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    frozen = [n for n, p in model.named_parameters() if n.startswith(("encoder.", "output_space."))]
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert not model.encoder.training and not model.output_space.training  # frozen parts stay in eval


def test_misaligned_pair_keeps_projectors_separate(model):
    assert model.shares_projector is False and model.gen_projector is not model.und_projector


def test_share_projector_with_mismatched_features_is_refused(tiny_model_kwargs):
    kwargs = dict(tiny_model_kwargs, image_output=dict(tiny_model_kwargs["image_output"], share_projector=True))
    with pytest.raises(ValueError, match="share_projector"):
        UnifiedVLM(**kwargs)


def _prompts(model, records):
    return [model.chat_format.encode_prompt(r["conversations"], 0) for r in records]


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_kv_cache_matches_full_recompute(model, watch_records, cache):
    """Greedy decoding with the KV cache (preallocated or grown) gives exactly the tokens of
    recomputing every step, for text answers and images, in a left-padded batch of different
    prompt lengths."""
    model.eval()
    torch.manual_seed(1)
    gen = [r for r in watch_records if r["task"] == "generation"][:2]
    vqa = [r for r in watch_records if r["task"] == "vqa"][:2]
    prompts, images = _prompts(model, gen + vqa), [None, None] + [r["image"] for r in vqa]
    assert len({len(p) for p in prompts}) > 1
    for policy in ("force", "auto"):
        cached = model.generate(prompts, images, max_new_tokens=6, image_policy=policy, use_cache=True, cache=cache)
        full = model.generate(prompts, images, max_new_tokens=6, image_policy=policy, use_cache=False)
        for a, b in zip(cached, full):
            assert a.text_ids == b.text_ids
            assert (a.image_tokens is None) == (b.image_tokens is None)
            if a.image_tokens is not None:
                assert torch.equal(a.image_tokens, b.image_tokens)
    forced = model.generate(prompts[:2], max_new_tokens=3, image_policy="force", cache=cache)
    for out in forced:
        assert out.image_tokens is not None and len(out.image_tokens) == model.output_space.num_tokens
        assert out.text_ids[-1] == model.ids["image_end"]
    never = model.generate(prompts, images, max_new_tokens=4, image_policy="never", cache=cache)
    assert all(o.image_tokens is None and model.ids["image_start"] not in o.text_ids for o in never)


def test_generate_rejects_an_unknown_cache_kind(model):
    with pytest.raises(ValueError, match="cache must be static or dynamic"):
        model.generate([[model.ids["pad"]]], cache="paged")


def test_sampling_is_reproducible_with_a_seed(model, watch_records):
    model.eval()
    gen = [r for r in watch_records if r["task"] == "generation"][:2]
    kwargs = dict(max_new_tokens=3, image_policy="force", temperature=1.0, image_temperature=1.0, top_k=8)
    a = model.generate(_prompts(model, gen), seed=3, **kwargs)
    b = model.generate(_prompts(model, gen), seed=3, **kwargs)
    c = model.generate(_prompts(model, gen), seed=4, **kwargs)
    assert all(torch.equal(x.image_tokens, y.image_tokens) for x, y in zip(a, b))
    assert any(not torch.equal(x.image_tokens, z.image_tokens) for x, z in zip(a, c))


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 2, None)[0, 2:]).all()
    probs = logits.softmax(-1)[0]
    kept = filter_logits(logits, None, float(probs[0]) + 1e-3)  # needs the top two tokens
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()


def test_generated_images_decode_to_pixels(model, watch_records):
    model.eval()
    gen = [r for r in watch_records if r["task"] == "generation"][:2]
    images = generate_images(model, gen, max_new_tokens=2)
    for img in images:
        assert img is not None and img.shape == (3, 16, 16) and 0 <= img.min() and img.max() <= 1


def test_checkpoint_round_trip(tmp_path, tiny_model_kwargs, watch_records):
    """Save -> load gives identical losses, with primitive hyperparameters only."""
    torch.manual_seed(0)
    model = UnifiedVLM(**tiny_model_kwargs)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert "text_tokenizer_json" in ckpt

    def primitive(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and primitive(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(primitive(v) for v in x)
        return x is None or isinstance(x, (str, int, float, bool))

    assert primitive(dict(ckpt["hyper_parameters"]))
    loaded = UnifiedVLM.load_from_checkpoint(path)
    batch = ConversationCollator.for_model(model)(watch_records[:6])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(batch)["loss"], loaded(batch)["loss"])


def test_a_few_steps_on_one_batch_reduce_the_loss(tiny_model_kwargs, watch_records):
    torch.manual_seed(0)
    model = UnifiedVLM(**tiny_model_kwargs)
    model.train()
    batch = ConversationCollator.for_model(model)(watch_records[:6])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = model(batch)["loss"]
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_token_slot_embedding_adds_one_learned_vector_per_image_token(tiny_model_kwargs, watch_records):
    torch.manual_seed(0)
    model = UnifiedVLM(**dict(tiny_model_kwargs, und_token_embedding=True)).train()
    slots = model.und_token_embedding
    assert slots.weight.shape == (model.encoder.num_tokens, model.lm.config.hidden_size)
    images = torch.stack([r["image"] for r in watch_records if r["task"] == "vqa"][:2])
    with torch.no_grad():
        plain = model.und_projector(model.encoder(images))
        torch.testing.assert_close(model.encode_understanding(images), plain + slots.weight)
    out = model(ConversationCollator.for_model(model)(watch_records[:6]))
    out["loss"].backward()
    assert slots.weight.grad is not None and slots.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="image tokens"):
        slots(torch.zeros(1, model.encoder.num_tokens + 1, slots.weight.shape[1]))


def test_eager_attention_gives_the_sdpa_loss_and_an_exact_kv_cache(tiny_model_kwargs, watch_records):
    models = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        options = dict(tiny_model_kwargs["backbone"]["options"], attn_implementation=impl)
        models[impl] = UnifiedVLM(**dict(tiny_model_kwargs, backbone={"name": "qwen2", "options": options})).eval()
    batch = ConversationCollator.for_model(models["sdpa"])(watch_records[:6])
    with torch.no_grad():
        torch.testing.assert_close(models["eager"](batch)["loss"], models["sdpa"](batch)["loss"])
    eager = models["eager"]
    vqa = [r for r in watch_records if r["task"] == "vqa"][:2]
    gen = [r for r in watch_records if r["task"] == "generation"][:1]
    prompts, images = _prompts(eager, gen + vqa), [None] + [r["image"] for r in vqa]
    cached = eager.generate(prompts, images, max_new_tokens=5, image_policy="auto", use_cache=True)
    full = eager.generate(prompts, images, max_new_tokens=5, image_policy="auto", use_cache=False)
    assert [o.text_ids for o in cached] == [o.text_ids for o in full]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_runs_on_cuda(model, watch_records):
    """The sampling generator lives on the model's device (a CPU generator fails under CUDA)."""
    gen = [r for r in watch_records if r["task"] == "generation"][:2]
    model.to("cuda").eval()
    try:
        outs = model.generate(_prompts(model, gen), max_new_tokens=3, image_policy="force", temperature=1.0, image_temperature=1.0, seed=0)
        assert all(o.image_tokens is not None and len(o.image_tokens) == model.output_space.num_tokens for o in outs)
    finally:
        model.to("cpu")


@pytest.mark.parametrize("task", ["generation", "vqa"])
@pytest.mark.parametrize("parts", ["slot_vectors_trainable_encoder", "shared_projector"])
def test_one_task_batch_gives_every_trainable_parameter_a_gradient(tiny_model_kwargs, tiny_vq_dir, watch_records, task, parts):
    """Under DDP every trainable parameter needs a gradient at every step: the parts a one-task
    batch does not run (the other side's projector, slot vectors, encoder, or the head) get a
    zero one. Issue 18: und_token_embedding had none on generation batches."""
    if parts == "shared_projector":
        kwargs = dict(tiny_model_kwargs, encoder={"name": "vq_codes", "weights": tiny_vq_dir, "options": {}}, und_projector="linear")
    else:
        kwargs = dict(tiny_model_kwargs, und_token_embedding=True, encoder=dict(tiny_model_kwargs["encoder"], freeze=False),
                      image_output=dict(tiny_model_kwargs["image_output"], position_embedding="learned"))
    torch.manual_seed(0)
    model = UnifiedVLM(**kwargs).train()
    assert model.shares_projector == (parts == "shared_projector")
    batch = ConversationCollator.for_model(model)([r for r in watch_records if r["task"] == task][:2])
    out = model(batch)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient on a {task}-only batch for {missing}"
    assert (out["image_loss"] > 0) == (task == "generation")
