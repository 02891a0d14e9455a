"""Training against the machine's limit: model FLOPs utilisation, where a step's time goes, padding,
and how fast the data engine is against what training consumes.

    python benchmarks/train_mfu.py --config configs/tiny_siglip_vq.yaml --steps 40

Everything is measured in this one process, at the config's precision and this process's threads:

- **peak**: dense matmul FLOP/s at the shapes of the model's largest matmuls (tokens of a step x
  hidden x intermediate) and at a large square, in the training precision (bf16 tensors where
  training runs bf16-mixed, else fp32);
- **model FLOPs** (analytic, the useful work): forward + backward (x3) of every decoder matmul over
  the real (non-padding) tokens, causal attention over each record's own length, the LM head at
  supervised text positions and the image head at image slots; plus the forward of the frozen
  towers (encoder over understanding images, VQ encoder over generation targets) counted by
  ``torch.utils.flop_counter``. **MFU** = model FLOPs / step time / peak;
- **executed FLOPs** (``FlopCounterMode`` over a real step: padding, the LM head at every position
  and all): their ratio to model FLOPs is the work spent beyond the useful;
- **time shares** per step: data (waiting for the batch), the forward of each module (hooks), the
  rest of the forward (splicing, losses), backward, optimizer, Lightning between steps;
- **padding**: share of computed token positions that are padding, per task;
- **data engine**: records/s of rendering + tokenising + collating (the train loader alone) against
  the records/s training consumes;
- **peak RSS** of the process.
Prints a table; asserts nothing (performance claims belong in benchmarks, not tests).
"""
from __future__ import annotations

import argparse
import collections
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from unified_vlm.benchmarking import build, check_precision, linear_params, matmul_peak, read_config, run
from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
from unified_vlm.models.unified import UnifiedVLM

MODULES = ("encoder", "output_space", "und_projector", "gen_projector", "decoder", "lm_head", "head")


def module_of(model: UnifiedVLM, name: str):
    return model.lm.lm_head if name == "lm_head" else getattr(model, name, None)


class StepProfile(L.Callback):
    """Wall time of each phase of every step after ``warmup``, and the batches' token counts."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: dict[str, float] = collections.defaultdict(float)
        self.steps = 0
        self.tokens: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # real, padded, records
        self.batches: list[dict] = []
        self._mark = self._end = None
        self._module_start: dict[str, float] = {}
        self.active = False

    def attach(self, model: UnifiedVLM) -> None:
        for name in MODULES:
            module = module_of(model, name)
            if module is None or (name == "gen_projector" and model.shares_projector):
                continue
            module.register_forward_pre_hook(lambda m, a, name=name: self._start(name))
            module.register_forward_hook(lambda m, a, o, name=name: self._stop(name))

    def _start(self, name: str) -> None:
        if self.active:
            self._module_start[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        if self.active and name in self._module_start:
            self.times[f"forward: {name}"] += time.perf_counter() - self._module_start.pop(name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.active = batch_idx >= self.warmup
        if self.active:
            self.steps += 1
            if self._end is not None:
                self.times["data + Lightning between steps"] += now - self._end
            task = (batch.get("tasks") or ["?"])[0]
            mask = batch["attention_mask"]
            entry = self.tokens[task]
            entry[0] += int(mask.sum())
            entry[1] += mask.numel()
            entry[2] += mask.shape[0]
            if len(self.batches) < 64:
                self.batches.append({k: v for k, v in batch.items()})
        self._mark = now

    def _phase(self, name: str) -> None:
        now = time.perf_counter()
        if self.active:
            self.times[name] += now - self._mark
        self._mark = now

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._phase("forward (all)")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._phase("backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._phase("gradient clipping, hooks")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._phase("optimizer step, zero_grad")
        self._end = self._mark if self.active else None


def model_flops(model: UnifiedVLM, batch: dict) -> float:
    """Useful training FLOPs of one batch (see the module doc); the frozen towers' forward counted
    by the flop counter, everything trained x3 (forward + backward)."""
    config = model.lm.config
    h, layers = config.hidden_size, config.num_hidden_layers
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    body = linear_params(model.decoder)
    flops = 3 * (2 * body * sum(lengths) + 2 * 2 * h * layers * sum(n * n / 2 for n in lengths))
    text_targets = int((batch["labels"][:, 1:] != -100).sum())
    flops += 3 * 2 * model.lm.lm_head.weight.numel() * text_targets
    slots = int((batch["input_ids"][:, 1:] == model.ids["gen_pad"]).sum())
    flops += 3 * 2 * linear_params(model.head) * slots
    frozen = FlopCounterMode(display=False)
    with torch.no_grad(), frozen:
        if batch.get("und_pixel_values") is not None:
            model.encoder(batch["und_pixel_values"])
        if batch.get("gen_pixel_values") is not None and len(batch["gen_pixel_values"]):
            model.output_space.targets(batch["gen_pixel_values"])
    return flops + frozen.get_total_flops()


def executed_flops(model: UnifiedVLM, batch: dict, autocast: bool) -> float:
    """FLOPs of a real forward + backward of ``batch`` (padding and all), by the flop counter."""
    counter = FlopCounterMode(display=False)  # one context: entering it again would reset the counts
    model.train()
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(batch)
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def data_engine_rate(config: dict, model: UnifiedVLM, batches: int) -> float:
    """Records/s of the train loader alone (render, tokenise, collate)."""
    from unified_vlm.datamodules.collate import ConversationCollator

    data = UnifiedDataModule(**config["data"])
    data.collator = ConversationCollator.for_model(model)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    next(loader)
    records, start = 0, time.perf_counter()
    for _ in range(batches):
        records += len(next(loader)["input_ids"])
    return records / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_siglip_vq.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default=None, help="override trainer.precision (auto, bf16-mixed, 32-true)")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="time each matmul peak is measured for")
    args = p.parse_args()
    config = read_config(args.config)
    config["data"].pop("curriculum", None)  # the mix a run spends most of its steps on
    precision = check_precision(args.precision, config)
    bf16 = precision.startswith("bf16")
    model, data = build(config, args.config)
    profile = StepProfile(args.warmup)
    profile.attach(model)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=args.steps + args.warmup,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        callbacks=[profile], enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    profile.active = False  # the FLOP counts below run the model again
    total = sum(v for k, v in profile.times.items() if not k.startswith("forward: "))
    step = total / profile.steps
    model.eval()

    useful = sum(model_flops(model, b) for b in profile.batches) / len(profile.batches)
    executed = sum(executed_flops(model, b, bf16) for b in profile.batches[:8]) / min(8, len(profile.batches))
    h, i = model.lm.config.hidden_size, model.lm.config.intermediate_size
    tokens = int(sum(t[1] for t in profile.tokens.values()) / profile.steps)
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak_model = matmul_peak(tokens, h, i, dtype, args.peak_seconds)
    peak_square = matmul_peak(2048, 2048, 2048, dtype, args.peak_seconds)
    records_per_step = sum(t[2] for t in profile.tokens.values()) / profile.steps
    engine = data_engine_rate(config, model, 20)

    print(f"config {args.config}  precision {precision}  threads {torch.get_num_threads()}  "
          f"{profile.steps} timed steps after {args.warmup} warm-up ({time.perf_counter() - start:.0f} s in all)")
    print(f"step time                      {step:8.3f} s   ({records_per_step:.1f} records, {tokens} token positions)")
    print(f"matmul peak, model shapes      {peak_model / 1e9:8.1f} GFLOP/s  ({tokens} x {h} x {i}, {dtype})")
    print(f"matmul peak, 2048 square       {peak_square / 1e9:8.1f} GFLOP/s")
    print(f"model FLOPs per step           {useful / 1e9:8.2f} GFLOP (useful: real tokens, supervised positions)")
    print(f"executed FLOPs per step        {executed / 1e9:8.2f} GFLOP (flop counter: padding, every position)")
    print(f"MFU vs model-shape peak        {useful / step / peak_model:8.1%}")
    print(f"MFU vs square peak             {useful / step / peak_square:8.1%}")
    print(f"executed / model FLOPs         {executed / useful:8.2f}")
    print("time per step:")
    for name, value in sorted(profile.times.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<34}{value / profile.steps:8.3f} s  {value / total:6.1%}")
    print("padding (share of computed token positions):")
    for task, (real, padded, records) in sorted(profile.tokens.items()):
        print(f"  {task:<12} {1 - real / padded:6.1%}   ({records} records, {real / records:.0f} real tokens each)")
    consumed = records_per_step / step
    print(f"data engine                    {engine:8.0f} records/s vs {consumed:.0f} consumed: {engine / consumed:.1f}x")
    print(f"peak RSS                       {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB")


if __name__ == "__main__":
    run(main)
