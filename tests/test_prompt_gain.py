"""The prompt-gain diagnostic: counterfactual prompts, per-token losses, and its zero case."""
from __future__ import annotations

import random

import pytest
import torch

from unified_vlm.datamodules import templates
from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.datamodules.watch import sample_watch
from unified_vlm.evaluation.captions import ATTRIBUTES, parse_text
from unified_vlm.evaluation.prompt_gain import counterfactual_prompt, image_token_losses, prompt_gain, with_prompt
from unified_vlm.models.unified import UnifiedVLM


def _full_prompt(index: int) -> str:
    attrs = sample_watch(0, "val", index)
    rng = random.Random(index)
    fields = {"time": attrs.time_str(), "weather": attrs.weather, "battery": attrs.battery,
              "weather_pos": attrs.weather_pos, "battery_pos": attrs.battery_pos}
    text = templates.GENERATION_REQUESTS[0]
    for _, phrasings in templates.CLAUSES.values():
        text += ", " + rng.choice(phrasings).format(**fields)
    return templates.postprocess(text)


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_counterfactual_changes_only_that_attribute(attribute):
    for index in range(20):
        prompt = _full_prompt(index)
        before = parse_text(prompt)
        after = parse_text(counterfactual_prompt(prompt, attribute, random.Random(index)))
        assert set(after.stated()) == set(ATTRIBUTES), prompt
        for a in ATTRIBUTES:
            assert (after.value(a) != before.value(a)) == (a == attribute), (a, prompt)


def test_counterfactual_of_an_unstated_attribute_is_none():
    assert counterfactual_prompt("Draw a smart watch, showing the time 10:08:30.", "weather", random.Random(0)) is None
    assert counterfactual_prompt("Draw a smart watch, showing the time 10:08:30.", "battery_pos", random.Random(0)) is None
    with pytest.raises(ValueError, match="unknown attribute"):
        counterfactual_prompt("x", "colour", random.Random(0))


@pytest.fixture(scope="module")
def model(tiny_model_kwargs):
    torch.manual_seed(0)
    return UnifiedVLM(**tiny_model_kwargs).eval()


def _generation(watch_records):
    return [r for r in watch_records if r["task"] == "generation"]


def test_per_token_losses_average_to_the_training_image_loss(model, watch_records):
    records = _generation(watch_records)
    losses = image_token_losses(model, records)
    assert losses.shape == (len(records), model.output_space.num_tokens)
    with torch.no_grad():
        expected = model(ConversationCollator.for_model(model)(records))["image_loss"]
    torch.testing.assert_close(losses.mean(), expected.float(), rtol=1e-5, atol=1e-5)


def test_prompt_gain_is_zero_when_the_image_loss_cannot_see_the_prompt(model, watch_records):
    records = [with_prompt(r, _full_prompt(i)) for i, r in enumerate(_generation(watch_records))]
    blind = UnifiedVLM(**model.hparams).eval()
    with torch.no_grad():
        blind.head.proj.weight.zero_()  # logits = bias: the same prediction whatever the prompt
    gain = prompt_gain(blind, records)
    assert gain["prompt_gain"] == 0.0
    for attribute in ATTRIBUTES:
        assert gain[f"prompt_gain/{attribute}"] == 0.0 and gain[f"count/{attribute}"] == len(records)
    assert gain["slot_loss"].shape == gain["slot_gain"].shape == (model.output_space.num_tokens,)


def test_prompt_gain_is_nonzero_for_a_model_that_reads_the_prompt(model, watch_records):
    records = [with_prompt(r, _full_prompt(i)) for i, r in enumerate(_generation(watch_records))]
    gain = prompt_gain(model, records)
    assert gain["prompt_gain"] != 0.0  # a random model's image tokens still attend to the prompt
    assert model.training is False


def test_prompt_gain_needs_two_records(model, watch_records):
    with pytest.raises(ValueError, match="at least 2"):
        prompt_gain(model, _generation(watch_records)[:1])
