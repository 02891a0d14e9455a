"""``python -m unified_vlm train-vq``: train the VQ image tokenizer on watch images.

The paper uses a frozen, pretrained LlamaGen VQ-16. There is no such checkpoint offline, so
this job trains a small one on the synthetic watches (a few CPU minutes);
``load_or_train_vq_tokenizer`` trains one into a cache directory the first time it is asked
for and loads the cache afterwards.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import fields
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.image import PeakSignalNoiseRatio

from unified_vlm.datamodules.watch import render_watch, sample_watch
from unified_vlm.models.part_files import CONFIG_NAME, WEIGHTS_NAME
from unified_vlm.models.vq_tokenizer import VQTokenizer, VQTokenizerConfig
from unified_vlm.pretraining.common import (
    BudgetCosine,
    adamw_without_norm_decay,
    budget_trainer,
    check_out_dir,
    save_dir_atomically,
    torch_threads,
)

__all__ = [
    "VQTokenizerModule",
    "WatchImageDataset",
    "WatchImageDataModule",
    "train_vq_tokenizer",
    "load_or_train_vq_tokenizer",
    "main",
]

OWNED_FILES = {CONFIG_NAME, WEIGHTS_NAME}  # all a saved tokenizer directory holds


def edge_loss(recon: Tensor, target: Tensor) -> Tensor:
    """L1 between horizontal and vertical pixel differences.

    Hands are about one pixel wide at 64 px and are a tiny part of the pixel loss; matching the
    image gradients weights their edges (and icon outlines) more, so they do not blur away.
    """
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(recon), dx(target)) + F.l1_loss(dy(recon), dy(target))


def detail_weights(target: Tensor, strength: float) -> Tensor:
    """Per-pixel loss weights (B, 1, H, W): 1 on flat areas, up to 1 + 2/3 * strength on thin details.

    A pixel's detail is how far it is from its 3x3 neighbourhood mean. One-pixel hands, icon
    outlines and battery digits score high and flat face colour scores zero, so the pixel loss
    stops treating a missing hand as a rounding error (without it, hands are still absent
    after a few hundred steps while the face colour is already right).
    """
    if strength <= 0:
        return torch.ones_like(target[:, :1])
    blurred = F.avg_pool2d(F.pad(target, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return 1.0 + strength * (target - blurred).abs().mean(dim=1, keepdim=True)


class VQTokenizerModule(L.LightningModule):
    """Trains a :class:`VQTokenizer`: detail-weighted L1 + MSE, an edge loss, and the quantizer's aux loss.

    Logs train/val loss and PSNR (on the progress bar), and per validation epoch the codebook
    usage (fraction of codes used) and perplexity, the two numbers that reveal codebook collapse.
    """

    def __init__(
        self,
        image_size: int = 64,
        channels: Sequence[int] = (32, 64, 128),
        latent_dim: int = 64,
        quantizer: str = "vq",
        codebook_size: int = 512,
        codebook_dim: int = 8,
        commitment_weight: float = 0.25,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        weight_decay: float = 0.0,
        num_res_blocks: int = 1,
        norm: str = "batch",
        edge_weight: float = 0.5,
        detail_weight: float = 40.0,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]  # a list keeps hparams.yaml free of python tags
        self.save_hyperparameters()
        self.tokenizer = VQTokenizer(
            VQTokenizerConfig(
                image_size=image_size,
                channels=tuple(channels),
                num_res_blocks=num_res_blocks,
                norm=norm,
                latent_dim=latent_dim,
                quantizer=quantizer,
                codebook_size=codebook_size,
                codebook_dim=codebook_dim,
                commitment_weight=commitment_weight,
            )
        )
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.register_buffer("code_counts", torch.zeros(self.tokenizer.codebook_size), persistent=False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.tokenizer(images)

    def _step(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        out = self.tokenizer(images)
        recon = out["recon"].float()
        target = self.tokenizer.resize(images).float()
        weights = detail_weights(target, self.hparams.detail_weight)
        weights = weights / weights.mean()
        parts = {
            "l1": (weights * (recon - target).abs()).mean(),
            "mse": (weights * (recon - target).square()).mean(),
            "edge": edge_loss(recon, target),
            "aux": out["aux_loss"].float(),
        }
        loss = parts["l1"] + parts["mse"] + self.hparams.edge_weight * parts["edge"] + parts["aux"]
        plain_mse = F.mse_loss(recon.detach().clamp(0, 1), target)
        parts["psnr"] = 10 * torch.log10(1.0 / plain_mse.clamp_min(1e-10))  # reported, not optimised
        return out, loss, parts

    def training_step(self, images: Tensor, batch_idx: int) -> Tensor:
        _, loss, parts = self._step(images)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/psnr", parts.pop("psnr"), prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        return loss

    def validation_step(self, images: Tensor, batch_idx: int) -> None:
        out, loss, _ = self._step(images)
        self.val_psnr(out["recon"].float().clamp(0, 1), self.tokenizer.resize(images).float())
        self.code_counts += torch.bincount(out["codes"].flatten(), minlength=self.code_counts.numel()).to(self.code_counts)
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/psnr", self.val_psnr, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self.code_counts.clone(), reduce_op="sum")
        if counts.sum() > 0:
            probs = counts / counts.sum()
            entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
            self.log("val/codebook_usage", (counts > 0).float().mean(), prog_bar=True)
            self.log("val/perplexity", entropy.exp())
        self.code_counts.zero_()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = adamw_without_norm_decay(self.tokenizer.parameters(), self.hparams.lr, self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, BudgetCosine(self, self.hparams.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class WatchImageDataset(Dataset):
    """Watch pictures as float tensors (3, size, size) in [0, 1], rendered on the fly (~0.1 ms each)."""

    def __init__(self, split: str, length: int, image_size: int = 64, seed: int = 0) -> None:
        self.split, self.length, self.image_size, self.seed = split, length, image_size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        image = render_watch(sample_watch(self.seed, self.split, index), self.image_size)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


class WatchImageDataModule(L.LightningDataModule):
    """Watch images of the "train" and "val" splits; ``batch_size`` is global (split across devices)."""

    def __init__(
        self,
        image_size: int = 64,
        num_train: int = 20000,
        num_val: int = 256,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.train_set = WatchImageDataset("train", hp.num_train, hp.image_size, hp.seed)
        self.val_set = WatchImageDataset("val", hp.num_val, hp.image_size, hp.seed)
        world = self.trainer.world_size if self.trainer is not None else 1
        self.per_device_batch_size = max(1, hp.batch_size // world)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


def train_vq_tokenizer(
    out_dir: str | None,
    max_minutes: float = 8.0,
    image_size: int = 64,
    batch_size: int = 16,
    num_train: int = 20000,
    num_val: int = 256,
    seed: int = 0,
    precision: str = "bf16-mixed",
    max_steps: int = -1,
    progress_bar: bool = True,
    overwrite: bool = True,
    threads: int | None = None,
    **module_kwargs: Any,
) -> tuple[VQTokenizer, dict[str, float]]:
    """Train for ``max_minutes`` (or ``max_steps``), validate once more, save to ``out_dir`` if given.

    Returns the tokenizer (eval mode) and the final validation metrics. ``threads`` sets torch's
    CPU threads for the run: on a CPU shared with another busy process, 2 OpenMP threads ran
    a step 10x slower than 1 thread, and a time-budgeted run then gets 10x fewer steps.
    """
    with torch_threads(threads):
        if out_dir is not None:
            check_out_dir(out_dir, overwrite, OWNED_FILES)
        module_kwargs.setdefault("warmup_steps", 50)  # a time-budgeted run has only ~400-1000 steps
        L.seed_everything(seed, workers=True)
        module = VQTokenizerModule(image_size=image_size, **module_kwargs)
        data = WatchImageDataModule(image_size, num_train, num_val, seed, batch_size)
        trainer = budget_trainer(max_minutes, max_steps, precision, progress_bar=progress_bar)
        trainer.fit(module, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()}
        metrics["steps"] = float(trainer.global_step)
        tokenizer = module.tokenizer.cpu().eval()
        if out_dir is not None and trainer.is_global_zero:
            save_dir_atomically(tokenizer.save_pretrained, out_dir, "vq_tokenizer", overwrite, OWNED_FILES)
        return tokenizer, metrics


def load_or_train_vq_tokenizer(
    path: str | None,
    cache_dir: str | None = None,
    max_minutes: float = 8.0,
    image_size: int = 64,
    **kwargs: Any,
) -> VQTokenizer:
    """The tokenizer at ``path``; with no path, the cached one, trained and cached first if absent.

    ``kwargs`` go to :func:`train_vq_tokenizer` / :class:`VQTokenizerModule`. A cached tokenizer
    whose architecture disagrees with them is an error, not a silent substitute.
    """
    if path is not None:
        return VQTokenizer.from_pretrained(path)
    if cache_dir is None:
        raise ValueError("give a tokenizer path, or a cache_dir to train one into")
    if os.path.isfile(os.path.join(cache_dir, CONFIG_NAME)):
        tokenizer = VQTokenizer.from_pretrained(cache_dir)
        requested = {"image_size": image_size, **kwargs}
        conflicts = {
            f.name: (getattr(tokenizer.config, f.name), requested[f.name])
            for f in fields(VQTokenizerConfig)
            if f.name in requested and _as_cfg(getattr(tokenizer.config, f.name)) != _as_cfg(requested[f.name])
        }
        if conflicts:
            details = ", ".join(f"{k}: cached {a!r} vs requested {b!r}" for k, (a, b) in conflicts.items())
            raise ValueError(f"cached VQ tokenizer at {cache_dir} has a different architecture ({details}); "
                             "pass another cache_dir or delete the cache")
        return tokenizer
    rank_zero_info(
        f"VQ tokenizer not found at {cache_dir}: training one now (about {max_minutes:g} minutes) and caching it"
    )
    tokenizer, metrics = train_vq_tokenizer(cache_dir, max_minutes=max_minutes, image_size=image_size, overwrite=False, **kwargs)
    rank_zero_info(
        f"VQ tokenizer cached at {cache_dir}: val PSNR {metrics.get('val/psnr', float('nan')):.2f} dB, "
        f"codebook usage {metrics.get('val/codebook_usage', float('nan')):.1%}"
    )
    return tokenizer


def _as_cfg(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unified_vlm train-vq --out DIR --minutes 8``: train, save, print val PSNR and codebook usage."""
    parser = argparse.ArgumentParser(prog="python -m unified_vlm train-vq", description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory to write config.json + model.safetensors into")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: time only)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=_int_tuple, default=(32, 64, 128), help="comma-separated, e.g. 32,64,128")
    parser.add_argument("--num-res-blocks", type=int, default=1)
    parser.add_argument("--norm", default="batch", choices=["batch", "group"])
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--quantizer", default="vq", help="a name registered in unified_vlm.registry.QUANTIZERS")
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--codebook-dim", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--edge-weight", type=float, default=0.5)
    parser.add_argument("--detail-weight", type=float, default=40.0, help="extra loss weight on thin details (hands, icons)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision; bf16-mixed is ~2x faster on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (use 1 on a CPU busy with other work)")
    parser.add_argument("--no-progress-bar", action="store_true")
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "train-vq":  # tolerate being handed the subcommand name too
        argv = argv[1:]
    args = parser.parse_args(argv)

    _, metrics = train_vq_tokenizer(
        args.out,
        max_minutes=args.minutes,
        max_steps=args.max_steps,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_train=args.num_train,
        seed=args.seed,
        precision=args.precision,
        progress_bar=not args.no_progress_bar,
        threads=args.threads,
        channels=args.channels,
        num_res_blocks=args.num_res_blocks,
        norm=args.norm,
        latent_dim=args.latent_dim,
        quantizer=args.quantizer,
        codebook_size=args.codebook_size,
        codebook_dim=args.codebook_dim,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        edge_weight=args.edge_weight,
        detail_weight=args.detail_weight,
    )
    print(
        f"saved VQ tokenizer to {args.out} after {int(metrics['steps'])} steps: "
        f"val PSNR {metrics['val/psnr']:.2f} dB, codebook usage {metrics['val/codebook_usage']:.1%}, "
        f"perplexity {metrics['val/perplexity']:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
