"""The chat format: how LLaVA-schema conversations become token ids, for the model and the data alike.

Layout (ids only; special tokens are never produced by tokenising strings)::

    BOS
    USER "\\n" <human text, "<image>" -> IMAGE_START IMAGE_PAD*Nu IMAGE_END> END_TURN "\\n"
    ASSISTANT "\\n" <gpt text, "<image>" -> IMAGE_START GEN_PAD*Ng IMAGE_END> END_TURN "\\n"
    ...
    EOS

Only the assistant's content and its END_TURN carry text labels. In a generated image the
model must learn to open (IMAGE_START) and close (IMAGE_END) it; the GEN_PAD slots get their
targets (image codes/features) from the vision side inside the model, so their text labels are
ignored. Labels are aligned with input_ids; the model does the next-token shift.

A :class:`ChatFormat` is the text tokenizer plus the tokens per image. The model builds one (it
knows its encoder's and output space's token counts) and encodes prompts with it; the data side
batches records in the same object (``datamodules.collate.ConversationCollator``), so the two
never disagree. This module imports only ``tokens`` and ``text_tokenizer``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from unified_vlm.text_tokenizer import special_token_ids
from unified_vlm.tokens import END_TURN, EOS, IGNORE_INDEX, IMAGE_MARKER

HUMAN, GPT = "human", "gpt"


def image_to_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A (3,H,W) float tensor in [0,1]; the datasets yield PIL images, tests and callers may pass tensors."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    return image.float()


def check_prompt_dropout(value: float) -> float:
    """``image_output.prompt_dropout`` must be a probability below 1 (some prompts must stay)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"prompt_dropout must be in [0, 1), got {value}")
    return value


@dataclass
class ChatFormat:
    """Encodes records for training (``encode``) and prompts for inference (``encode_prompt``)."""

    tokenizer: PreTrainedTokenizerBase
    num_understanding_tokens: int
    num_generation_tokens: int
    max_length: int = 1024
    """Longest encoded record; a longer one is an error, never silently cut."""
    ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ids = special_token_ids(self.tokenizer)
        self._newline = self._text("\n")

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _turn(self, role: str, value: str) -> tuple[list[int], list[int]]:
        """Ids and labels of one turn, header and trailing newline included."""
        if role not in (HUMAN, GPT):
            raise ValueError(f"unknown conversation role {role!r}; expected 'human' or 'gpt'")
        ids_ = self.ids
        supervised = role == GPT
        header = [ids_["assistant" if supervised else "user"]] + self._newline
        ids, labels = list(header), [IGNORE_INDEX] * len(header)

        def put(new: list[int], learn: bool) -> None:
            ids.extend(new)
            labels.extend(new if learn else [IGNORE_INDEX] * len(new))

        for i, piece in enumerate(value.split(IMAGE_MARKER)):
            if i > 0:  # an image sits between two text pieces
                if supervised:
                    put([ids_["image_start"]], True)
                    put([ids_["gen_pad"]] * self.num_generation_tokens, False)
                    put([ids_["image_end"]], True)
                else:
                    image = [ids_["image_pad"]] * self.num_understanding_tokens
                    put([ids_["image_start"], *image, ids_["image_end"]], False)
            put(self._text(piece), supervised)
        put([ids_["end_turn"]], supervised)
        put(self._newline, False)
        return ids, labels

    def num_tokens(self, record: dict) -> int:
        """Tokens ``encode`` makes of ``record``, without its image (to check lengths when a file loads)."""
        return 2 + sum(len(self._turn(turn["from"], turn["value"])[0]) for turn in record["conversations"])

    def supervised_counts(self, record: dict) -> tuple[int, int, int]:
        """What the model's losses average over in ``record``, read from its text alone: supervised
        text tokens, assistant turns and generated-image slots (the data counts an optimiser step's
        worth ahead, ``TaskMixSampler``'s ``counter``)."""
        answers = [turn["value"] for turn in record["conversations"] if turn["from"] == GPT]
        tokens = sum(label != IGNORE_INDEX for value in answers for label in self._turn(GPT, value)[1])
        return tokens, len(answers), sum(value.count(IMAGE_MARKER) for value in answers) * self.num_generation_tokens

    def encode(self, record: dict) -> dict:
        """One record -> ``input_ids``, ``labels`` (LongTensor, same length) and its und/gen image."""
        rid = record.get("id", "?")
        ids, labels = [self.ids["bos"]], [IGNORE_INDEX]
        und_image = gen_image = None
        markers = 0
        for turn in record["conversations"]:
            n = turn["value"].count(IMAGE_MARKER)
            markers += n
            if n:
                if record.get("image") is None:
                    raise ValueError(f"record {rid}: conversation has {IMAGE_MARKER!r} but no 'image'")
                image = image_to_tensor(record["image"])
                if turn["from"] == HUMAN:
                    und_image = image
                else:
                    gen_image = image
            t_ids, t_labels = self._turn(turn["from"], turn["value"])
            ids += t_ids
            labels += t_labels
        if markers > 1:
            raise ValueError(f"record {rid}: {markers} {IMAGE_MARKER!r} markers, but a record holds one image")
        ids.append(self.ids["eos"])
        labels.append(IGNORE_INDEX)
        if len(ids) > self.max_length:
            raise ValueError(f"record {rid}: {len(ids)} tokens exceed max_length={self.max_length}")
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "und_image": und_image,
            "gen_image": gen_image,
        }

    def drop_prompt(self, record: dict) -> dict:
        """The record with every human turn emptied (image markers kept): the unconditional prompt."""
        def empty(turn: dict) -> dict:
            if turn["from"] != HUMAN:
                return turn
            return {**turn, "value": IMAGE_MARKER * turn["value"].count(IMAGE_MARKER)}

        return {**record, "conversations": [empty(t) for t in record["conversations"]]}

    def unconditional_prompt(self) -> list[int]:
        """The inference prompt a generation is guided away from (the prompt dropped in training)."""
        return self.encode_prompt([{"from": HUMAN, "value": ""}], 0)

    def encode_prompt(self, conversations: list[dict], upto_turn: int) -> list[int]:
        """Inference prompt ending in ``ASSISTANT "\\n"`` right after human turn number ``upto_turn``.

        Earlier turns (with their ground-truth answers) are the context, as in training, so
        every VQA turn can be scored; ``upto_turn=0`` is the paper's first-turn protocol.
        """
        ids = [self.ids["bos"]]
        human_seen = 0
        for turn in conversations:
            ids += self._turn(turn["from"], turn["value"])[0]
            if turn["from"] == HUMAN:
                if human_seen == upto_turn:
                    return ids + [self.ids["assistant"]] + self._newline
                human_seen += 1
        raise ValueError(f"upto_turn={upto_turn} but the conversation has only {human_seen} human turns")

    def decode_answer(self, ids) -> str:
        """Generated ids -> answer text (see :func:`decode_answer`)."""
        return decode_answer(self.tokenizer, ids)


def decode_answer(tokenizer: PreTrainedTokenizerBase, ids) -> str:
    """Generated ids -> answer text: cut at the first END_TURN or EOS, drop special tokens, strip."""
    ids = [int(i) for i in ids]
    stops = {i for i in tokenizer.convert_tokens_to_ids([END_TURN, EOS]) if i is not None}
    for k, i in enumerate(ids):
        if i in stops:
            ids = ids[:k]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
