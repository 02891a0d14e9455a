"""Chat layout, label masks, padding and image stacking of the conversation collator."""
import pytest
import torch
from PIL import Image

from unified_vlm.datamodules.collate import ConversationCollator, decode_answer
from unified_vlm.text_tokenizer import special_token_ids, train_text_tokenizer
from unified_vlm.tokens import IGNORE_INDEX

NU, NG = 4, 6
H = W = 8


def vqa_record(rid="v0", value=0.1):
    return {
        "id": rid,
        "task": "vqa",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat time is it?"},
            {"from": "gpt", "value": "07:13:07"},
            {"from": "human", "value": "Where is the battery?"},
            {"from": "gpt", "value": "top-left"},
        ],
        "image": torch.full((3, H, W), value),
    }


def gen_record(rid="g0", value=0.2):
    return {
        "id": rid,
        "task": "generation",
        "conversations": [
            {"from": "human", "value": "Can you draw a smart watch, with 45% battery."},
            {"from": "gpt", "value": "Sure, here is the image. \n<image>"},
        ],
        "image": torch.full((3, H, W), value),
    }


def caption_record(rid="c0", value=0.3):
    return {
        "id": rid,
        "task": "caption",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the key elements of this watch."},
            {"from": "gpt", "value": "The image shows a smart watch, showing sunny weather."},
        ],
        "image": torch.full((3, H, W), value),
    }


@pytest.fixture(scope="module")
def tok():
    texts = [t["value"] for r in (vqa_record(), gen_record(), caption_record()) for t in r["conversations"]]
    return train_text_tokenizer(texts * 3, vocab_size=350)


@pytest.fixture(scope="module")
def sid(tok):
    return special_token_ids(tok)


@pytest.fixture()
def coll(tok):
    return ConversationCollator(tok, num_understanding_tokens=NU, num_generation_tokens=NG)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_vqa_two_turns_layout_and_labels(coll, tok, sid):
    out = coll.encode(vqa_record())
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    nl = enc(tok, "\n")
    image = [sid["image_start"]] + [sid["image_pad"]] * NU + [sid["image_end"]]
    a0, a1 = enc(tok, "07:13:07"), enc(tok, "top-left")
    expected = (
        [sid["bos"]]
        + [sid["user"]] + nl + image + enc(tok, "\nWhat time is it?") + [sid["end_turn"]] + nl
        + [sid["assistant"]] + nl + a0 + [sid["end_turn"]] + nl
        + [sid["user"]] + nl + enc(tok, "Where is the battery?") + [sid["end_turn"]] + nl
        + [sid["assistant"]] + nl + a1 + [sid["end_turn"]] + nl
        + [sid["eos"]]
    )  # fmt: skip
    assert ids == expected
    assert len(labels) == len(ids)
    supervised = [k for k, label in enumerate(labels) if label != IGNORE_INDEX]
    assert [labels[k] for k in supervised] == a0 + [sid["end_turn"]] + a1 + [sid["end_turn"]]
    # labels are not shifted: each supervised label equals the input id at its position
    assert all(labels[k] == ids[k] for k in supervised)
    # first answer starts right after the first ASSISTANT "\n" header
    first_answer = ids.index(sid["assistant"]) + 1 + len(nl)
    assert supervised[: len(a0) + 1] == list(range(first_answer, first_answer + len(a0) + 1))
    assert out["und_image"] is not None and out["gen_image"] is None


def test_generation_record_labels(coll, sid):
    out = coll.encode(gen_record())
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert ids.count(sid["gen_pad"]) == NG and ids.count(sid["image_pad"]) == 0
    start, end = ids.index(sid["image_start"]), ids.index(sid["image_end"])
    assert end - start == NG + 1
    assert labels[start] == sid["image_start"] and labels[end] == sid["image_end"]
    assert all(label == IGNORE_INDEX for label in labels[start + 1 : end])
    assert ids[end + 1] == sid["end_turn"] and labels[end + 1] == sid["end_turn"]
    # the human prompt is never supervised
    assert all(label == IGNORE_INDEX for label in labels[: ids.index(sid["assistant"])])
    assert out["gen_image"] is not None and out["und_image"] is None


def test_caption_record_labels(coll, tok, sid):
    out = coll.encode(caption_record())
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert ids.count(sid["image_pad"]) == NU
    supervised = [label for label in labels if label != IGNORE_INDEX]
    assert supervised == enc(tok, "The image shows a smart watch, showing sunny weather.") + [sid["end_turn"]]
    assert labels[-1] == IGNORE_INDEX and ids[-1] == sid["eos"] and ids[0] == sid["bos"]


def test_batch_padding_and_image_order(tok, sid):
    coll = ConversationCollator(tok, NU, NG, pad_to_multiple_of=8)
    records = [caption_record("c0", 0.3), gen_record("g0", 0.2), vqa_record("v0", 0.1), gen_record("g1", 0.4)]
    lengths = [len(coll.encode(r)["input_ids"]) for r in records]
    batch = coll(records)
    B, T = batch["input_ids"].shape
    assert B == 4 and T % 8 == 0 and max(lengths) <= T < max(lengths) + 8
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert (batch["input_ids"][i, n:] == sid["pad"]).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["input_ids"][i, :n].tolist() == coll.encode(records[i])["input_ids"].tolist()
    # understanding images: caption then vqa; generation targets: g0 then g1
    assert batch["und_pixel_values"].shape == (2, 3, H, W)
    assert batch["und_pixel_values"][:, 0, 0, 0].tolist() == pytest.approx([0.3, 0.1])
    assert batch["gen_pixel_values"][:, 0, 0, 0].tolist() == pytest.approx([0.2, 0.4])
    assert batch["tasks"] == ["caption", "generation", "vqa", "generation"]
    assert batch["ids"] == ["c0", "g0", "v0", "g1"]
    # one image slot block per image, in the same order as the pixel batches
    assert int((batch["input_ids"] == sid["image_pad"]).sum()) == 2 * NU
    assert int((batch["input_ids"] == sid["gen_pad"]).sum()) == 2 * NG


def test_batch_without_generation_has_no_gen_pixels(coll):
    batch = coll([vqa_record()])
    assert batch["gen_pixel_values"] is None
    assert batch["und_pixel_values"].shape == (1, 3, H, W)


def test_max_length_error_names_record(tok):
    coll = ConversationCollator(tok, NU, NG, max_length=10)
    with pytest.raises(ValueError, match=r"record v7: \d+ tokens exceed max_length=10"):
        coll([vqa_record("v7")])


def test_pil_images_become_unit_float_tensors(coll):
    record = caption_record("c1")
    record["image"] = Image.new("RGB", (W, H), (255, 0, 51))
    pixels = coll([record, vqa_record("v1", 0.5)])["und_pixel_values"]
    assert pixels.dtype == torch.float32 and pixels.shape == (2, 3, H, W)
    assert pixels[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert pixels[1, :, 0, 0].tolist() == pytest.approx([0.5, 0.5, 0.5])


def test_marker_without_image_is_an_error(coll):
    record = vqa_record("v9")
    del record["image"]
    with pytest.raises(ValueError, match="v9"):
        coll.encode(record)


def test_encode_prompt_turn0_and_turn1(coll, tok, sid):
    convs = vqa_record()["conversations"]
    nl = enc(tok, "\n")
    p0 = coll.encode_prompt(convs, 0)
    full = coll.encode(vqa_record())["input_ids"].tolist()
    # turn 0 prompt = training sequence up to and including the first ASSISTANT "\n"
    assert p0 == full[: len(p0)]
    assert p0[-1 - len(nl) :] == [sid["assistant"]] + nl
    assert p0.count(sid["image_pad"]) == NU
    assert p0.count(sid["assistant"]) == 1
    p1 = coll.encode_prompt(convs, 1)
    assert p1 == full[: len(p1)]
    assert p1[-1 - len(nl) :] == [sid["assistant"]] + nl
    assert p1.count(sid["assistant"]) == 2
    answer0 = enc(tok, "07:13:07")
    assert any(p1[k : k + len(answer0)] == answer0 for k in range(len(p1)))  # turn-0 GT is context
    assert decode_answer(tok, p1[len(p0) :]) == "07:13:07"
    with pytest.raises(ValueError, match="upto_turn=2"):
        coll.encode_prompt(convs, 2)


def test_generation_prompt_has_no_image_slots(coll, sid):
    prompt = coll.encode_prompt(gen_record()["conversations"], 0)
    assert sid["image_start"] not in prompt and sid["gen_pad"] not in prompt
    assert prompt[0] == sid["bos"]


def test_decode_answer_stops_at_end_turn(tok, sid):
    ids = enc(tok, " 07:13:07") + [sid["end_turn"]] + enc(tok, "sunny") + [sid["eos"]]
    assert decode_answer(tok, ids) == "07:13:07"
    assert decode_answer(tok, torch.tensor(enc(tok, "top-left") + [sid["eos"]] + enc(tok, "x"))) == "top-left"
    with_image = [sid["image_start"]] + [sid["gen_pad"]] * 3 + [sid["image_end"]] + enc(tok, "done")
    assert decode_answer(tok, with_image) == "done"
