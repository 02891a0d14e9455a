"""The download-free byte-level BPE and the special-token helpers."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from unified_vlm import tokens
from unified_vlm.text_tokenizer import (
    SPECIAL_TOKEN_NAMES,
    add_special_tokens,
    load_text_tokenizer,
    special_token_ids,
    tokenizer_from_json,
    tokenizer_to_json,
    train_text_tokenizer,
)

CORPUS = [
    "<image>\nWhat time is displayed on the watch?",
    "07:13:07",
    "45%",
    "top-left",
    "bottom-right",
    "sunny",
    "Can you draw a smart watch, showing cloudy weather, with 80% battery.",
    "Sure, here is the image. \n<image>",
    "The image shows a smart watch, with the time 10:45:21, battery indicator at top-right.",
] * 4

SAMPLES = [
    "Hello\nWorld",
    "The watch shows 07:13:07 with 45% battery at bottom-left.\n\nDone.",
    "  leading spaces, trailing newline\n",
    "Unseen: Zürich ☀ 100%\ttab",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(CORPUS, vocab_size=400)


def test_is_a_fast_tokenizer_with_roles(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        tokens.BOS,
        tokens.EOS,
        tokens.PAD,
        tokens.UNK,
    )
    assert set(tokens.SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert len(tok) <= 400


@pytest.mark.parametrize("text", SAMPLES)
def test_lossless_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_no_automatic_bos_eos(tok):
    ids = tok("sunny")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids) == "sunny"


def test_special_tokens_are_single_ids(tok):
    ids = special_token_ids(tok)
    assert set(ids) == set(SPECIAL_TOKEN_NAMES)
    assert len(set(ids.values())) == len(tokens.SPECIAL_TOKENS)
    for name, token in SPECIAL_TOKEN_NAMES.items():
        assert tok.encode(token, add_special_tokens=False) == [ids[name]]
    assert tok.encode(f"a{tokens.END_TURN}b", add_special_tokens=False)[1] == ids["end_turn"]


def test_digits_are_single_tokens(tok):
    ids = tok.encode("07:13:07 45%", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[:8] == ["0", "7", ":", "1", "3", ":", "0", "7"]
    assert pieces[-3:] == ["4", "5", "%"]
    for d in "0123456789":
        assert len(tok.encode(d * 5, add_special_tokens=False)) == 5


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_text_tokenizer(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    for other in (loaded, auto):
        assert len(other) == len(tok)
        for text in SAMPLES:
            assert other.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert special_token_ids(loaded) == special_token_ids(tok)


def test_load_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer directory"):
        load_text_tokenizer(tmp_path / "nope")


def test_json_round_trip(tok):
    restored = tokenizer_from_json(tokenizer_to_json(tok))
    assert len(restored) == len(tok)
    assert restored.pad_token == tokens.PAD and restored.bos_token == tokens.BOS
    assert special_token_ids(restored) == special_token_ids(tok)
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False)
        assert restored.encode(text, add_special_tokens=False) == ids
        assert restored.decode(ids) == text


def _foreign_tokenizer() -> PreTrainedTokenizerFast:
    """A stand-in for a pretrained LLM tokenizer: its own bos/eos, no pad, none of our chat tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["<s>", "</s>"])
    backend.add_tokens(list(pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def test_special_token_ids_names_missing_token():
    with pytest.raises(ValueError, match="bos"):
        special_token_ids(_foreign_tokenizer())


def test_add_special_tokens_to_foreign_tokenizer():
    foreign = _foreign_tokenizer()
    before = len(foreign)
    added = add_special_tokens(foreign)
    assert added == len(tokens.SPECIAL_TOKENS) == len(foreign) - before
    assert foreign.bos_token == "<s>"  # a pretrained model's own BOS is kept
    assert foreign.pad_token == tokens.PAD
    ids = special_token_ids(foreign)
    assert foreign.encode(f"x{tokens.IMAGE_PAD}", add_special_tokens=False)[-1] == ids["image_pad"]
    assert foreign.decode([ids["user"], ids["end_turn"]], skip_special_tokens=True) == ""
    assert add_special_tokens(foreign) == 0  # idempotent
