"""``image_output.position_embedding: learned``: one learned vector per generated image slot."""
from __future__ import annotations

import pytest
import torch

from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.models.unified import UnifiedVLM


@pytest.fixture(scope="module")
def model(tiny_model_kwargs):
    torch.manual_seed(0)
    kwargs = dict(tiny_model_kwargs, image_output=dict(tiny_model_kwargs["image_output"], position_embedding="learned"))
    return UnifiedVLM(**kwargs)


def test_unknown_position_embedding_fails_when_the_model_is_built(tiny_model_kwargs):
    kwargs = dict(tiny_model_kwargs, image_output=dict(tiny_model_kwargs["image_output"], position_embedding="rope3d"))
    with pytest.raises(ValueError, match="position_embedding"):
        UnifiedVLM(**kwargs)


def test_default_has_no_generation_slot_vectors(tiny_model_kwargs):
    assert UnifiedVLM(**tiny_model_kwargs).gen_token_embedding is None


def test_slot_vectors_do_not_depend_on_the_prompt(model):
    """Slot k's input is its code's projection plus vector k, whether all slots are embedded at
    once (training) or one token at a time at any slot (decoding), whatever precedes the image."""
    n = model.output_space.num_tokens
    codes = torch.randint(0, model.output_space.target_size, (3, n))
    with torch.no_grad():
        plain = model.gen_projector(model.output_space.input_features(codes))
        full = model.embed_generation_targets(codes)
        torch.testing.assert_close(full - plain, model.gen_token_embedding.weight.expand(3, -1, -1))
        for k in (0, 1, n - 1):
            one = model.embed_generation_targets(codes[:, k:k + 1], torch.full((3,), k))
            torch.testing.assert_close(one, full[:, k:k + 1])


def test_decoding_matches_teacher_forcing(model, watch_records):
    """Greedy image tokens drawn with the KV cache are the argmax of the teacher-forced
    predictions on those same tokens: the decoding loop gives every slot the vector training did."""
    model.eval()
    record = next(r for r in watch_records if r["task"] == "generation")
    prompt = model.chat_format.encode_prompt(record["conversations"], 0)
    out = model.generate([prompt], image_policy="force", image_temperature=0.0, max_new_tokens=4)[0]
    codes = out.image_tokens
    assert codes is not None and len(codes) == model.output_space.num_tokens
    ids = model.ids
    start = out.text_ids.index(ids["image_start"])
    sequence = prompt + out.text_ids[: start + 1] + [ids["gen_pad"]] * len(codes) + [ids["image_end"]]
    input_ids = torch.tensor([sequence])
    with torch.no_grad():
        embeds = model.embed_inputs(input_ids, None, codes[None])
        hidden = model.decoder(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids)).last_hidden_state
        slots = input_ids[:, 1:] == ids["gen_pad"]
        predicted = model.head(hidden[:, :-1][slots]).argmax(-1)
    assert torch.equal(predicted, codes)


def test_slot_vectors_learn_and_stay_in_the_graph_without_images(model, watch_records):
    model.train()
    gen = [r for r in watch_records if r["task"] == "generation"][:2]
    vqa = [r for r in watch_records if r["task"] == "vqa"][:2]
    for records, learns in ((gen, True), (vqa, False)):
        model.zero_grad()
        model(ConversationCollator.for_model(model)(records))["loss"].backward()
        grad = model.gen_token_embedding.weight.grad
        assert grad is not None  # DDP needs every trainable parameter in the graph
        assert bool(grad.abs().sum() > 0) == learns
    assert any(p is model.gen_token_embedding.weight for p in model.adapter_parameters())


def test_guidance_without_prompt_dropout_warns(tiny_model_kwargs, watch_records, caplog):
    """A guidance scale on a model that never saw the unconditional prompt warns at build and when drawing."""
    record = next(r for r in watch_records if r["task"] == "generation")
    with caplog.at_level("WARNING"):
        model = UnifiedVLM(**dict(tiny_model_kwargs, sampling={"cfg_scale": 3.0})).eval()
    assert "nothing to work with" in caplog.text
    caplog.clear()
    prompt = model.chat_format.encode_prompt(record["conversations"], 0)
    uncond = model.chat_format.unconditional_prompt()
    with caplog.at_level("WARNING"):
        model.generate([prompt], image_policy="force", uncond_prompts=[uncond], max_new_tokens=2)
    assert "guidance has nothing to work with" in caplog.text
    caplog.clear()
    trained = dict(tiny_model_kwargs["image_output"], prompt_dropout=0.1)
    with caplog.at_level("WARNING"):
        guided = UnifiedVLM(**dict(tiny_model_kwargs, image_output=trained, sampling={"cfg_scale": 3.0})).eval()
        guided.generate([prompt], image_policy="force", uncond_prompts=[uncond], max_new_tokens=2)
    assert "nothing to work with" not in caplog.text
