"""How many steps a fresh model of a config needs to answer "where is the X?" questions.

    python benchmarks/position_binding.py --questions position --steps 1500
    python benchmarks/position_binding.py --questions all-first-turn --steps 2000

Position answers depend on the *product* of question and image: both corner questions share the
answer words, so the question must pick whose corner is read. A from-scratch language model finds
that late. This script measures when, on chosen question mixes, outside the full job: it builds the
config's ``model`` section, trains it with AdamW (the config's learning rates, linear warmup, then
constant) on streamed watch records, and every ``--every`` steps prints the teacher-forced
exact-match accuracy of the first-turn position answers of ``--val-watches`` validation watches
(every answer token right). Prints numbers; asserts nothing.

Question mixes (``--questions``):
  position        one turn, a battery- or weather-position question (each half the time)
  position-turns  1 to 4 turns, every one a position question
  all-first-turn  the first turn of the paper's VQA records: the five question kinds, 1/5 each
  all             the paper's VQA records (1 to 4 turns of any kind)
"""
from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import yaml

from unified_vlm.datamodules import templates
from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.datamodules.watch import render_watch, sample_watch
from unified_vlm.models.unified import UnifiedVLM
from unified_vlm.tokens import IGNORE_INDEX, IMAGE_MARKER

MIXES = ("position", "position-turns", "all-first-turn", "all")
CORNER_QUESTIONS = ("battery_pos", "weather_pos")


def conversation(mix: str, attrs, rng: random.Random) -> list[dict]:
    """One VQA conversation of the chosen mix, with the paper's question templates and answers."""
    if mix in ("all", "all-first-turn"):
        turns = templates.vqa_conversation(attrs, rng)
        return turns[:2] if mix == "all-first-turn" else turns
    turns: list[dict] = []
    for t in range(1 if mix == "position" else rng.randint(1, 4)):
        which = rng.choice(CORNER_QUESTIONS)
        question = rng.choice(templates.QUESTIONS[which])
        turns.append({"from": "human", "value": f"{IMAGE_MARKER}\n{question}" if t == 0 else question})
        turns.append({"from": "gpt", "value": templates.answer(attrs, which)})
    return turns


def record(mix: str, split: str, index: int, rng: random.Random, size: int, seed: int) -> dict:
    attrs = sample_watch(seed, split, index)
    return {"task": "vqa", "conversations": conversation(mix, attrs, rng), "image": render_watch(attrs, size)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_siglip_vq.yaml")
    p.add_argument("--questions", choices=MIXES, default="position")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="backbone learning rate (default: the config's)")
    p.add_argument("--projector-lr", type=float, default=None, help="projector/head learning rate (default: the config's)")
    p.add_argument("--adam-beta2", type=float, default=None, help="AdamW beta2 (default: the config's)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--train-watches", type=int, default=1_000_000,
                   help="training records come from watches 0..N-1 of the train split, drawn at random")
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--val-watches", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                   help="override a model option, e.g. backbone.options.num_heads=8 (repeatable)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with open(args.config) as f:
        config = yaml.safe_load(f)
    model_cfg, data_cfg = config["model"], config.get("data", {})
    for item in args.set:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        target = model_cfg
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = yaml.safe_load(value)
    model = UnifiedVLM(**model_cfg)
    model.train()
    size, data_seed = data_cfg.get("image_size", 64), data_cfg.get("seed", 0)
    optim = model.optim_spec
    lr = optim.lr if args.lr is None else args.lr
    projector_lr = optim.projector_lr if args.projector_lr is None else args.projector_lr

    # Validation: the first turn of each record, kept when it asks for a corner.
    val = []
    for i in range(args.val_watches):
        rec = record(args.questions, "val", i, random.Random(i), size, data_seed)
        rec["conversations"] = rec["conversations"][:2]
        if "-" in rec["conversations"][1]["value"]:
            val.append(rec)
    collate = ConversationCollator.for_model(model)
    val_batches = [collate(val[i : i + 64]) for i in range(0, len(val), 64)]

    adapters = {id(q) for q in model.adapter_parameters()}
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [q for q in trainable if id(q) not in adapters], "lr": lr, "weight_decay": optim.weight_decay},
        {"params": [q for q in trainable if id(q) in adapters], "lr": projector_lr, "weight_decay": 0.0},
    ], betas=(optim.betas[0], optim.betas[1] if args.adam_beta2 is None else args.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def accuracy() -> float:
        model.eval()
        right = 0
        with torch.no_grad(), autocast:
            for batch in val_batches:
                embeds = model.embed_inputs(batch["input_ids"], batch.get("und_pixel_values"))
                hidden = model.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
                predicted = model.lm.lm_head(hidden[:, :-1]).argmax(-1)
                target = batch["labels"][:, 1:]
                right += int(((predicted == target) | (target == IGNORE_INDEX)).all(1).sum())
        model.train()
        return right / max(1, len(val))

    print(f"{args.questions}: {len(val)} validation position questions, batch {args.batch_size}, "
          f"lr {lr:g} / {projector_lr:g}", flush=True)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = collate(
            [record(args.questions, "train", rng.randrange(args.train_watches), rng, size, data_seed) for _ in range(args.batch_size)],
            training=True,
        )
        with autocast:
            loss = model(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % args.every == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}  position exact match {accuracy():.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
