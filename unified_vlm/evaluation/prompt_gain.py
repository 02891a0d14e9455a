"""Does the image loss listen to the prompt? The prompt gain of a generating model.

Faithfulness (``evaluation.generation``) says whether a drawn watch shows what its prompt asked;
it stays at chance until the model has learned the whole path from a prompt word to the pixels.
The prompt gain tells earlier whether a recipe is on its way: the teacher-forced image-token loss
of each watch under **another** prompt minus its loss under its **own** prompt, per image token.

- ``prompt_gain``: each watch's prompt swapped for the next watch's (a derangement of the
  validation prompts). Zero: the model ignores the prompt; positive: the image tokens it expects
  depend on what the prompt says.
- ``prompt_gain/<attribute>``: each watch whose prompt states the attribute, with only that value
  changed (another weather word, another corner for the same item, the battery 50 points off,
  the time shifted by 6 h 30 min 30 s) and everything else in the prompt kept: how much the
  model uses that one attribute.
- ``slot_loss`` / ``slot_gain``: the same per image slot (row-major over the token grid), where
  in the picture the loss sits and where the prompt explains some of it (face colour, which no
  prompt states, against hands and icons).

Losses are in the head's own unit (cross-entropy in nats for VQ codes, the regression loss for
features), averaged over image tokens.
"""
from __future__ import annotations

import random
from typing import Any, Optional, Sequence

import torch

from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.datamodules.watch import CORNERS, WEATHERS
from unified_vlm.evaluation.captions import _BATTERY_RE, _CORNER_RE, _SUBJECT_RE, _TIME_RE, _WEATHER_RE, ATTRIBUTES


def counterfactual_prompt(prompt: str, attribute: str, rng: random.Random) -> Optional[str]:
    """``prompt`` with the value of ``attribute`` changed and nothing else; None if it is not stated."""
    if attribute == "time":
        match = _TIME_RE.search(prompt)
        if match is None:
            return None
        h, m, s = (int(g) for g in match.groups())
        new = f"{(h + 5) % 12 + 1:02d}:{(m + 30) % 60:02d}:{(s + 30) % 60:02d}"  # 6 h later on a 1..12 dial
        return prompt[: match.start()] + new + prompt[match.end():]
    if attribute == "weather":
        match = _WEATHER_RE.search(prompt)
        if match is None:
            return None
        new = rng.choice([w for w in WEATHERS if w != match.group(1)])
        return prompt[: match.start()] + new + prompt[match.end():]
    if attribute == "battery":
        match = _BATTERY_RE.search(prompt)
        if match is None:
            return None
        return prompt[: match.start(1)] + str((int(match.group(1)) + 50) % 100) + prompt[match.end(1):]
    if attribute in ("weather_pos", "battery_pos"):
        subject = attribute.split("_")[0]
        clauses = prompt.split(",")
        for k, clause in enumerate(clauses):
            corner = _CORNER_RE.search(clause)
            subjects = [m.group(1) for m in _SUBJECT_RE.finditer(clause)]
            if corner is None or subjects != [subject]:
                continue
            old = f"{corner.group(1)}-{corner.group(2)}"
            new = rng.choice([c for c in CORNERS if c != old])
            clauses[k] = clause[: corner.start()] + new + clause[corner.end():]
            return ",".join(clauses)
        return None
    raise ValueError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")


def with_prompt(record: dict, prompt: str) -> dict:
    """A generation record with its first human turn replaced by ``prompt``."""
    turns = [dict(t) for t in record["conversations"]]
    first = next(i for i, t in enumerate(turns) if t["from"] == "human")
    turns[first]["value"] = prompt
    return {**record, "conversations": turns}


def first_prompt(record: dict) -> str:
    return next(t["value"] for t in record["conversations"] if t["from"] == "human")


@torch.no_grad()
def image_token_losses(model: Any, records: Sequence[dict], batch_size: int = 64) -> torch.Tensor:
    """Teacher-forced loss of every image token of every generation record: (N, T) float32.

    The hidden state before each generation slot predicts that slot's token, exactly as in
    training (``UnifiedVLM.forward``), with the loss unreduced."""
    rows, collate = [], ConversationCollator.for_model(model)
    for start in range(0, len(records), batch_size):
        batch = collate(list(records[start:start + batch_size]))
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        input_ids, gen_pixels = batch["input_ids"], batch["gen_pixel_values"]
        if gen_pixels is None:
            raise ValueError("image_token_losses needs generation records (an image in the assistant turn)")
        targets = model.output_space.targets(gen_pixels)
        embeds = model.embed_inputs(input_ids, batch.get("und_pixel_values"), targets)
        hidden = model.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        slot_mask = input_ids[:, 1:] == model.ids["gen_pad"]
        prediction = model.head(hidden[:, :-1][slot_mask])
        loss = model.head.loss(prediction, targets.reshape(prediction.shape[0], *targets.shape[2:]), reduction="none")
        rows.append(loss.float().view(len(input_ids), -1).cpu())
    return torch.cat(rows)


@torch.no_grad()
def prompt_gain(model: Any, records: Sequence[dict], seed: int = 0, batch_size: int = 64) -> dict:
    """The prompt gain of ``model`` on generation ``records`` (module docstring); needs >= 2 records.

    Returns ``image_loss`` (own prompts), ``prompt_gain``, ``prompt_gain/<attribute>`` for each
    attribute some prompt states (with ``count/<attribute>``), and the per-slot tensors
    ``slot_loss`` and ``slot_gain`` (T,)."""
    records = list(records)
    if len(records) < 2:
        raise ValueError(f"prompt_gain needs at least 2 generation records to swap prompts, got {len(records)}")
    was_training = model.training
    model.eval()
    try:
        own = image_token_losses(model, records, batch_size)
        prompts = [first_prompt(r) for r in records]
        swapped = [with_prompt(r, prompts[(i + 1) % len(records)]) for i, r in enumerate(records)]
        other = image_token_losses(model, swapped, batch_size)
        out: dict = {"image_loss": float(own.mean()), "prompt_gain": float((other - own).mean()),
                     "slot_loss": own.mean(0), "slot_gain": (other - own).mean(0)}
        rng = random.Random(seed)
        for attribute in ATTRIBUTES:
            changed = [(i, counterfactual_prompt(p, attribute, rng)) for i, p in enumerate(prompts)]
            changed = [(i, p) for i, p in changed if p is not None]
            if not changed:
                continue
            index = torch.tensor([i for i, _ in changed])
            counter = image_token_losses(model, [with_prompt(records[i], p) for i, p in changed], batch_size)
            out[f"prompt_gain/{attribute}"] = float((counter - own[index]).mean())
            out[f"count/{attribute}"] = len(changed)
        return out
    finally:
        model.train(was_training)
