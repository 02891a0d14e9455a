"""Batches of LLaVA-schema conversation records for training and validation.

How one record becomes token ids and labels is the chat format (``unified_vlm.chat_format``,
re-exported here); this module pads the encoded records into a batch and applies the
training-only prompt dropout. A collator built with :meth:`ConversationCollator.for_model`
shares the model's chat format object, so the data and the model never disagree.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from unified_vlm.chat_format import GPT, HUMAN, ChatFormat, check_prompt_dropout, decode_answer, image_to_tensor
from unified_vlm.tokens import IGNORE_INDEX, IMAGE_MARKER

__all__ = ["GPT", "HUMAN", "ChatFormat", "ConversationCollator", "decode_answer", "image_to_tensor"]


class ConversationCollator:
    """Right-padded batches (``__call__``) of records encoded in a :class:`ChatFormat`.

    ``ConversationCollator(tokenizer, num_understanding_tokens, num_generation_tokens, max_length)``
    makes its own chat format (to use the data without a model); :meth:`for_model` shares a
    model's. ``encode``, ``encode_prompt``, ``drop_prompt``, ``unconditional_prompt`` and
    ``num_tokens`` are the chat format's.

    Args:
        pad_to_multiple_of: round every batch's length up to a multiple of this.
        prompt_dropout: in training batches, the probability that a record generating an image
            has its human text replaced by the empty (unconditional) prompt: what classifier-free
            guidance learns from.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_understanding_tokens: int,
        num_generation_tokens: int,
        max_length: int = 1024,
        pad_to_multiple_of: int | None = None,
        prompt_dropout: float = 0.0,
    ) -> None:
        self.prompt_dropout = check_prompt_dropout(prompt_dropout)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.chat_format = ChatFormat(tokenizer, num_understanding_tokens, num_generation_tokens, max_length)

    @classmethod
    def for_model(cls, model: Any, pad_to_multiple_of: int | None = None) -> "ConversationCollator":
        """The collator of a model with a ``chat_format`` (shared, not copied: a tokenizer the model
        takes from its checkpoint is the data's too) and a ``prompt_dropout`` (UnifiedVLM's
        ``image_output.prompt_dropout``)."""
        collator = cls.__new__(cls)
        collator.prompt_dropout = check_prompt_dropout(getattr(model, "prompt_dropout", 0.0))
        collator.pad_to_multiple_of = pad_to_multiple_of
        collator.chat_format = model.chat_format
        return collator

    # the chat format's, for callers that hold a collator
    tokenizer = property(lambda self: self.chat_format.tokenizer)
    ids = property(lambda self: self.chat_format.ids)
    max_length = property(lambda self: self.chat_format.max_length)
    num_understanding_tokens = property(lambda self: self.chat_format.num_understanding_tokens)
    num_generation_tokens = property(lambda self: self.chat_format.num_generation_tokens)

    def num_tokens(self, record: dict) -> int:
        return self.chat_format.num_tokens(record)

    def encode(self, record: dict) -> dict:
        return self.chat_format.encode(record)

    def encode_prompt(self, conversations: list[dict], upto_turn: int) -> list[int]:
        return self.chat_format.encode_prompt(conversations, upto_turn)

    def drop_prompt(self, record: dict) -> dict:
        return self.chat_format.drop_prompt(record)

    def unconditional_prompt(self) -> list[int]:
        return self.chat_format.unconditional_prompt()

    def __call__(self, records: list[dict], training: bool = False) -> dict:
        """Right-padded batch; images are stacked in batch order (None when no record has one).

        ``training``: apply ``prompt_dropout`` to records whose assistant turn holds an image
        (drawn from torch's global generator, which Lightning seeds per worker)."""
        if training and self.prompt_dropout > 0:
            records = [
                self.drop_prompt(r)
                if any(t["from"] == GPT and IMAGE_MARKER in t["value"] for t in r["conversations"])
                and float(torch.rand(())) < self.prompt_dropout
                else r
                for r in records
            ]
        encoded = [self.encode(r) for r in records]
        length = max(len(e["input_ids"]) for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.ids["pad"], dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[i, :n] = e["input_ids"]
            labels[i, :n] = e["labels"]
            attention_mask[i, :n] = 1

        def stack(key: str) -> torch.Tensor | None:
            images = [e[key] for e in encoded if e[key] is not None]
            return torch.stack(images) if images else None

        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "und_pixel_values": stack("und_image"),
            "gen_pixel_values": stack("gen_image"),
            "tasks": [r.get("task") for r in records],
            "ids": [str(r.get("id")) for r in records],
            "step_counts": records[0].get("step_counts"),  # set by the training sampler under accumulation
        }

