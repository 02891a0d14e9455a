"""``data.curriculum``: the first steps train on easier records of the same watches, then the mix."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from unified_vlm.datamodules import templates
from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.datamodules.curriculum import Curriculum, CurriculumError
from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
from unified_vlm.datamodules.watch import sample_watch
from unified_vlm.evaluation.captions import parse_text

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@pytest.fixture(scope="module")
def collator():
    from unified_vlm.models.builders import build_text_tokenizer

    return ConversationCollator(build_text_tokenizer("builtin"), num_understanding_tokens=4, num_generation_tokens=16)


def make(collator, **kwargs):
    defaults = dict(image_size=16, num_train_watches=40, num_val_watches=2, num_test_watches=3, global_batch_size=4,
                    num_workers=0, group_by_task=True)
    defaults.update(kwargs)
    dm = UnifiedDataModule(collator=collator, **defaults)
    dm.setup("fit")
    return dm


def records_in_order(dm) -> list[dict]:
    dataset = dm.datasets["train"].records
    return [dataset.record(i) for i in dm._sampler(dm.datasets["train"])]


def test_all_prompts_state_every_attribute_and_position_questions_ask_only_corners():
    attrs = sample_watch(0, "train", 3)
    for seed in range(20):
        prompt = templates.generation_conversation(attrs, random.Random(seed), prompts="all")[0]["value"]
        stated = parse_text(prompt)
        assert {k: stated.value(k) for k in ("time", "weather", "battery", "weather_pos", "battery_pos")} == {
            "time": attrs.time_str(), "weather": attrs.weather, "battery": attrs.battery,
            "weather_pos": attrs.weather_pos, "battery_pos": attrs.battery_pos}, prompt
        answers = [t["value"] for t in templates.vqa_conversation(attrs, random.Random(seed), questions="position")[1::2]]
        assert answers and set(answers) <= {attrs.weather_pos, attrs.battery_pos}


def test_the_paper_draw_is_unchanged_by_the_new_options():
    attrs = sample_watch(0, "train", 5)
    for seed in range(10):
        assert templates.vqa_conversation(attrs, random.Random(seed)) == templates.vqa_conversation(attrs, random.Random(seed), questions="paper")
        assert templates.generation_conversation(attrs, random.Random(seed)) == templates.generation_conversation(
            attrs, random.Random(seed), prompts="paper")


def test_the_first_steps_come_from_the_curriculum_then_the_mix_with_the_epoch_length_kept(collator):
    plain = make(collator)
    dm = make(collator, curriculum={"steps": 5, "proportions": {"vqa": 1.0, "generation": 1.0}})
    order, reference = records_in_order(dm), records_in_order(plain)
    assert len(order) == len(reference) == 40 * 3
    head, tail = order[:20], order[20:]
    assert {r["task"] for r in head} <= {"vqa", "generation"}
    for r in head:
        if r["task"] == "vqa":
            assert all(t["value"] in CORNERS for t in r["conversations"][1::2]), r
        else:  # every attribute stated: the battery level is always in the prompt
            assert re.search(r"\d+%", r["conversations"][0]["value"]), r
    assert tail == reference[20:]  # after the stage, exactly the order without a curriculum
    assert all(re.fullmatch(r"train-\d+-(vqa|generation|caption)", r["id"]) for r in order)


def test_only_epoch_zero_starts_with_the_curriculum(collator):
    dm = make(collator, curriculum={"steps": 3})
    sampler = dm._sampler(dm.datasets["train"])
    main = len(dm.datasets["train"].records.first)
    assert all(i >= main for i in list(sampler)[:12]) and all(i < main for i in list(sampler)[12:])
    sampler.set_epoch(1)
    assert all(i < main for i in sampler)


def test_batches_of_the_curriculum_hold_one_task(collator):
    dm = make(collator, curriculum={"steps": 6})
    batches = [batch["tasks"] for batch, _ in zip(dm.train_dataloader(), range(6))]
    assert all(len(set(tasks)) == 1 for tasks in batches)
    assert Counter(t for tasks in batches for t in tasks).keys() <= {"vqa", "generation", "caption"}


def test_bad_curricula_are_refused_naming_the_key(collator, tmp_path):
    with pytest.raises(CurriculumError, match="data.curriculum: unknown key"):
        UnifiedDataModule(collator=collator, curriculum={"step": 5})
    with pytest.raises(CurriculumError, match="data.curriculum.prompts"):
        Curriculum(steps=3, prompts="some")
    with pytest.raises(CurriculumError, match="data.curriculum.steps"):
        Curriculum(steps=-1)
    with pytest.raises(CurriculumError, match="weighs only task.*excludes"):
        UnifiedDataModule(collator=collator, mode="understanding", curriculum={"steps": 2, "proportions": {"generation": 1.0}})
    with pytest.raises(CurriculumError, match="train_records"):
        UnifiedDataModule(collator=collator, curriculum={"steps": 2}, train_records=str(tmp_path / "records.json"))
    dm = make(collator, curriculum={"steps": 100})
    with pytest.raises(CurriculumError, match="more than the first epoch"):
        dm._sampler(dm.datasets["train"])


def test_no_curriculum_is_the_default_and_stays_out_of_the_hyper_parameters(collator):
    dm = make(collator)
    assert dm.curriculum == Curriculum() and dm.hparams.curriculum is None
    assert make(collator, curriculum={"steps": 2}).hparams.curriculum["steps"] == 2


def test_a_task_specific_run_of_the_shared_config_warms_up_on_its_own_tasks(collator):
    """The shipped curriculum weighs vqa and generation; an understanding-only run keeps the vqa part."""
    dm = make(collator, mode="understanding", curriculum={"steps": 4, "proportions": {"vqa": 0.5, "generation": 0.5}})
    head = records_in_order(dm)[:16]
    assert {r["task"] for r in head} == {"vqa"}
    assert all(t["value"] in CORNERS for r in head for t in r["conversations"][1::2])
