"""How many steps a fresh model of a config needs to draw what its prompt asks, per attribute.

    python benchmarks/generation_binding.py --attributes weather_pos --steps 600
    python benchmarks/generation_binding.py --attributes paper --steps 1500 \
        --set image_output.position_embedding=learned --set image_output.prompt_dropout=0.1 --cfg 1,3

The counterpart of ``position_binding.py`` for the generation direction. It builds the config's
``model`` section, trains it with AdamW (the config's learning rates, linear warmup, then
constant or cosine) on streamed generation records whose prompts state the chosen attributes,
and every ``--every`` steps prints, on ``--val-watches`` validation watches:

- the **prompt gain** (``unified_vlm.evaluation.prompt_gain``): teacher-forced image loss under
  another watch's prompt minus under its own, in total and per stated attribute; zero means the
  image loss ignores the prompt. It moves long before faithfulness does.
- **faithfulness** per stated attribute of watches drawn from the validation prompts and read by
  the watch reader (``unified_vlm.evaluation.generation``), at each ``--cfg`` guidance scale,
  and the share read as watches.

``--vqa-share F`` mixes that share of VQA batches into the training (one-task batches as in the
main job; ``--vqa-questions`` picks their mix, as ``benchmarks/position_binding.py``'s
``--questions``), and then every evaluation also prints the teacher-forced exact match of one-turn
answers of the validation watches per question kind.

A curriculum: ``--curriculum-steps K`` trains the first K steps on ``--curriculum-attributes``
prompts and ``--curriculum-questions`` VQA (defaults: all attributes stated, position questions
only), with ``--curriculum-vqa-share`` of VQA batches, then switches to the options above.

``--out DIR`` writes the curves (``curves.jsonl``) and, at the end, the per-slot loss and
prompt-gain maps (``slot_maps.png``): where in the token grid the image loss sits and where the
prompt explains part of it. Prints numbers; asserts nothing.

Prompt sets (``--attributes``): ``paper`` (time always, each other attribute with probability
1/2, the paper's builder), ``all`` (all five stated), or a comma list of attributes stated in
every prompt (``weather_pos``; ``weather``; ``time``; ``weather,weather_pos``), nothing else.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import yaml

from unified_vlm.datamodules import templates
from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.datamodules.watch import render_watch, sample_watch
from unified_vlm.evaluation.captions import ATTRIBUTES
from unified_vlm.evaluation.generation import score_generation
from unified_vlm.evaluation.prompt_gain import prompt_gain
from unified_vlm.evaluation.reader import load_reader
from unified_vlm.evaluation.record_tasks import generate_images
from unified_vlm.models.unified import UnifiedVLM
from unified_vlm.tokens import IGNORE_INDEX, IMAGE_MARKER

sys.path.insert(0, str(Path(__file__).resolve().parent))
from position_binding import MIXES, conversation  # noqa: E402  (the question mixes of the position study)


def parse_attributes(text: str) -> tuple[str, ...] | str:
    if text in ("paper", "all"):
        return text
    chosen = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in chosen if a not in ATTRIBUTES]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"--attributes: unknown {unknown or text!r}; use paper, all or a comma list of {ATTRIBUTES}")
    return chosen


def generation_prompt(attrs, chosen, rng: random.Random) -> str:
    """A generation request stating the chosen attributes (the paper's clause phrasings)."""
    if chosen in ("paper", "all"):
        return templates.generation_conversation(attrs, rng, prompts=chosen)[0]["value"]
    fields = {"time": attrs.time_str(), "weather": attrs.weather, "battery": attrs.battery,
              "weather_pos": attrs.weather_pos, "battery_pos": attrs.battery_pos}
    text = rng.choice(templates.GENERATION_REQUESTS)
    for attribute, (_, phrasings) in templates.CLAUSES.items():
        if attribute in chosen:
            text += ", " + rng.choice(phrasings).format(**fields)
    return templates.postprocess(text)


def generation_record(chosen, split: str, index: int, rng: random.Random, size: int, seed: int) -> dict:
    attrs = sample_watch(seed, split, index)
    turns = [{"from": "human", "value": generation_prompt(attrs, chosen, rng)},
             {"from": "gpt", "value": rng.choice(templates.GENERATION_ACKNOWLEDGEMENTS)}]
    return {"id": f"{split}-{index}-generation", "task": "generation", "conversations": turns,
            "image": render_watch(attrs, size), "attributes": attrs.to_dict()}


def vqa_record(mix: str, split: str, index: int, rng: random.Random, size: int, seed: int) -> dict:
    attrs = sample_watch(seed, split, index)
    return {"task": "vqa", "conversations": conversation(mix, attrs, rng), "image": render_watch(attrs, size)}


def vqa_probe_records(count: int, size: int, seed: int) -> dict[str, list[dict]]:
    """One single-turn question of each kind per validation watch, with the paper's templates."""
    probes: dict[str, list[dict]] = {kind: [] for kind in templates.QUESTIONS}
    for i in range(count):
        attrs, rng = sample_watch(seed, "val", i), random.Random(i)
        image = render_watch(attrs, size)
        for kind, questions in templates.QUESTIONS.items():
            turns = [{"from": "human", "value": f"{IMAGE_MARKER}\n{rng.choice(questions)}"},
                     {"from": "gpt", "value": templates.answer(attrs, kind)}]
            probes[kind].append({"task": "vqa", "conversations": turns, "image": image})
    return probes


def exact_match(model, batches: list[dict]) -> float:
    """Share of answers whose every token is the argmax under teacher forcing."""
    right = total = 0
    for batch in batches:
        embeds = model.embed_inputs(batch["input_ids"], batch.get("und_pixel_values"))
        hidden = model.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        predicted = model.lm.lm_head(hidden[:, :-1]).argmax(-1)
        target = batch["labels"][:, 1:]
        right += int(((predicted == target) | (target == IGNORE_INDEX)).all(1).sum())
        total += len(target)
    return right / max(1, total)


def apply_overrides(model_cfg: dict, items: list[str]) -> None:
    for item in items:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        target = model_cfg
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = yaml.safe_load(value)


def save_slot_maps(gain: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss, slot_gain = gain["slot_loss"], gain["slot_gain"]
    side = int(round(math.sqrt(len(loss))))
    if side * side != len(loss):
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, values, title in ((axes[0], loss, "image loss per slot (own prompt)"),
                              (axes[1], slot_gain, "prompt gain per slot")):
        im = ax.imshow(values.view(side, side).numpy(), cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_siglip_vq.yaml")
    p.add_argument("--attributes", type=parse_attributes, default="paper")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vqa-share", type=float, default=0.0, help="share of batches that are VQA batches")
    p.add_argument("--vqa-questions", choices=MIXES, default="all", help="the VQA batches' question mix")
    p.add_argument("--curriculum-steps", type=int, default=0, help="first K steps on the curriculum's data")
    p.add_argument("--curriculum-attributes", type=parse_attributes, default="all")
    p.add_argument("--curriculum-questions", choices=MIXES, default="position")
    p.add_argument("--curriculum-vqa-share", type=float, default=None, help="default: --vqa-share")
    p.add_argument("--lr", type=float, default=None, help="backbone learning rate (default: the config's)")
    p.add_argument("--projector-lr", type=float, default=None, help="projector/head learning rate (default: the config's)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="after warmup: constant, or cosine to a tenth of the peak at --steps")
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--val-watches", type=int, default=64)
    p.add_argument("--cfg", default="1", help="comma list of guidance scales to draw with (1 = none)")
    p.add_argument("--temperatures", default=None,
                   help="comma list of image sampling temperatures to draw with, each at every --cfg scale (default: the config's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for curves.jsonl and slot_maps.png")
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                   help="override a model option, e.g. image_output.position_embedding=learned (repeatable)")
    args = p.parse_args()
    if args.curriculum_vqa_share is None:
        args.curriculum_vqa_share = args.vqa_share
    for name in ("vqa_share", "curriculum_vqa_share"):
        if not 0.0 <= getattr(args, name) < 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    try:
        scales = [float(s) for s in args.cfg.split(",")]
        temperatures = [None] if args.temperatures is None else [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        p.error(f"--cfg and --temperatures must be comma lists of numbers, got {args.cfg!r}, {args.temperatures!r}")
    draws = {(f"cfg{scale:g}" + ("" if t is None else f"_t{t:g}")): (scale, t) for scale in scales for t in temperatures}
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with open(args.config) as f:
        config = yaml.safe_load(f)
    model_cfg, data_cfg = config["model"], config.get("data", {})
    apply_overrides(model_cfg, args.set)
    model = UnifiedVLM(**model_cfg)
    model.train()
    collate = ConversationCollator.for_model(model)
    if any(s != 1.0 for s in scales) and model.prompt_dropout == 0:
        print("warning: guidance scales other than 1 with image_output.prompt_dropout 0: the model never saw the "
              "unconditional prompt, so guidance has nothing to work with", file=sys.stderr)
    reader = load_reader("builtin")
    size, data_seed = data_cfg.get("image_size", 64), data_cfg.get("seed", 0)
    optim = model.optim_spec
    lr = optim.lr if args.lr is None else args.lr
    projector_lr = optim.projector_lr if args.projector_lr is None else args.projector_lr
    val = [generation_record(args.attributes, "val", i, random.Random(i), size, data_seed) for i in range(args.val_watches)]
    probing_vqa = args.vqa_share > 0 or (args.curriculum_steps > 0 and args.curriculum_vqa_share > 0)
    probes = {kind: [collate(records[i : i + 64]) for i in range(0, len(records), 64)]
              for kind, records in vqa_probe_records(args.val_watches if probing_vqa else 0, size, data_seed).items()}

    adapters = {id(q) for q in model.adapter_parameters()}
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [q for q in trainable if id(q) not in adapters], "lr": lr, "weight_decay": optim.weight_decay},
        {"params": [q for q in trainable if id(q) in adapters], "lr": projector_lr, "weight_decay": 0.0},
    ], betas=tuple(optim.betas))

    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        if args.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    autocast = torch.autocast("cpu", dtype=dtype, enabled=args.precision == "bf16")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))

    def evaluate(step: int, loss: float, seconds: float) -> dict:
        row: dict = {"step": step, "train_loss": loss, "seconds": round(seconds, 1)}
        with torch.no_grad(), autocast:
            gain = prompt_gain(model, val, seed=args.seed)
            row["image_loss"] = gain["image_loss"]
            row.update({k: v for k, v in gain.items() if k.startswith("prompt_gain")})
            model.eval()
            for name, (scale, temperature) in draws.items():
                sampling = {"cfg_scale": scale} if temperature is None else {"cfg_scale": scale, "image_temperature": temperature}
                images = generate_images(model, val, **sampling)
                drawn = [(img, r) for img, r in zip(images, val) if img is not None]
                faith = score_generation(reader, torch.stack([i.float() for i, _ in drawn]), [r for _, r in drawn])
                row[name] = {k: v for k, v in faith.items() if isinstance(v, float)}
            if probing_vqa:
                row["vqa"] = {kind: exact_match(model, batches) for kind, batches in probes.items()}
            model.train()
        line = (f"step {step:5d}  loss {loss:.3f}  image {row['image_loss']:.3f}  gain {row['prompt_gain']:+.3f} ("
                + " ".join(f"{k.split('/')[1]} {v:+.3f}" for k, v in row.items() if k.startswith("prompt_gain/")) + ")")
        for name in draws:
            line += f"  | {name}: " + " ".join(f"{k} {v:.2f}" for k, v in row[name].items())
        if "vqa" in row:
            line += "  | vqa: " + " ".join(f"{k} {v:.2f}" for k, v in row["vqa"].items())
        print(line + f"  {seconds:.0f} s", flush=True)
        if args.out:
            with open(args.out / "curves.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            save_slot_maps(gain, args.out / "slot_maps.png")
        return row

    print(f"attributes {args.attributes}: {len(val)} validation prompts, batch {args.batch_size}, "
          f"lr {lr:g} / {projector_lr:g}, {args.schedule}, vqa share {args.vqa_share:g} ({args.vqa_questions}), "
          f"curriculum {args.curriculum_steps} steps ({args.curriculum_attributes}, {args.curriculum_questions}, "
          f"vqa share {args.curriculum_vqa_share:g}), overrides {args.set}", flush=True)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        early = step <= args.curriculum_steps
        share, questions = (args.curriculum_vqa_share, args.curriculum_questions) if early else (args.vqa_share, args.vqa_questions)
        attributes = args.curriculum_attributes if early else args.attributes
        if share and rng.random() < share:
            records = [vqa_record(questions, "train", rng.randrange(1_000_000), rng, size, data_seed) for _ in range(args.batch_size)]
        else:
            records = [generation_record(attributes, "train", rng.randrange(1_000_000), rng, size, data_seed)
                       for _ in range(args.batch_size)]
        batch = collate(records, training=True)
        with autocast:
            loss = model(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % args.every == 0 or step == args.steps:
            evaluate(step, loss.item(), time.perf_counter() - start)


if __name__ == "__main__":
    main()
