"""Supervised watch-attribute pretraining of the vision encoder, so a frozen tower is useful.

A random or jointly trained SigLIP learned nothing in CPU minutes (prototype); supervising the
encoder on every attribute the texts mention does. The VLM reads the encoder's *tokens*, so the heads
read the tokens too, and every head is linear (what a linear probe reads, a projector reads):

- per source in ``head_inputs``: "pooled" (the attention-pooling token, emitted by
  ``feature_select="pooled+patch"``) and/or "mean" (the mean patch token, so plain "patch"
  tokens carry the answers as well), one linear layer predicting weather, both corners,
  battery (regression of p/100), hour/minute/second classes and, as a smooth auxiliary target,
  the sin/cos of the three hand angles;
- per patch token (``token_loss_weight``): which objects the patch holds (weather icon by
  kind, battery, each hand), dense targets from the renderer's geometry that speed up learning
  and keep "where" information in the patch tokens.

Time is read from the class heads: after 6 CPU minutes they beat decoding the regressed hand
angles (hour 0.95 vs 0.76, minute within 2 0.85 vs 0.64, measured); the angle loss stays as
a smooth auxiliary target and its decoding is reported as ``angle_*``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from unified_vlm.datamodules.watch import (
    CORNERS,
    WEATHERS,
    battery_outline_box,
    face_geometry,
    hand_angles,
    hand_tips,
    hand_width,
    render_watch,
    sample_watch,
    weather_icon_box,
)
from unified_vlm.pretraining.common import (
    ThreadTuner,
    cosine_with_warmup,
    fastest_thread_count,
    save_dir_atomically,
    steps_for_minutes,
)
from unified_vlm.registry import ENCODERS

log = logging.getLogger(__name__)

# Linear outputs per head source, in this order; "angles" = (sin, cos) of hour, minute, second hands.
OUTPUTS = {"weather": 3, "weather_pos": 4, "battery_pos": 4, "battery": 1, "hour": 12, "minute": 60, "second": 60, "angles": 6}
TOKEN_CHANNELS = ("sunny", "cloudy", "raining", "battery", "hour_hand", "minute_hand", "second_hand")
HANDS = ("hour", "minute", "second")


# ----------------------------------------------------------------------------------- data
def token_targets(attrs, size: int, grid: int) -> np.ndarray:
    """(grid*grid, 7) 0/1 targets, row-major patches: which objects each patch of a ``size`` px render holds.

    A box counts when it covers at least a tenth of the patch; a hand counts when its centre
    line passes within half a patch (plus half the hand's width) of the patch centre.
    """
    cell = size / grid
    edges = np.arange(grid) * cell
    out = np.zeros((grid, grid, len(TOKEN_CHANNELS)), dtype=np.float32)

    def box_cover(x0, y0, x1, y1):  # x1, y1 exclusive
        ox = np.clip(np.minimum(edges + cell, x1) - np.maximum(edges, x0), 0, None)
        oy = np.clip(np.minimum(edges + cell, y1) - np.maximum(edges, y0), 0, None)
        return np.outer(oy, ox) / cell**2 >= 0.1  # (rows, cols)

    out[..., WEATHERS.index(attrs.weather)] = box_cover(*weather_icon_box(attrs, size))
    bx0, by0, bx1, by1 = battery_outline_box(attrs, size)
    out[..., 3] = box_cover(bx0, by0, bx1 + 1, by1 + 1)

    centres = edges + cell / 2
    px, py = np.meshgrid(centres, centres)  # (rows, cols)
    c, _ = face_geometry(size)
    for k, (name, (tx, ty)) in enumerate(hand_tips(attrs, size).items()):
        dx, dy = tx - c, ty - c
        t = np.clip(((px - c) * dx + (py - c) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.hypot(px - (c + t * dx), py - (c + t * dy))
        out[..., 4 + k] = dist <= cell / 2 + hand_width(name, size) / 2
    return out.reshape(grid * grid, -1)


def attribute_targets(attrs) -> dict[str, Tensor]:
    rad = torch.deg2rad(torch.tensor([hand_angles(attrs)[k] for k in HANDS], dtype=torch.float32))
    return {
        "weather": torch.tensor(WEATHERS.index(attrs.weather)),
        "weather_pos": torch.tensor(CORNERS.index(attrs.weather_pos)),
        "battery_pos": torch.tensor(CORNERS.index(attrs.battery_pos)),
        "battery": torch.tensor(attrs.battery / 100, dtype=torch.float32),
        "hour": torch.tensor(attrs.hour % 12),
        "minute": torch.tensor(attrs.minute),
        "second": torch.tensor(attrs.second),
        "angles": torch.stack([rad.sin(), rad.cos()], dim=1).flatten(),  # h_sin, h_cos, m_sin, ...
    }


class WatchAttributeDataset(Dataset):
    """Watches of one split rendered on the fly at ``render_size``, with attribute and per-patch targets."""

    def __init__(self, split: str, length: int, render_size: int, grid: int, seed: int = 0) -> None:
        self.split, self.length, self.render_size, self.grid, self.seed = split, length, render_size, grid, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        attrs = sample_watch(self.seed, self.split, index)
        pixels = np.asarray(render_watch(attrs, self.render_size), dtype=np.uint8)
        item = attribute_targets(attrs)
        item["image"] = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255
        item["tokens"] = torch.from_numpy(token_targets(attrs, self.render_size, self.grid))
        return item


class WatchAttributeDataModule(L.LightningDataModule):
    """Train: a fresh watch every sample (``train_samples`` long); val: the first ``val_size`` "val" watches."""

    def __init__(self, image_size: int = 64, patch_size: int = 8, render_size: Optional[int] = None,
                 batch_size: int = 64, train_samples: int = 10_000_000, val_size: int = 512,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _loader(self, split: str, length: int) -> DataLoader:
        h = self.hparams
        data = WatchAttributeDataset(split, length, h.render_size or h.image_size, h.image_size // h.patch_size, h.seed)
        return DataLoader(data, batch_size=h.batch_size, num_workers=h.num_workers, persistent_workers=h.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.train_samples)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.val_size)


# ---------------------------------------------------------------------------------- model
def circular_error(a: Tensor, b: Tensor, period: int) -> Tensor:
    d = (a - b).abs() % period
    return torch.minimum(d, period - d)


def decode_time(angles: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(hour 0..11, minute, second) from predicted (sin, cos) of the three hand angles."""
    degrees = torch.rad2deg(torch.atan2(angles[:, 0::2], angles[:, 1::2])) % 360  # (B, 3)
    minute = torch.round(degrees[:, 1] / 6) % 60
    second = torch.round(degrees[:, 2] / 6) % 60
    hour = torch.round(degrees[:, 0] / 30 - minute / 60) % 12
    return hour.long(), minute.long(), second.long()


def time_score(e_h: Tensor, e_m: Tensor, e_s: Tensor) -> Tensor:
    """The paper's circular time score, 1 - (e_h/6 + e_m/30 + e_s/30)/3."""
    return 1 - (e_h / 6 + e_m / 30 + e_s / 30) / 3


def attribute_metrics(out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Batch means: exact match, battery |error| in %, time from the class heads (and ``angle_*`` from the angles)."""
    metrics = {k: (out[k].argmax(-1) == batch[k]).float().mean() for k in ("weather", "weather_pos", "battery_pos")}
    metrics["battery_abs_err"] = ((out["battery"].squeeze(-1) - batch["battery"]).abs() * 100).mean()
    decoded = {"": tuple(out[k].argmax(-1) for k in HANDS), "angle_": decode_time(out["angles"])}
    for tag, (h, m, s) in decoded.items():
        e_h = circular_error(h, batch["hour"], 12).float()
        e_m = circular_error(m, batch["minute"], 60).float()
        e_s = circular_error(s, batch["second"], 60).float()
        metrics[f"{tag}hour_acc"] = (e_h == 0).float().mean()
        metrics[f"{tag}minute_pm2"] = (e_m <= 2).float().mean()
        metrics[f"{tag}second_pm2"] = (e_s <= 2).float().mean()
        metrics[f"{tag}time_score"] = time_score(e_h, e_m, e_s).mean()
    return metrics


class AttributePretrainModule(L.LightningModule):
    """A SigLIP encoder plus linear attribute heads on its tokens (see the module docstring)."""

    def __init__(
        self,
        encoder: str = "siglip",
        image_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 200,
        max_steps: int = 5000,
        head_inputs: Sequence[str] = ("pooled", "mean"),
        token_loss_weight: float = 1.0,
        battery_loss_weight: float = 10.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        unknown = set(head_inputs) - {"pooled", "mean"}
        if unknown or not head_inputs:
            raise ValueError(f"head_inputs must be a non-empty subset of ('pooled', 'mean'), got {list(head_inputs)}")
        self.encoder = ENCODERS.create(
            encoder, image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, intermediate_size=intermediate_size, feature_layer=-1,
            feature_select="pooled+patch" if "pooled" in head_inputs else "patch",  # saved as the default reading
        )
        if not hasattr(self.encoder, "encode"):
            raise ValueError(f"encoder {encoder!r} has no pooled/patch encode(); attribute pretraining supports 'siglip'")
        dim = self.encoder.feature_dim
        self.heads = nn.ModuleDict({src: nn.Linear(dim, sum(OUTPUTS.values())) for src in head_inputs})
        self.token_head = nn.Linear(dim, len(TOKEN_CHANNELS)) if token_loss_weight > 0 else None

    def forward(self, images: Tensor) -> tuple[dict[str, dict[str, Tensor]], Tensor]:
        """Per source, the head outputs split by attribute; and the patch tokens (B, N, D)."""
        views = self.encoder.encode(images)
        inputs = {"pooled": views["pooled"], "mean": views["patch"].mean(dim=1)}
        outputs = {}
        for src, head in self.heads.items():
            outputs[src] = dict(zip(OUTPUTS, head(inputs[src]).float().split(list(OUTPUTS.values()), dim=-1)))
        return outputs, views["patch"]

    def losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, dict[str, Tensor]]]:
        outputs, patch = self(batch["image"])
        total = 0.0
        for out in outputs.values():
            for k in ("weather", "weather_pos", "battery_pos", "hour", "minute", "second"):
                total = total + F.cross_entropy(out[k], batch[k])
            total = total + self.hparams.battery_loss_weight * F.mse_loss(out["battery"].squeeze(-1), batch["battery"])
            total = total + F.mse_loss(out["angles"], batch["angles"]) * 3
        if self.token_head is not None:
            token_logits = self.token_head(patch).float()
            total = total + self.hparams.token_loss_weight * F.binary_cross_entropy_with_logits(token_logits, batch["tokens"])
        return total, outputs

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self.losses(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, outputs = self.losses(batch)
        size = batch["image"].shape[0]
        self.log("val/loss", loss, batch_size=size, prog_bar=True)
        for src, out in outputs.items():
            for name, value in attribute_metrics(out, batch).items():
                self.log(f"val/{src}/{name}", value, batch_size=size)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.98),
        )
        h = self.hparams
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, h.warmup_steps, h.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# ------------------------------------------------------------------------------- training
def pretrain(out_dir: str, minutes: float = 6.0, batch_size: int = 64, render_size: Optional[int] = None,
             val_size: int = 512, seed: int = 0, progress: bool = True, log_dir: Optional[str] = None,
             **module_kwargs) -> dict[str, float]:
    """Train for about ``minutes`` and save the encoder to ``out_dir`` with ``save_pretrained`` (options
    and metrics in its json); return the validation metrics. The step count comes from timing a
    few steps first (so the cosine schedule ends on time); ``max_time`` caps the run regardless.
    CSV logs (per-attribute validation curves) go to ``log_dir``, default ``out_dir/pretrain_logs``."""
    threads_before = torch.get_num_threads()
    try:
        L.seed_everything(seed, workers=True)
        probe = AttributePretrainModule(**module_kwargs)
        h = probe.hparams
        data = WatchAttributeDataModule(h.image_size, h.patch_size, render_size, batch_size, val_size=val_size, seed=seed)
        threads, step_s = fastest_thread_count(lambda batch: probe.losses(batch)[0], data.train_dataloader())
        max_steps = steps_for_minutes(minutes, step_s)
        L.seed_everything(seed, workers=True)
        module = AttributePretrainModule(**{**module_kwargs, "max_steps": max_steps,
                                            "warmup_steps": min(h.warmup_steps, max_steps // 5)})
        log.info("%.3f s/step with %d thread(s): training %d steps of batch %d", step_s, threads, max_steps, batch_size)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=max_steps, max_time={"minutes": minutes * 1.05},
            val_check_interval=max(1, max_steps // 3), check_val_every_n_epoch=None, num_sanity_val_steps=0,
            logger=CSVLogger(log_dir or os.path.join(out_dir, "pretrain_logs"), name="", version=""),
            enable_checkpointing=False,
            callbacks=[ThreadTuner(threads=threads_before)],
            enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=25,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()}
        metrics.update(train_minutes=(time.perf_counter() - start) / 60, steps=trainer.global_step, threads=threads)
    finally:
        torch.set_num_threads(threads_before)
    module.encoder.save_pretrained(
        out_dir, render_size=render_size or h.image_size,
        pretrain={"hparams": {**dict(module.hparams), "batch_size": batch_size, "seed": seed}, "val": metrics},
    )
    return metrics


def format_table(metrics: dict[str, float]) -> str:
    """Rows = metrics, columns = head sources (pooled token, mean patch token)."""
    sources = sorted({k.split("/")[1] for k in metrics if k.count("/") == 2})
    names = list(dict.fromkeys(k.split("/")[2] for k in metrics if k.count("/") == 2))
    lines = [f"{'metric':<18}" + "".join(f"{s:>10}" for s in sources)]
    for name in names:
        lines.append(f"{name:<18}" + "".join(f"{metrics.get(f'val/{s}/{name}', float('nan')):>10.3f}" for s in sources))
    extra = {k: metrics[k] for k in ("val/loss", "steps", "train_minutes", "threads") if k in metrics}
    lines.append("  ".join(f"{k}={v:.4g}" for k, v in extra.items()))
    return "\n".join(lines)


def load_or_pretrain_encoder(weights: Optional[str], cache_dir: Optional[str] = None, max_minutes: float = 6.0,
                             **encoder_kwargs) -> str:
    """A local weights dir for the watch SigLIP: ``weights`` if given (validated by loading it), else
    ``cache_dir``, pretraining there first when absent (published atomically; if another process
    finished first, its encoder is kept). ``encoder_kwargs`` are ``pretrain`` options."""
    from unified_vlm.models.encoders import SiglipEncoder

    if weights is not None:
        SiglipEncoder(weights=weights)  # raises FileNotFoundError / ValueError naming the problem
        return str(weights)
    if cache_dir is None:
        raise ValueError("give encoder weights, or a cache_dir to pretrain one into")
    target = Path(cache_dir)
    if not (target / "config.json").is_file():
        log.warning("no pretrained watch encoder at %s: pretraining one now (about %.0f minutes)", target, max_minutes)

        def write(tmp: str) -> None:
            metrics = pretrain(tmp, minutes=max_minutes, progress=False, **encoder_kwargs)
            log.warning("watch encoder pretrained:\n%s", format_table(metrics))

        save_dir_atomically(write, target, "siglip_encoder", overwrite=False)
    return str(target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m unified_vlm pretrain-encoder --out DIR --minutes 6 --image-size 64 ...``"""
    p = argparse.ArgumentParser(prog="unified_vlm pretrain-encoder", description=main.__doc__)
    p.add_argument("--out", required=True, help="output weights directory (save_pretrained layout)")
    p.add_argument("--minutes", type=float, default=6.0, help="training time budget")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--render-size", type=int, default=None, help="watch render size (default: image size)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--head-inputs", default="pooled,mean", help="comma list of: pooled, mean")
    p.add_argument("--token-loss-weight", type=float, default=1.0, help="per-patch object targets; 0 disables")
    p.add_argument("--val-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="CSV training logs (default: OUT/pretrain_logs)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    metrics = pretrain(
        a.out, minutes=a.minutes, batch_size=a.batch_size, render_size=a.render_size, val_size=a.val_size, seed=a.seed,
        log_dir=a.log_dir,
        image_size=a.image_size, patch_size=a.patch_size, hidden_size=a.hidden_size, num_layers=a.num_layers,
        num_heads=a.num_heads, intermediate_size=a.intermediate_size, lr=a.lr, weight_decay=a.weight_decay,
        warmup_steps=a.warmup_steps, head_inputs=tuple(a.head_inputs.split(",")), token_loss_weight=a.token_loss_weight,
    )
    print(format_table(metrics))
    print(f"saved to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
