"""The record-level tasks of a UnifiedVLM: answer a VQA record, caption an image, draw a prompt.

Each takes the model and LLaVA-schema records, encodes prompts in the model's chat format and
calls ``model.generate``. :func:`run_records` does all three for a test or predict batch: it is
what ``UnifiedVLM.test_step`` and ``predict_step`` return, once :func:`attach` has given it to the
model (the CLI's ``EvaluationReport`` and ``PredictionWriter`` callbacks do that at setup).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from unified_vlm.chat_format import decode_answer

CAPTION_TOKENS = 96  # test captions are 35 tokens of the watch BPE on average, 56 at most
CHUNK = 64  # prompts per generate call


def answer_vqa(model, records: list[dict]) -> list[dict]:
    """Answer every human turn of every VQA record (earlier turns' ground truth as context)."""
    jobs = []
    for rec in records:
        turns = rec["conversations"]
        for t in range(len(turns) // 2):
            jobs.append((rec, t, model.chat_format.encode_prompt(turns, t)))
    results = []
    for start in range(0, len(jobs), CHUNK):
        chunk = jobs[start:start + CHUNK]
        # cfg_scale 1: guidance is for text-to-image prompts; sampling.cfg_scale must not break answering
        outs = model.generate([p for _, _, p in chunk], [r["image"] for r, _, _ in chunk], image_policy="never", cfg_scale=1.0)
        for (rec, t, _), out in zip(chunk, outs):
            results.append(
                {
                    "record_id": rec["id"],
                    "turn": t,
                    "question": rec["conversations"][2 * t]["value"],
                    "ground_truth": rec["conversations"][2 * t + 1]["value"],
                    "answer": decode_answer(model.tokenizer, out.text_ids),
                }
            )
    return results


def write_captions(model, records: list[dict]) -> list[dict]:
    """Caption every caption record's image from its first human turn (greedy, no image output)."""
    results = []
    for start in range(0, len(records), CHUNK):
        chunk = records[start:start + CHUNK]
        prompts = [model.chat_format.encode_prompt(rec["conversations"], 0) for rec in chunk]
        outs = model.generate(prompts, [rec["image"] for rec in chunk], image_policy="never", max_new_tokens=CAPTION_TOKENS,
                              cfg_scale=1.0)  # guidance is for text-to-image prompts
        for rec, out in zip(chunk, outs):
            results.append({"record_id": rec["id"], "prompt": rec["conversations"][0]["value"],
                            "reference": rec["conversations"][1]["value"],
                            "caption": decode_answer(model.tokenizer, out.text_ids),
                            "attributes": rec.get("attributes")})
    return results


def generate_images(model, records: list[dict], **sampling: Any) -> list[Optional[torch.Tensor]]:
    """Generate one image per generation record from its first human turn; (3,H,W) in [0,1], or
    None where no complete image came out. ``sampling``: ``model.generate`` settings."""
    prompts = [model.chat_format.encode_prompt(rec["conversations"], 0) for rec in records]
    cfg_scale = sampling.get("cfg_scale", model.sampling_spec.cfg_scale)
    if cfg_scale != 1.0:
        sampling["uncond_prompts"] = [model.chat_format.unconditional_prompt()] * len(prompts)
    outs = model.generate(prompts, image_policy="force", **sampling)
    images: list[Optional[torch.Tensor]] = [None] * len(outs)
    done = [i for i, o in enumerate(outs) if o.image_tokens is not None and len(o.image_tokens) == model.output_space.num_tokens]
    if done:
        decoded = model.output_space.decode(torch.stack([outs[i].image_tokens for i in done]).to(model.device))
        for i, img in zip(done, decoded):
            images[i] = img.cpu()
    return images


def run_records(model, batch: list[dict]) -> dict:
    """A test or predict batch of records -> ``{"vqa": answers, "generation": images, "caption":
    captions}``, the items ``EvaluationReport`` scores and ``PredictionWriter`` writes."""
    vqa = [r for r in batch if r["task"] == "vqa"]
    gen = [r for r in batch if r["task"] == "generation"]
    captions = [r for r in batch if r["task"] == "caption"]
    out = {"vqa": answer_vqa(model, vqa) if vqa else [], "generation": [],
           "caption": write_captions(model, captions) if captions else []}
    if gen:
        for rec, img in zip(gen, generate_images(model, gen)):
            target = rec.get("image")
            out["generation"].append(
                {
                    "record_id": rec["id"],
                    "prompt": rec["conversations"][0]["value"],
                    "image": img,
                    "target": target.cpu() if target is not None else None,
                    "attributes": rec.get("attributes"),
                }
            )
    return out


def attach(model) -> None:
    """Give ``model`` (a UnifiedVLM) :func:`run_records` as its test/predict step, unless it has its own."""
    if getattr(model, "record_tasks", False) is None:
        model.record_tasks = run_records
