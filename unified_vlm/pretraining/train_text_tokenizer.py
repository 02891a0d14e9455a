"""Train the built-in text tokenizer: a byte-level BPE over every turn of the watch conversations."""
from __future__ import annotations

from unified_vlm.datamodules.streams import WatchStream
from unified_vlm.text_tokenizer import train_text_tokenizer

TOKENIZER_CORPUS_WATCHES = 4000


def watch_text_corpus(num_watches: int = TOKENIZER_CORPUS_WATCHES, seed: int = 0) -> list[str]:
    """Every conversation turn of ``num_watches`` generated training watches (all tasks)."""
    stream = WatchStream(split="train", num_watches=num_watches, seed=seed, image_size=32)
    return [turn["value"] for i in range(len(stream)) for turn in stream.record(i)["conversations"]]


def train_watch_tokenizer(num_watches: int = TOKENIZER_CORPUS_WATCHES, seed: int = 0):
    """The built-in tokenizer: trained on :func:`watch_text_corpus` (a few seconds)."""
    return train_text_tokenizer(watch_text_corpus(num_watches, seed))
