"""Training throughput of a config's model on this machine (samples/s, tokens/s, s/step).

    python benchmarks/train_speed.py --config configs/tiny_siglip_vq.yaml --steps 30

Builds the config's model and data exactly as ``fit`` does, skips the first ``--warmup`` steps
(allocation, first-call overheads) and times the rest. Prints numbers; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L
import torch

from unified_vlm.benchmarking import build, check_precision, read_config, run


class Timer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.samples, self.tokens = warmup, None, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()
        if self.start is not None:
            self.samples += batch["input_ids"].shape[0]
            self.tokens += int(batch["attention_mask"].sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_siglip_vq.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default=None, help="override trainer.precision")
    args = p.parse_args()
    config = read_config(args.config)
    precision = check_precision(args.precision, config)
    model, data = build(config, args.config)
    timer = Timer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=args.steps + args.warmup,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
        callbacks=[timer], enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    elapsed = time.perf_counter() - timer.start
    steps = args.steps
    print(f"config {args.config}  precision {precision}  threads {torch.get_num_threads()}")
    print(f"{steps} steps in {elapsed:.1f} s: {elapsed / steps:.3f} s/step, "
          f"{timer.samples / elapsed:.1f} samples/s, {timer.tokens / elapsed:.0f} tokens/s")


if __name__ == "__main__":
    run(main)
