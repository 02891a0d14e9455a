"""``python -m unified_vlm train-feature-decoder``: train a pixel decoder for frozen continuous features.

The decoder itself (:class:`~unified_vlm.models.feature_decoder.FeatureDecoder`, and why it
normalises its input) is a model part; this job trains one on rendered watches and saves it
atomically to a directory that ``image_output.renderer`` accepts.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_vlm.models.feature_decoder import (
    INPUT_NORMS,
    FeatureDecoder,
    FeatureDecoderConfig,
    encode_watches,
    normalize_tokens,
    watch_images,
)
from unified_vlm.models.part_files import CONFIG_NAME, WEIGHTS_NAME
from unified_vlm.pretraining.common import (
    BudgetCosine,
    adamw_without_norm_decay,
    budget_trainer,
    check_out_dir,
    save_dir_atomically,
    torch_threads,
)

OWNED_FILES = {CONFIG_NAME, WEIGHTS_NAME}  # all a saved decoder directory holds

class FeatureDecoderModule(L.LightningModule):
    """Trains a :class:`FeatureDecoder` to reconstruct watches from a frozen encoder's features.

    Loss: detail-weighted L1 + ``mse_weight`` x MSE + ``edge_weight`` x edge loss (the pixel
    losses of the VQ tokenizer, ``pretraining/train_vq.py``; ``detail_weight=0``, ``edge_weight=0`` give plain
    L1 + MSE). PSNR (on clamped outputs) is logged, not optimised. ``feature_noise`` adds
    Gaussian noise of that RMS to the normalised features during training (1.0 = the features'
    own RMS; 0.3 keeps a cosine of about 0.96 with the clean token), a knob for robustness to
    imperfect regressions. The encoder stays frozen and in eval mode.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_config: FeatureDecoderConfig | dict | None = None,
        lr: float = 1e-3,
        warmup_steps: int = 50,
        weight_decay: float = 0.0,
        mse_weight: float = 1.0,
        edge_weight: float = 0.5,
        detail_weight: float = 40.0,
        feature_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if decoder_config is None:
            decoder_config = FeatureDecoderConfig(
                num_tokens=encoder.num_tokens, feature_dim=encoder.feature_dim, image_size=encoder.image_size
            )
        elif isinstance(decoder_config, dict):
            decoder_config = FeatureDecoderConfig.from_dict(decoder_config)
        self.save_hyperparameters({"decoder_config": asdict(decoder_config), "lr": lr, "warmup_steps": warmup_steps,
                                   "weight_decay": weight_decay, "mse_weight": mse_weight, "edge_weight": edge_weight,
                                   "detail_weight": detail_weight, "feature_noise": feature_noise})
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.decoder = FeatureDecoder(decoder_config)
        self.decoder.check_encoder(encoder)  # token count and width (no probe recorded yet)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.encoder(images.float()).float()

    @torch.no_grad()
    def fit_input_stats(self, images: Tensor) -> None:
        self.decoder.fit_input_stats(encode_watches(self.encoder, images))

    def compute_loss(self, images: Tensor, features: Tensor | None = None, noise: float = 0.0) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(loss, parts incl. psnr, reconstruction) for images (B, 3, S, S) in [0, 1]."""
        from unified_vlm.pretraining.train_vq import detail_weights, edge_loss

        feats = self.features(images) if features is None else features
        if noise > 0:
            feats = normalize_tokens(feats, self.decoder.config.input_norm)
            feats = feats + noise * torch.randn_like(feats)
        size = self.decoder.image_size
        target = images.float()
        if target.shape[-1] != size:
            target = F.interpolate(target, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        recon = self.decoder(feats).float()
        weights = detail_weights(target, self.hparams.detail_weight)
        weights = weights / weights.mean()
        parts = {
            "l1": (weights * (recon - target).abs()).mean(),
            "mse": (weights * (recon - target).square()).mean(),
            "edge": edge_loss(recon, target),
        }
        loss = parts["l1"] + self.hparams.mse_weight * parts["mse"] + self.hparams.edge_weight * parts["edge"]
        plain_mse = F.mse_loss(recon.detach().clamp(0, 1), target)
        parts["psnr"] = 10 * torch.log10(1.0 / plain_mse.clamp_min(1e-10))
        return loss, parts, recon

    def training_step(self, images: Tensor, batch_idx: int) -> Tensor:
        if not bool(self.decoder.input_stats_fitted):  # fallback; train_feature_decoder fits beforehand
            self.decoder.fit_input_stats(self.features(images))
        loss, parts, _ = self.compute_loss(images, noise=self.hparams.feature_noise)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/psnr", parts.pop("psnr"), prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        return loss

    def validation_step(self, images: Tensor, batch_idx: int) -> None:
        loss, parts, _ = self.compute_loss(images)
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/psnr", parts["psnr"], prog_bar=True, sync_dist=True)
        self.log("val/l1", parts["l1"], sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = adamw_without_norm_decay(self.decoder.parameters(), self.hparams.lr, self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, BudgetCosine(self, self.hparams.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_encoder(encoder: str | os.PathLike | nn.Module | dict | Any, encoder_name: str = "siglip",
                 **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """An encoder module and a description of it, from ``builtin``, a local weights dir, a spec
    (``EncoderSpec`` or its dict) or a module. ``options`` (feature_select, feature_layer, ...) go
    to the encoder factory; None values are dropped (the weights dir's saved options apply)."""
    from unified_vlm.models.builders import build_encoder
    from unified_vlm.models.config import EncoderSpec, coerce
    from unified_vlm.models.encoders import HFVisionEncoder

    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(encoder, nn.Module):
        if options:
            raise ValueError(f"encoder options {sorted(options)} cannot be applied to an already built encoder")
        module, spec = encoder, {"name": type(encoder).__name__}
    else:
        if isinstance(encoder, (str, os.PathLike)):
            spec = EncoderSpec(name=encoder_name, weights=str(encoder), options=dict(options))
        else:
            spec = coerce(EncoderSpec, encoder)
            spec = dataclasses.replace(spec, options={**spec.options, **options})
        module = build_encoder(spec)
        spec = {"name": spec.name, "weights": spec.weights, "options": dict(spec.options)}
    if isinstance(module, HFVisionEncoder):
        spec.update(module.options())
    spec.update(num_tokens=module.num_tokens, feature_dim=module.feature_dim, image_size=module.image_size)
    return module.requires_grad_(False).eval(), spec


def train_feature_decoder(
    encoder_spec_or_dir: str | os.PathLike | nn.Module | dict | Any = "builtin",
    out_dir: str | None = None,
    minutes: float = 5.0,
    *,
    encoder_name: str = "siglip",
    feature_select: str | None = None,
    feature_layer: int | None = None,
    image_size: int | None = None,
    max_steps: int = -1,
    batch_size: int = 32,
    num_train: int = 20000,
    num_val: int = 256,
    stats_images: int = 256,
    seed: int = 0,
    precision: str = "bf16-mixed",
    accelerator: str = "auto",
    threads: int | None = None,
    progress_bar: bool = True,
    overwrite: bool = True,
    decoder_kwargs: dict[str, Any] | None = None,
    **module_kwargs: Any,
) -> tuple[FeatureDecoder, dict[str, float]]:
    """Train a decoder for ``minutes`` (or ``max_steps``) on watch images, validate, save to ``out_dir``.

    ``encoder_spec_or_dir``: ``builtin``, a local weights dir (of ``encoder_name``), an
    ``EncoderSpec``/dict, or an encoder module; ``feature_select`` / ``feature_layer`` override the
    saved reading options (not for a module). ``image_size`` = output side (default: the
    encoder's input size). ``decoder_kwargs`` go to :class:`FeatureDecoderConfig`, the rest to
    :class:`FeatureDecoderModule`. Returns the decoder (CPU, eval) and the final validation metrics.
    """
    from unified_vlm.pretraining.train_vq import WatchImageDataModule

    with torch_threads(threads):
        if out_dir is not None:
            check_out_dir(out_dir, overwrite, OWNED_FILES)
        encoder, encoder_info = load_encoder(encoder_spec_or_dir, encoder_name, feature_select=feature_select,
                                             feature_layer=feature_layer)
        size = int(image_size or encoder.image_size)
        config = FeatureDecoderConfig(**{"num_tokens": encoder.num_tokens, "feature_dim": encoder.feature_dim,
                                         "image_size": size, **(decoder_kwargs or {})})
        module_kwargs.setdefault("warmup_steps", 50)
        L.seed_everything(seed, workers=True)
        module = FeatureDecoderModule(encoder, config, **module_kwargs)
        module.fit_input_stats(watch_images(min(stats_images, num_train), size, "train", seed))
        module.decoder.record_probe(encoder)
        data = WatchImageDataModule(size, num_train, num_val, seed, batch_size)
        trainer = budget_trainer(minutes, max_steps, precision, accelerator, progress_bar)
        trainer.fit(module, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()}
        metrics["steps"] = float(trainer.global_step)
        decoder = module.decoder.cpu().eval()
        if out_dir is not None and trainer.is_global_zero:
            info = {"encoder": encoder_info, "metrics": metrics,
                    "train": {"minutes": minutes, "batch_size": batch_size, "seed": seed, **module_kwargs}}
            save_dir_atomically(lambda tmp: decoder.save_pretrained(tmp, **info), out_dir, "feature_decoder",
                                overwrite, OWNED_FILES)
        return decoder, metrics


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unified_vlm train-feature-decoder --encoder builtin --feature-select patch --out DIR --minutes 5``:
    train a pixel decoder for a frozen encoder's features, save it, print the validation PSNR."""
    p = argparse.ArgumentParser(prog="python -m unified_vlm train-feature-decoder", description=main.__doc__)
    p.add_argument("--encoder", default="builtin", help="builtin, or a local encoder weights directory")
    p.add_argument("--encoder-name", default="siglip", help="registered encoder that reads --encoder (default siglip)")
    p.add_argument("--feature-select", default=None, help="encoder token selection (default: the weights dir's saved one)")
    p.add_argument("--feature-layer", type=int, default=None, help="encoder layer (default: the weights dir's saved one)")
    p.add_argument("--out", required=True, help="directory to write config.json + model.safetensors into")
    p.add_argument("--overwrite", action="store_true", help="replace an existing decoder directory")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: time only)")
    p.add_argument("--image-size", type=int, default=None, help="output side (default: the encoder's input size)")
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--max-channels", type=int, default=128)
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--input-norm", default="l2", choices=INPUT_NORMS, help="per-token input normalisation (l2: see module doc)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--mse-weight", type=float, default=1.0)
    p.add_argument("--edge-weight", type=float, default=0.5)
    p.add_argument("--detail-weight", type=float, default=40.0, help="extra L1/MSE weight on thin details (hands, icons)")
    p.add_argument("--feature-noise", type=float, default=0.0, help="training noise on the normalised features")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-val", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (use 1 on a CPU busy with other work)")
    p.add_argument("--no-progress-bar", action="store_true")
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "train-feature-decoder":
        argv = argv[1:]
    a = p.parse_args(argv)
    _, metrics = train_feature_decoder(
        a.encoder, a.out, a.minutes, encoder_name=a.encoder_name, feature_select=a.feature_select,
        feature_layer=a.feature_layer, image_size=a.image_size, max_steps=a.max_steps, batch_size=a.batch_size,
        num_train=a.num_train, num_val=a.num_val, seed=a.seed, precision=a.precision, threads=a.threads,
        progress_bar=not a.no_progress_bar, overwrite=a.overwrite,
        decoder_kwargs={"base_channels": a.base_channels, "max_channels": a.max_channels,
                        "num_res_blocks": a.num_res_blocks, "input_norm": a.input_norm},
        lr=a.lr, warmup_steps=a.warmup_steps, mse_weight=a.mse_weight, edge_weight=a.edge_weight,
        detail_weight=a.detail_weight, feature_noise=a.feature_noise,
    )
    print(f"saved feature decoder to {a.out} after {int(metrics['steps'])} steps: "
          f"val PSNR {metrics.get('val/psnr', float('nan')):.2f} dB, val L1 {metrics.get('val/l1', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
