"""Image decoding against its limit: the KV-cached loop against full recompute, and one cached step
against the FLOP bound of its matmuls.

    python benchmarks/decode_speed.py --config configs/tiny_siglip_vq.yaml

For 64 image tokens (the config's 8x8 VQ grid) and 256 (the same VQ architecture at 128 px, 16x16,
untrained: speed does not depend on the weights), at batch 8 and 64: the wall time of drawing one
image per prompt with the preallocated (static) KV cache, with the cache grown by concatenation
("dynamic", the earlier default), and at batch 8 with every step recomputing the whole sequence
(the paper's loop), with greedy image tokens so that all must give the same tokens (checked and
printed). "cached step / bound" divides the time of one cached decoding step by the FLOPs of that
step (decoder matmuls, attention over the context, the image head) at the matmul peak measured here
at the step's shapes (batch x hidden x intermediate). Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from unified_vlm.assets import require_builtin
from unified_vlm.benchmarking import check_precision, linear_params, matmul_peak, read_config, run
from unified_vlm.models.part_files import CONFIG_NAME
from unified_vlm.models.unified import UnifiedVLM
from unified_vlm.models.vq_tokenizer import VQTokenizer, VQTokenizerConfig

PROMPT = "Draw a smart watch showing 10:08:30, with weather displayed at top-left."


def model_with_grid(config: dict, image_size: int, directory: Path) -> UnifiedVLM:
    """The config's model with its VQ architecture at ``image_size`` (random weights)."""
    vq = json.loads((Path(require_builtin("vq")) / CONFIG_NAME).read_text())
    vq["image_size"] = image_size
    torch.manual_seed(0)
    path = directory / f"vq{image_size}"
    VQTokenizer(VQTokenizerConfig.from_dict(vq)).save_pretrained(path)
    model_config = copy.deepcopy(config["model"])
    model_config["image_output"]["tokenizer"] = str(path)
    model_config["sampling"] = {**model_config.get("sampling", {}), "image_temperature": 0.0}
    return UnifiedVLM(**model_config).eval()


def step_flops(model: UnifiedVLM, batch: int, context: int) -> float:
    config = model.lm.config
    body = linear_params(model.decoder)
    attention = 2 * 2 * config.hidden_size * config.num_hidden_layers * context
    return batch * (2 * body + attention + 2 * linear_params(model.head) + 2 * linear_params(model.gen_projector))


def draw(model: UnifiedVLM, batch: int, use_cache: bool, autocast: bool, cache: str = "static"):
    prompt = model.chat_format.encode_prompt([{"from": "human", "value": PROMPT}], 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        start = time.perf_counter()
        out = model.generate([prompt] * batch, image_policy="force", use_cache=use_cache, cache=cache)
        elapsed = time.perf_counter() - start
    return elapsed, torch.stack([o.image_tokens for o in out]), len(prompt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_siglip_vq.yaml")
    p.add_argument("--batches", default="8,64")
    p.add_argument("--image-sizes", default="64,128", help="VQ input sizes: 64 px = 64 tokens, 128 px = 256")
    p.add_argument("--no-recompute", action="store_true", help="skip the full-recompute loop")
    args = p.parse_args()
    config = read_config(args.config)
    precision = check_precision("auto", config)
    bf16 = precision == "bf16-mixed"
    dtype = torch.bfloat16 if bf16 else torch.float32
    print(f"config {args.config}  precision {precision}  threads {torch.get_num_threads()}")
    print(f"{'tokens':>6} {'batch':>5} {'cached s':>9} {'dynamic s':>10} {'recompute s':>12} {'speed-up':>9} "
          f"{'same tokens':>12} {'cached step ms':>15} {'bound ms':>9} {'step/bound':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.image_sizes.split(",")):
            model = model_with_grid(config, size, Path(tmp))
            tokens = model.output_space.num_tokens
            draw(model, 2, True, bf16)  # warm-up
            for batch in (int(b) for b in args.batches.split(",")):
                # the growing cache first: its copies run slower once the allocator has held the
                # preallocated cache's large blocks (glibc raises its mmap threshold), which would flatter it
                dynamic, dynamic_tokens, _ = draw(model, batch, True, bf16, cache="dynamic")
                cached, cached_tokens, prompt_len = draw(model, batch, True, bf16)
                same = bool(torch.equal(cached_tokens, dynamic_tokens))
                recompute = None
                if batch == min(int(b) for b in args.batches.split(",")) and not args.no_recompute:
                    recompute, full_tokens, _ = draw(model, batch, False, bf16)
                    same = same and bool(torch.equal(cached_tokens, full_tokens))
                step = cached / (tokens + 2)  # image tokens plus IMAGE_START and IMAGE_END steps
                h, i = model.lm.config.hidden_size, model.lm.config.intermediate_size
                bound = step_flops(model, batch, prompt_len + tokens // 2) / matmul_peak(batch, h, i, dtype, seconds=0.5)
                print(f"{tokens:>6} {batch:>5} {cached:>9.2f} {dynamic:>10.2f} "
                      f"{'-' if recompute is None else f'{recompute:.2f}':>12} "
                      f"{'-' if recompute is None else f'{recompute / cached:.1f}x':>9} {str(same):>12} "
                      f"{step * 1e3:>15.2f} {bound * 1e3:>9.3f} {step / bound:>10.0f}x")


if __name__ == "__main__":
    run(main)
