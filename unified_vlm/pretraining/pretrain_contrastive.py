"""SigLIP-style sigmoid-contrastive pretraining of the watch encoder on (watch image, caption) pairs.

A download-free alternative to the supervised attribute pretraining of ``pretraining/pretrain_encoder.py``:
the vision tower is the same ``SiglipEncoder`` (same options and defaults, ``feature_select=
"pooled+patch"``), so the saved directory is a drop-in ``encoder.weights`` for any config.

- Data: train watch ``i`` (a fresh watch per sample) rendered at ``image_size`` and its text
  from the data engine (``WatchStream``): the caption record's answer ("caption"), the
  generation prompt's description ("generation"), or, by watch parity, both ("both").
  Deterministic per watch index. Tokenized with the builtin watch BPE, EOS appended, right-padded
  to ``max_text_len`` (SigLIP pads to a fixed length and pools the last position).
- Model: image = the tower's attention-pooled token; text = a tiny ``SiglipTextModel`` (its
  pooler: last position, then a linear head to the image width). Learnable t' (init log 10) and
  b (init -10), t = exp(t') (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training").
- Loss (:func:`sigmoid_contrastive_loss`): the paper's Eq./Algorithm 1, normalised as the paper
  does, by the batch size |B| (a sum over all |B|^2 pairs divided by |B|, i.e. |B| times the
  mean over all pairs). Under AdamW the constant factor hardly matters; the paper's scaling keeps
  the positive term (about 10 at init) at the same size for every batch size.
- Duplicate captions: a batch can hold two watches with the very same text (the time is always
  mentioned to the second, so this is rare: about B^2 / 2 / 43200 pairs per batch share even
  the time). Such a text describes both images equally, so treating the pair as a negative would
  be label noise: identical token sequences are marked positive (``mask_duplicate_captions``).
  Semantic false negatives (different texts that are both true of an image, e.g. one omits the
  weather) are not detected; they need the same time to the second, so they are just as rare.
- Validation, on a gallery of the first ``val_size`` "val" watches: image->text and text->image
  top-1 retrieval (a hit when the retrieved caption is the same text), and zero-shot weather
  accuracy against class embeddings averaged over the template phrasings ("... showing sunny
  weather." etc., with the bases of the chosen text source).

``python -m unified_vlm pretrain-contrastive --out DIR --minutes 6`` trains and saves the vision
tower (``SiglipEncoder.save_pretrained``) plus, in ``DIR/text_tower``, the text tower, tokenizer
and t/b, written to a temp dir beside ``DIR`` and renamed into place.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from unified_vlm.datamodules.streams import WatchStream
from unified_vlm.datamodules.templates import CAPTION_BASES, CLAUSES, GENERATION_REQUESTS, postprocess
from unified_vlm.datamodules.watch import WEATHERS
from unified_vlm.pretraining.common import (
    ThreadTuner,
    check_out_dir,
    cosine_with_warmup,
    fastest_thread_count,
    save_dir_atomically,
    seconds_per_step,
    steps_for_minutes,
    torch_threads,
)
from unified_vlm.registry import ENCODERS

log = logging.getLogger(__name__)

TEXT_SOURCES = ("caption", "generation", "both")
TEXT_TOWER_DIR = "text_tower"
TEXT_TOWER_FILE = "contrastive.json"


# ----------------------------------------------------------------------------------- text
@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str = "builtin"):
    """The watch BPE (``builtin``) or a saved tokenizer dir; cached, it is only read."""
    from unified_vlm.models.builders import build_text_tokenizer

    return build_text_tokenizer(path)


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """(ids, attention_mask), both (N, max_len): text tokens (truncated to max_len - 1) + EOS, right-padded."""
    if max_len < 2:
        raise ValueError(f"max_text_len must be at least 2 (a token and EOS), got {max_len}")
    ids = torch.full((len(texts), max_len), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), max_len), dtype=torch.long)
    for row, text in enumerate(texts):
        seq = tokenizer(text, add_special_tokens=False)["input_ids"][: max_len - 1] + [tokenizer.eos_token_id]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def watch_source(text_source: str, watch: int) -> str:
    if text_source not in TEXT_SOURCES:
        raise ValueError(f"text_source must be one of {TEXT_SOURCES}, got {text_source!r}")
    if text_source == "both":
        return "caption" if watch % 2 == 0 else "generation"
    return text_source


def weather_prompts(text_source: str) -> dict[str, list[str]]:
    """Per weather, the template texts "<base>, <weather clause>." for the bases of ``text_source``."""
    bases = {"caption": CAPTION_BASES, "generation": GENERATION_REQUESTS, "both": CAPTION_BASES + GENERATION_REQUESTS}
    phrasings = CLAUSES["weather"][1]
    return {w: [postprocess(f"{b}, {p.format(weather=w)}") for b in bases[text_source] for p in phrasings] for w in WEATHERS}


# ----------------------------------------------------------------------------------- data
def record_text(task: str, conversations: list[dict]) -> str:
    """A caption record's answer, or a generation record's prompt (the watch description)."""
    return conversations[1]["value"] if task == "caption" else conversations[0]["value"]


class WatchCaptionDataset(Dataset):
    """(image in [0, 1], padded caption ids) of watches ``0..length-1`` of one split, rendered on the fly."""

    def __init__(self, tokenizer, split: str, length: int, image_size: int = 64, text_source: str = "caption",
                 max_text_len: int = 64, seed: int = 0) -> None:
        watch_source(text_source, 0)  # validates
        self.tokenizer, self.length, self.text_source, self.max_text_len = tokenizer, length, text_source, max_text_len
        self.streams = {task: WatchStream(split, max(1, length), seed, image_size, tasks=(task,))
                        for task in ("caption", "generation")}

    def __len__(self) -> int:
        return self.length

    def text(self, watch: int) -> str:
        """The text of ``watch``, without rendering it."""
        record = self.streams[watch_source(self.text_source, watch)].record(watch)
        return record_text(record["task"], record["conversations"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"item {index} out of range for {self.length} items")
        item = self.streams[watch_source(self.text_source, index)][index]
        ids, mask = tokenize(self.tokenizer, [record_text(item["task"], item["conversations"])], self.max_text_len)
        pixels = np.asarray(item["image"], dtype=np.uint8)
        return {
            "image": torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255,
            "input_ids": ids[0],
            "attention_mask": mask[0],
            "weather": torch.tensor(WEATHERS.index(item["attributes"]["weather"])),
            "watch": torch.tensor(index),
        }


class WatchCaptionDataModule(L.LightningDataModule):
    """Train: a fresh watch every sample (``train_samples`` long); val: the first ``val_size`` "val" watches."""

    def __init__(self, tokenizer="builtin", image_size: int = 64, batch_size: int = 64, train_samples: int = 10_000_000,
                 val_size: int = 256, text_source: str = "caption", max_text_len: int = 64, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        watch_source(text_source, 0)

    def dataset(self, split: str, length: int) -> WatchCaptionDataset:
        h = self.hparams
        return WatchCaptionDataset(self.tokenizer, split, length, h.image_size, h.text_source, h.max_text_len, h.seed)

    def _loader(self, split: str, length: int) -> DataLoader:
        h = self.hparams
        return DataLoader(self.dataset(split, length), batch_size=h.batch_size, num_workers=h.num_workers,
                          persistent_workers=h.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.train_samples)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.val_size)


# ---------------------------------------------------------------------------------- model
def sigmoid_contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                             positives: Tensor | None = None) -> Tensor:
    """SigLIP: -1/|B| sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)), t = exp(logit_scale), x, y l2-normalised.

    ``positives`` (B, B) bool marks z_ij = +1 (default: the diagonal); everything else is -1.
    Computed in float32 even under autocast.
    """
    with torch.autocast(image_features.device.type, enabled=False):
        x = F.normalize(image_features.float(), dim=-1)
        y = F.normalize(text_features.float(), dim=-1)
        logits = logit_scale.float().exp() * x @ y.T + logit_bias.float()
        if positives is None:
            positives = torch.eye(len(x), dtype=torch.bool, device=x.device)
        z = positives.float() * 2 - 1
        return -F.logsigmoid(z * logits).sum() / len(x)


def same_text(input_ids: Tensor) -> Tensor:
    """(B, B) bool: whether texts i and j are the same token sequence (padding included)."""
    return (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)


class SigmoidContrastiveModule(L.LightningModule):
    """A SigLIP vision tower and a tiny SigLIP text tower trained with the sigmoid loss (module docstring)."""

    def __init__(
        self,
        encoder: str = "siglip",
        image_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int = 512,
        text_hidden_size: int = 128,
        text_layers: int = 2,
        text_heads: int = 4,
        text_intermediate_size: int = 512,
        max_text_len: int = 64,
        tokenizer: str = "builtin",
        text_source: str = "caption",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 200,
        max_steps: int = 5000,
        init_logit_scale: float = math.log(10),
        init_logit_bias: float = -10.0,
        mask_duplicate_captions: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import SiglipTextConfig, SiglipTextModel

        watch_source(text_source, 0)
        self.encoder = ENCODERS.create(
            encoder, image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, intermediate_size=intermediate_size, feature_layer=-1,
            feature_select="pooled+patch",  # saved as the default reading, as the supervised pretraining does
        )
        if not hasattr(self.encoder, "encode"):
            raise ValueError(f"encoder {encoder!r} has no pooled encode(); contrastive pretraining supports 'siglip'")
        self.tokenizer = load_tokenizer(tokenizer)
        self.text_tower = SiglipTextModel(SiglipTextConfig(
            vocab_size=len(self.tokenizer), hidden_size=text_hidden_size, intermediate_size=text_intermediate_size,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=max_text_len,
            pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id, projection_size=self.encoder.feature_dim,
            attn_implementation="eager",
        ))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self._val: list[dict[str, Tensor]] = []

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, D) pooled image features (not normalised)."""
        return self.encoder.encode(images)["pooled"]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, D) pooled text features (not normalised): the last position, through the text head."""
        return self.text_tower(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def positives(self, batch: dict[str, Tensor]) -> Tensor | None:
        return same_text(batch["input_ids"]) if self.hparams.mask_duplicate_captions else None

    def losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        image = self.encode_image(batch["image"])
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = sigmoid_contrastive_loss(image, text, self.logit_scale, self.logit_bias, self.positives(batch))
        return loss, (image, text)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self.losses(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/t", self.logit_scale.exp())
        self.log("train/b", self.logit_bias)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, (image, text) = self.losses(batch)
        self.log("val/loss", loss, batch_size=len(image), prog_bar=True)
        self._val.append({"image": image.float(), "text": text.float(), "ids": batch["input_ids"], "weather": batch["weather"]})

    @torch.no_grad()
    def weather_text_features(self) -> Tensor:
        """(3, D) l2-normalised class embeddings, each the mean over the class's template phrasings."""
        prompts = weather_prompts(self.hparams.text_source)
        ids, mask = tokenize(self.tokenizer, [t for w in WEATHERS for t in prompts[w]], self.hparams.max_text_len)
        feats = F.normalize(self.encode_text(ids.to(self.device), mask.to(self.device)).float(), dim=-1)
        return F.normalize(feats.view(len(WEATHERS), -1, feats.shape[-1]).mean(1), dim=-1)

    def retrieval_metrics(self, image: Tensor, text: Tensor, ids: Tensor, weather: Tensor) -> dict[str, Tensor]:
        """Top-1 image->text and text->image retrieval over the whole gallery (same text counts as a hit),
        and zero-shot weather accuracy."""
        x, y = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        sim = x @ y.T
        same = same_text(ids)
        rows = torch.arange(len(x), device=x.device)
        zero_shot = (x @ self.weather_text_features().T).argmax(-1)
        return {
            "i2t_top1": same[rows, sim.argmax(1)].float().mean(),
            "t2i_top1": same[sim.argmax(0), rows].float().mean(),
            "zeroshot_weather": (zero_shot == weather).float().mean(),
        }

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        cat = {k: torch.cat([v[k] for v in self._val]) for k in self._val[0]}
        self._val = []
        for name, value in self.retrieval_metrics(cat["image"], cat["text"], cat["ids"], cat["weather"]).items():
            self.log(f"val/{name}", value)
        self.log("val/gallery", float(len(cat["image"])))
        self.log("val/t", self.logit_scale.exp())
        self.log("val/b", self.logit_bias)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]  # incl. t' and b
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.98),
        )
        h = self.hparams
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, h.warmup_steps, h.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def save_text_tower(self, directory: str | Path) -> None:
        """The text tower, its tokenizer and t, b (for zero-shot use) in ``directory``."""
        directory = Path(directory)
        self.text_tower.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        info = {"logit_scale": self.logit_scale.item(), "logit_bias": self.logit_bias.item(),
                "max_text_len": self.hparams.max_text_len, "text_source": self.hparams.text_source}
        (directory / TEXT_TOWER_FILE).write_text(json.dumps(info, indent=2))


def load_text_tower(directory: str | Path):
    """(SiglipTextModel, tokenizer, info dict with logit_scale/logit_bias/max_text_len) saved by ``pretrain_contrastive``."""
    from transformers import SiglipTextModel

    from unified_vlm.text_tokenizer import load_text_tokenizer

    directory = Path(directory)
    if not (directory / TEXT_TOWER_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no contrastive text tower ({TEXT_TOWER_FILE} is missing)")
    info = json.loads((directory / TEXT_TOWER_FILE).read_text())
    return SiglipTextModel.from_pretrained(str(directory), attn_implementation="eager"), load_text_tokenizer(directory), info


# ------------------------------------------------------------------------------- training
def save_contrastive(module: SigmoidContrastiveModule, directory: str | Path, render_size: int | None = None,
                     pretrain: dict | None = None) -> None:
    """The vision tower with ``SiglipEncoder.save_pretrained`` (a drop-in ``encoder.weights`` dir; ``pretrain``
    notes saved with its options) and the text tower in ``directory/text_tower``."""
    module.encoder.save_pretrained(str(directory), render_size=render_size or module.hparams.image_size,
                                   pretrain={"objective": "sigmoid_contrastive", **(pretrain or {})})
    module.save_text_tower(Path(directory) / TEXT_TOWER_DIR)


def pretrain_contrastive(
    out_dir: str,
    minutes: float | None = 6.0,
    max_steps: int | None = None,
    batch_size: int = 64,
    image_size: int = 64,
    threads: int | None = None,
    seed: int = 0,
    val_size: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    log_dir: str | None = None,
    precision: str = "bf16-mixed",
    **module_kwargs,
) -> dict[str, float]:
    """Train for about ``minutes`` (or ``max_steps``; both: whichever ends first), save the vision tower to
    ``out_dir`` with ``save_pretrained`` (hparams and validation metrics in its json; the text tower in
    ``out_dir/text_tower``), atomically: everything is written to a temp dir beside ``out_dir`` and renamed.

    Without ``max_steps`` the step count comes from timing a few steps (so the cosine schedule ends on
    time). ``threads`` fixes torch's thread count; None measures all vs 1 thread and keeps re-checking
    (``ThreadTuner``). CSV logs go to ``log_dir``, default ``out_dir/pretrain_logs``. Returns the metrics.
    """
    if minutes is None and max_steps is None:
        raise ValueError("give minutes, max_steps or both")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    out = check_out_dir(out_dir, overwrite)
    metrics: dict[str, float] = {}

    def write(tmp_dir: str) -> None:
        nonlocal threads, max_steps
        tmp = Path(tmp_dir)
        threads_before = torch.get_num_threads()
        data_kwargs = {"image_size": image_size, "batch_size": batch_size, "val_size": val_size, "seed": seed,
                       "text_source": module_kwargs.get("text_source", "caption"),
                       "max_text_len": module_kwargs.get("max_text_len", 64)}
        warmup_steps = module_kwargs.pop("warmup_steps", 200)
        L.seed_everything(seed, workers=True)
        probe = SigmoidContrastiveModule(image_size=image_size, **module_kwargs)
        tokenizer = probe.tokenizer
        probe_data = WatchCaptionDataModule(tokenizer, **data_kwargs)
        tune = threads is None
        if tune:
            threads, step_s = fastest_thread_count(lambda batch: probe.losses(batch)[0], probe_data.train_dataloader())
        else:
            torch.set_num_threads(threads)
            step_s = (seconds_per_step(lambda batch: probe.losses(batch)[0], probe_data.train_dataloader())
                      if max_steps is None else float("nan"))
        if max_steps is None:
            max_steps = steps_for_minutes(minutes, step_s)
        probe = probe_data = None  # free the throughput probe before the real module is built
        L.seed_everything(seed, workers=True)
        module = SigmoidContrastiveModule(image_size=image_size, max_steps=max_steps,
                                          warmup_steps=min(warmup_steps, max_steps // 5), **module_kwargs)
        data = WatchCaptionDataModule(tokenizer, train_samples=max_steps * batch_size, **data_kwargs)
        log.info("%.3f s/step with %d thread(s): training %d steps of batch %d", step_s, threads, max_steps, batch_size)
        tuner = [ThreadTuner(threads=threads_before)] if tune else []
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision=precision, max_steps=max_steps, max_epochs=1,
            max_time={"minutes": minutes * 1.05} if minutes is not None else None,
            val_check_interval=max(1, max_steps // 3), check_val_every_n_epoch=None, num_sanity_val_steps=0,
            logger=CSVLogger(log_dir or str(tmp / "pretrain_logs"), name="", version=""),
            enable_checkpointing=False, callbacks=tuner,
            enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=min(25, max_steps),
            default_root_dir=str(tmp),
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        metrics.update({k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()})
        metrics.update(train_minutes=(time.perf_counter() - start) / 60, steps=trainer.global_step, threads=threads)
        hparams = {**module.hparams, "batch_size": batch_size, "seed": seed,
                   "precision": precision}
        save_contrastive(module, tmp, render_size=image_size, pretrain={"hparams": hparams, "val": metrics})

    with torch_threads(None):  # restores the thread count the tuner changes
        save_dir_atomically(write, out, "contrastive", overwrite)
    return metrics


CHANCE = {"val/i2t_top1": lambda m: 1 / m.get("val/gallery", float("nan")),
          "val/t2i_top1": lambda m: 1 / m.get("val/gallery", float("nan")),
          "val/zeroshot_weather": lambda m: 1 / len(WEATHERS)}


def format_table(metrics: dict[str, float]) -> str:
    """The validation metrics next to chance, then loss, t, b, steps and time."""
    lines = [f"{'metric':<20}{'value':>10}{'chance':>10}"]
    for key, chance in CHANCE.items():
        if key in metrics:
            lines.append(f"{key.removeprefix('val/'):<20}{metrics[key]:>10.3f}{chance(metrics):>10.3f}")
    extra = {k: metrics[k] for k in ("val/loss", "val/t", "val/b", "val/gallery", "steps", "train_minutes", "threads")
             if k in metrics}
    lines.append("  ".join(f"{k}={v:.4g}" for k, v in extra.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unified_vlm pretrain-contrastive --out DIR --minutes 6 --image-size 64 ...``"""
    p = argparse.ArgumentParser(prog="unified_vlm pretrain-contrastive", description=main.__doc__)
    p.add_argument("--out", required=True, help="output weights directory (SiglipEncoder save_pretrained layout)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default 6 without --max-steps)")
    p.add_argument("--max-steps", type=int, default=None, help="step count (default: what fits in --minutes)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--text-hidden-size", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--text-intermediate-size", type=int, default=512)
    p.add_argument("--max-text-len", type=int, default=64)
    p.add_argument("--text-source", choices=TEXT_SOURCES, default="caption",
                   help="caption answer, generation prompt, or both (alternating by watch)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--no-duplicate-mask", action="store_true", help="treat identical captions as negatives")
    p.add_argument("--val-size", type=int, default=256, help="retrieval gallery: the first N val watches")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: measure all vs 1)")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="CSV training logs (default: OUT/pretrain_logs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    for name in ("minutes", "max_steps", "batch_size", "image_size", "val_size", "threads"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if a.image_size % a.patch_size:
        p.error(f"--image-size {a.image_size} is not a multiple of --patch-size {a.patch_size}")
    try:
        check_out_dir(a.out, a.overwrite)
    except FileExistsError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    metrics = pretrain_contrastive(
        a.out, minutes=6.0 if a.minutes is None and a.max_steps is None else a.minutes, max_steps=a.max_steps,
        batch_size=a.batch_size, image_size=a.image_size, threads=a.threads, seed=a.seed, val_size=a.val_size,
        overwrite=a.overwrite, progress=not a.no_progress, log_dir=a.log_dir, precision=a.precision,
        patch_size=a.patch_size, hidden_size=a.hidden_size, num_layers=a.num_layers, num_heads=a.num_heads,
        intermediate_size=a.intermediate_size, text_hidden_size=a.text_hidden_size, text_layers=a.text_layers,
        text_heads=a.text_heads, text_intermediate_size=a.text_intermediate_size, max_text_len=a.max_text_len,
        text_source=a.text_source, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        mask_duplicate_captions=not a.no_duplicate_mask,
    )
    print(format_table(metrics))
    print(f"saved to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
