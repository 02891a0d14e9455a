"""A ``predict`` prompt too long for ``model.max_length`` is refused naming its line (training
refuses such a record too), instead of being generated from without a word."""
from __future__ import annotations

import pytest

from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.datamodules.records import RecordError
from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
from unified_vlm.text_tokenizer import train_text_tokenizer

SHORT = "Draw a smart watch showing 10:08:30."


@pytest.fixture(scope="module")
def collator():
    tokenizer = train_text_tokenizer([SHORT, "Please show a smart watch, with 80% battery."] * 3, vocab_size=300)
    return ConversationCollator(tokenizer, num_understanding_tokens=4, num_generation_tokens=16, max_length=64)


def datamodule(tmp_path, collator, lines: list[str]) -> UnifiedDataModule:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    return UnifiedDataModule(predict_prompts=str(prompts), num_test_watches=1, image_size=16, num_workers=0, collator=collator)


def test_a_prompt_longer_than_max_length_is_refused_naming_its_line(tmp_path, collator):
    long = " ".join(["Draw a smart watch showing 10:08:30, with 80% battery."] * 12)
    dm = datamodule(tmp_path, collator, ["# prompts", SHORT, "", long])
    with pytest.raises(RecordError, match=rf"1 prompt\(s\) do not fit max_length=64 \(model.max_length\): "
                                          rf"{tmp_path / 'prompts.txt'}: line 4: \d+ prompt tokens \+ 18 for the image"):
        dm.setup("predict")


def test_prompts_that_fit_are_accepted(tmp_path, collator):
    dm = datamodule(tmp_path, collator, [SHORT, "Please show a smart watch, with 80% battery."])
    dm.setup("predict")
    assert len(dm.datasets["predict"]) == 2
