"""How long generating and scoring N watches takes with a trained checkpoint on this machine.

    python benchmarks/generation_speed.py --ckpt runs/tiny_siglip_vq/version_0/checkpoints/last.ckpt --n 1000

Draws one watch per generation prompt of the test split (KV-cached sampling, ``--batch-size``
prompts at a time, the checkpoint's sampling settings, bf16 autocast where ``precision: auto``
would pick it), then reads them with the built-in watch reader (faithfulness) and computes the
reader Fréchet distance against 1,000 held-out renders with its bootstrap interval. Prints the
wall time of each part; asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from unified_vlm.datamodules.streams import WatchStream
from unified_vlm.datamodules.unified_datamodule import pil_to_tensor
from unified_vlm.evaluation.generation import reader_frechet, reference_renders, score_generation
from unified_vlm.evaluation.reader import load_reader
from unified_vlm.evaluation.record_tasks import generate_images
from unified_vlm.models.unified import UnifiedVLM
from unified_vlm.precision import auto_precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by fit")
    p.add_argument("--n", type=int, default=1000, help="how many watches to generate")
    p.add_argument("--batch-size", type=int, default=50, help="prompts per generate() call (data.eval_batch_size)")
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args()
    model = UnifiedVLM.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    precision, reason = auto_precision("cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision.startswith("bf16") else contextlib.nullcontext()
    stream = WatchStream(split="test", num_watches=args.n, image_size=args.image_size, tasks=["generation"])
    records = [stream[i] for i in range(args.n)]
    for r in records:
        r["image"] = pil_to_tensor(r["image"])
    start = time.perf_counter()
    images = []
    with torch.no_grad(), autocast:
        for i in range(0, args.n, args.batch_size):
            images += generate_images(model, records[i:i + args.batch_size])
    generate_s = time.perf_counter() - start
    made = [(img, r) for img, r in zip(images, records) if img is not None]
    stacked = torch.stack([img.float() for img, _ in made])
    reader = load_reader()
    start = time.perf_counter()
    faith = score_generation(reader, stacked, [r["conversations"][0]["value"] for _, r in made])
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    fd = reader_frechet(reader, stacked, reference_renders(1000, stacked.shape[-1]))
    fd_s = time.perf_counter() - start
    print(f"checkpoint {args.ckpt}  precision {precision} ({reason})  threads {torch.get_num_threads()}")
    print(f"generated {len(made)} of {args.n} watches in {generate_s:.1f} s ({generate_s / args.n * 1000:.0f} ms each, "
          f"batches of {args.batch_size})")
    print(f"faithfulness of {len(made)} watches: {read_s:.1f} s (total {faith['total']:.3f}, read as watches {faith['is_watch']:.3f})")
    print(f"reader Fréchet distance with its interval vs 1,000 renders: {fd_s:.1f} s "
          f"(FD {fd['fd']:.1f} [{fd['low']:.1f}, {fd['high']:.1f}])")


if __name__ == "__main__":
    main()
