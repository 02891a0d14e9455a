"""A tiny, download-free text tokenizer plus helpers that make any HF tokenizer chat-ready.

The CPU default model trains its own byte-level BPE on the dataset texts so tests and smoke
runs never touch the network. Pretrained LLM tokenizers (Llama, Qwen, ...) go through
:func:`add_special_tokens` instead, so every model shares the chat tokens of ``tokens.py``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from unified_vlm import tokens

# Role name (as used by the collator and model) -> token string from tokens.py.
SPECIAL_TOKEN_NAMES: dict[str, str] = {
    "bos": tokens.BOS,
    "eos": tokens.EOS,
    "pad": tokens.PAD,
    "unk": tokens.UNK,
    "user": tokens.USER,
    "assistant": tokens.ASSISTANT,
    "end_turn": tokens.END_TURN,
    "image_start": tokens.IMAGE_START,
    "image_end": tokens.IMAGE_END,
    "image_pad": tokens.IMAGE_PAD,
    "gen_pad": tokens.GEN_PAD,
}
_NAMED_ROLES = {"bos_token": tokens.BOS, "eos_token": tokens.EOS, "pad_token": tokens.PAD, "unk_token": tokens.UNK}
_EXTRA_SPECIAL = [t for t in tokens.SPECIAL_TOKENS if t not in _NAMED_ROLES.values()]


def _wrap(backend: Tokenizer, **special: object) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` so it gets the HF save/load/decode API.

    ``clean_up_tokenization_spaces`` stays off: it would rewrite " ." and break the lossless
    round trip that answers such as "07:13:07" rely on.
    """
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special)


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; digits are always single tokens.

    Byte level makes any text (newlines, unseen characters) round-trip exactly; splitting digits
    first means times and percentages are digit sequences the model can read and write one
    digit at a time. No BOS/EOS is inserted automatically: the collator owns the chat layout.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(tokens.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tok = _wrap(backend, **_NAMED_ROLES, extra_special_tokens=list(_EXTRA_SPECIAL))
    add_special_tokens(tok)  # no-op here, but marks every chat token special in the HF wrapper
    return tok


def add_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Make sure every ``tokens.SPECIAL_TOKENS`` entry is a special token; return how many were new.

    Existing bos/eos of a pretrained tokenizer are kept; only a missing pad token is set to
    ``tokens.PAD``. The caller resizes the model embeddings by the returned count.
    """
    before = len(tokenizer)
    special = set(tokenizer.all_special_tokens)
    missing = [t for t in _EXTRA_SPECIAL + list(_NAMED_ROLES.values()) if t not in special]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokens.PAD
    return len(tokenizer) - before


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Map each role name of :data:`SPECIAL_TOKEN_NAMES` to its id; fail loudly if one is missing."""
    vocab = tokenizer.get_vocab()
    out = {}
    for name, token in SPECIAL_TOKEN_NAMES.items():
        if token not in vocab:
            raise ValueError(f"special token {token!r} ({name}) is missing from the tokenizer; call add_special_tokens")
        out[name] = vocab[token]
    return out


def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with ``save_pretrained`` from a local directory (never downloads)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer directory at {path} (expected the output of save_pretrained)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_special_tokens(tok)
    special_token_ids(tok)
    return tok


def tokenizer_to_json(tok: PreTrainedTokenizerFast) -> str:
    """Serialise a fast tokenizer to one string so a checkpoint can carry it."""
    roles = {k: str(getattr(tok, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(tok, k)}
    return json.dumps(
        {
            "backend": tok.backend_tokenizer.to_str(),
            "roles": roles,
            "extra_special_tokens": [str(t) for t in tok.extra_special_tokens],
        }
    )


def tokenizer_from_json(s: str) -> PreTrainedTokenizerFast:
    """Inverse of :func:`tokenizer_to_json`."""
    data = json.loads(s)
    tok = _wrap(Tokenizer.from_str(data["backend"]), **data["roles"], extra_special_tokens=data["extra_special_tokens"])
    add_special_tokens(tok)
    return tok
