"""``python -m unified_vlm train-reader``: train the watch reader on rendered watches only.

Every step renders a fresh batch of the ``reader-train`` split at one random square size
(64 and 224 px most often), then degrades part of it the way generators do: a round trip
through the shipped VQ tokenizer (the artefacts of VQ-output models), blur, colour noise,
JPEG compression and a small shift/zoom. About one picture in eight is a non-watch (flat
colour, random shapes, a face without hands, corners without a face, shuffled tiles), which
trains the is-watch output. Accuracy is measured on clean renders of ``reader-val`` during
training and reported at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from unified_vlm.datamodules.watch import (
    BACKGROUND,
    CORNERS,
    DEFAULT_STYLE,
    STYLE_CHOICES,
    WatchStyle,
    face_geometry,
    render_watch,
    sample_watch,
    style_setting,
    style_variations,
)
from unified_vlm.evaluation.reader import CORNER_CLASSES, WatchReader, WatchReaderConfig, hand_columns, reader_accuracy
from unified_vlm.pretraining.common import cosine_with_warmup

log = logging.getLogger(__name__)

TRAIN_SPLIT = "reader-train"
VAL_SPLIT = "reader-val"


@dataclass
class ReaderTrainConfig:
    """What ``train-reader`` does; every option is a ``--flag`` of the command."""

    out: str = ""
    minutes: float = 20.0  # wall-time budget; the cosine schedule is sized from measured step time
    max_steps: int = 0  # > 0: train exactly this many steps instead of a time budget
    batch_size: int = 48
    lr: float = 2e-3
    weight_decay: float = 0.02
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 1
    sizes: tuple[int, ...] = (64, 224, 48, 96, 128, 160, 256)
    size_weights: tuple[float, ...] = (0.4, 0.3, 0.06, 0.06, 0.06, 0.06, 0.06)
    negative_fraction: float = 0.12
    vq_fraction: float = 0.15  # share of a batch round-tripped through the VQ tokenizer
    vq_tokenizer: str = "builtin"  # "none" disables the VQ augmentation
    blur_fraction: float = 0.3
    noise_fraction: float = 0.4
    jpeg_fraction: float = 0.15
    jitter_fraction: float = 0.4
    val_size: int = 200  # per size (64 and 224), clean renders of reader-val
    val_every: int = 500
    precision: str = "auto"  # "bf16" autocast, "32", or "auto": bf16 only where the CPU has native bf16
    style_fraction: float = 0.0  # share of watches drawn in a random style (each WatchStyle field drawn alone)
    hold_out: tuple[str, ...] = ()  # style settings never drawn in training, e.g. icons=paper (reported apart)
    reader: WatchReaderConfig = field(default_factory=WatchReaderConfig)


HELP = {
    "minutes": "wall-time budget; the cosine schedule is sized from the measured step time",
    "max_steps": "> 0: train exactly this many steps instead of a time budget",
    "batch_size": "watches per step",
    "threads": "torch CPU threads (1 on a shared machine)",
    "sizes": "comma list of square render sizes drawn per step",
    "size_weights": "comma list of their probabilities",
    "negative_fraction": "share of non-watch pictures (trains is_watch)",
    "vq_fraction": "share of a batch round-tripped through the VQ tokenizer",
    "vq_tokenizer": "VQ tokenizer for that augmentation: builtin, a directory, or none",
    "blur_fraction": "share blurred (sigma 0.2-0.8 px at 64 px, scaled with size)",
    "noise_fraction": "share with colour gain/offset and pixel noise",
    "jpeg_fraction": "share JPEG-compressed (quality 30-90)",
    "jitter_fraction": "share shifted (<= 1.5 %%) and zoomed (<= 3 %%)",
    "val_size": "clean reader-val watches per size (64 and 224) for the final accuracy",
    "val_every": "steps between interim accuracy checks (100 watches per size); 0: none",
    "precision": "auto (bf16 only with native CPU bf16), bf16 or 32",
    "style_fraction": "share of watches drawn in a random style (icons, battery colour and bar, font, render; "
                      "each field drawn on its own); 0: the default look only",
    "hold_out": "comma list of style settings never drawn in training (e.g. icons=paper); "
                "the final per-style accuracy marks them held out",
}


def training_style_choices(cfg: ReaderTrainConfig) -> dict[str, tuple[str, ...]]:
    """The values each style field may take in training: all of STYLE_CHOICES less ``hold_out``."""
    held = [style_setting(text) for text in cfg.hold_out]
    choices = {name: tuple(v for v in values if (name, v) not in held) for name, values in STYLE_CHOICES.items()}
    empty = [name for name, values in choices.items() if not values]
    if empty:
        raise ValueError(f"holding out {list(cfg.hold_out)} leaves no value of {empty} to train on")
    return choices


def draw_style(rng: random.Random, choices: dict[str, tuple[str, ...]]) -> WatchStyle:
    return WatchStyle(**{name: rng.choice(values) for name, values in choices.items()})


# ----------------------------------------------------------------------------- negatives
def _negative(rng: random.Random, size: int, index: int) -> Image.Image:
    """A picture that is not a watch (no face disc with hands), five kinds in turn."""
    kind = rng.randrange(5)
    if kind == 0:  # flat colour
        return Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    if kind == 1:  # random shapes
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 6)):
            box = sorted(rng.uniform(0, size) for _ in range(2)), sorted(rng.uniform(0, size) for _ in range(2))
            colour = tuple(rng.randrange(256) for _ in range(3))
            getattr(draw, rng.choice(["ellipse", "rectangle"]))([box[0][0], box[1][0], box[0][1], box[1][1]], fill=colour)
            draw.line([tuple(rng.uniform(0, size) for _ in range(2)) for _ in range(2)], fill=(255, 255, 255),
                      width=max(1, size // 64))
        return image
    attrs = sample_watch(rng.randrange(1 << 30), "reader-negative", index)
    image = render_watch(attrs, size)
    centre, radius = face_geometry(size)
    box = [centre - radius, centre - radius, centre + radius, centre + radius]
    if kind == 2:  # a face without hands
        ImageDraw.Draw(image).ellipse(box, fill=attrs.face_color)
    elif kind == 3:  # corners, no face
        ImageDraw.Draw(image).ellipse(box, fill=BACKGROUND)
    else:  # shuffled 4x4 tiles
        t = size // 4
        tiles = [image.crop((c * t, r * t, c * t + t, r * t + t)) for r in range(4) for c in range(4)]
        rng.shuffle(tiles)
        out = Image.new("RGB", (size, size), BACKGROUND)
        for k, tile in enumerate(tiles):
            out.paste(tile, ((k % 4) * t, (k // 4) * t))
        image = out
    return image


# --------------------------------------------------------------------------- augmentation
def _blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _jitter(x: Tensor, gen: torch.Generator) -> Tensor:
    """Shift by up to 1.5 % and zoom by up to 3 % (white fill): generators place things imprecisely."""
    n = x.shape[0]
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.03
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.03
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1


def _jpeg(x: Tensor, quality: int) -> Tensor:
    arrays = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def _subset(n: int, fraction: float, gen: torch.Generator) -> Tensor:
    return torch.nonzero(torch.rand(n, generator=gen) < fraction).flatten()


def augment(x: Tensor, cfg: ReaderTrainConfig, gen: torch.Generator, vq=None) -> Tensor:
    """Degrade random subsets of ``x`` (N, 3, S, S) in [0, 1] like generator output."""
    n, size = x.shape[0], x.shape[-1]
    x = x.clone()
    idx = _subset(n, cfg.vq_fraction, gen)
    if vq is not None and len(idx):
        with torch.no_grad():
            vq_size = vq.config.image_size
            recon = vq.decode(vq.encode(x[idx]))  # encode resizes to its own size
            if size != vq_size:
                recon = F.interpolate(recon, size=(size, size), mode="bilinear", align_corners=False,
                                      antialias=size < vq_size)
            x[idx] = recon.clamp(0, 1)
    idx = _subset(n, cfg.jitter_fraction, gen)
    if len(idx):
        x[idx] = _jitter(x[idx], gen)
    idx = _subset(n, cfg.blur_fraction, gen)
    if len(idx):
        sigma = float(0.2 + 0.6 * torch.rand(1, generator=gen)) * size / 64
        x[idx] = _blur(x[idx], sigma)
    idx = _subset(n, cfg.noise_fraction, gen)
    if len(idx):
        m = len(idx)
        gain = 1 + (torch.rand(m, 3, 1, 1, generator=gen) * 2 - 1) * 0.05
        offset = (torch.rand(m, 3, 1, 1, generator=gen) * 2 - 1) * 0.04
        std = torch.rand(m, 1, 1, 1, generator=gen) * 0.06
        x[idx] = x[idx] * gain + offset + torch.randn(x[idx].shape, generator=gen) * std
    idx = _subset(n, cfg.jpeg_fraction, gen)
    if len(idx):
        x[idx] = _jpeg(x[idx], int(torch.randint(30, 90, (1,), generator=gen)))
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------- batches
def make_batch(step: int, cfg: ReaderTrainConfig, rng: random.Random) -> dict[str, Tensor]:
    """Fresh renders of ``reader-train`` at one random size, with targets; watch indices never repeat."""
    size = rng.choices(cfg.sizes, weights=cfg.size_weights)[0]
    choices = training_style_choices(cfg) if cfg.style_fraction > 0 else None
    images, targets = [], []
    for k in range(cfg.batch_size):
        index = step * cfg.batch_size + k
        if rng.random() < cfg.negative_fraction:
            images.append(_negative(rng, size, index))
            targets.append(None)
            continue
        attrs = sample_watch(cfg.seed, TRAIN_SPLIT, index)
        style = DEFAULT_STYLE
        if choices is not None and rng.random() < cfg.style_fraction:
            style = draw_style(rng, choices)
        images.append(render_watch(attrs, size, style))
        targets.append(attrs)
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
    is_watch = torch.tensor([t is not None for t in targets])
    pos = [t for t in targets if t is not None]
    corner = torch.zeros(len(pos), len(CORNERS), dtype=torch.long)
    for i, a in enumerate(pos):
        corner[i, CORNERS.index(a.weather_pos)] = CORNER_CLASSES.index(a.weather)
        corner[i, CORNERS.index(a.battery_pos)] = CORNER_CLASSES.index("battery")
    return {
        "image": pixels.float() / 255,
        "is_watch": is_watch,
        "hour": torch.tensor([a.hour % 12 for a in pos], dtype=torch.long),
        "minute": torch.tensor([a.minute for a in pos], dtype=torch.long),
        "second": torch.tensor([a.second for a in pos], dtype=torch.long),
        "corner": corner,
        "battery_corner": torch.tensor([CORNERS.index(a.battery_pos) for a in pos], dtype=torch.long),
        "battery": torch.tensor([a.battery for a in pos], dtype=torch.long),
    }


def losses(reader: WatchReader, batch: dict[str, Tensor], images: Tensor) -> tuple[Tensor, dict[str, float]]:
    out = reader(images)
    pos = batch["is_watch"]
    watch_loss = F.binary_cross_entropy_with_logits(out["watch"], pos.float())
    parts = {"watch": watch_loss}
    if pos.any():
        # per hand, a circular Gaussian (sigma: half a column) around the true angle column
        logits = out["hands"][pos]  # (P, 3, C)
        c = logits.shape[-1]
        target = hand_columns(batch["hour"].float(), batch["minute"].float(), batch["second"].float(), c)
        d = (torch.arange(c)[None, None] - target[..., None]) % c
        d = torch.minimum(d, c - d)
        soft = torch.exp(-0.5 * (d / 0.5) ** 2)
        soft = soft / soft.sum(-1, keepdim=True)
        hand_ce = -(soft * logits.log_softmax(-1)).sum(-1).mean(0)
        for k, name in enumerate(("hour", "minute", "second")):
            parts[name] = hand_ce[k]
        parts["corner"] = F.cross_entropy(out["corner"][pos].flatten(0, 1), batch["corner"].flatten())
        rows = torch.arange(int(pos.sum()))
        logits = out["battery"][pos][rows, batch["battery_corner"]]  # (P, 101)
        soft = torch.exp(-0.5 * ((torch.arange(101)[None] - batch["battery"][:, None]) / 1.0) ** 2)
        parts["battery"] = -(soft / soft.sum(1, keepdim=True) * logits.log_softmax(-1)).sum(-1).mean()
        # the expected percentage, L1 in tenths of points: an ordinal signal the class loss lacks
        expected = (logits.softmax(-1) * torch.arange(101)).sum(-1)
        parts["battery_l1"] = (expected - batch["battery"]).abs().mean() / 10
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: without it a bf16 matmul ran 100x slower than fp32 (docs/machines.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_reader(cfg: ReaderTrainConfig) -> tuple[WatchReader, dict]:
    """Train a reader as ``cfg`` says; returns it (eval mode) and the final validation metrics."""
    from unified_vlm.models.builders import build_vq_tokenizer

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        reader = WatchReader(cfg.reader).to(memory_format=torch.channels_last)
        vq = None if cfg.vq_tokenizer == "none" else build_vq_tokenizer(cfg.vq_tokenizer).eval()
        decay = [p for p in reader.parameters() if p.ndim >= 2]
        no_decay = [p for p in reader.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
        if cfg.precision not in ("auto", "bf16", "32"):
            raise ValueError(f"precision must be auto, bf16 or 32, got {cfg.precision!r}")
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16())
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        total_steps = cfg.max_steps or 10**9
        start = time.perf_counter()
        history = []
        recent: list[tuple[int, float]] = []
        step = 0
        while step < total_steps:
            reader.train()
            batch = make_batch(step, cfg, rng)
            images = augment(batch["image"], cfg, gen, vq)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * cosine_with_warmup(step, cfg.warmup_steps, total_steps, floor=0.02)
            with autocast:
                loss, parts = losses(reader, batch, images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reader.parameters(), 2.0)
            opt.step()
            step += 1
            elapsed = time.perf_counter() - start
            if not cfg.max_steps and step >= 30 and step % 10 == 0:
                # size the cosine schedule from the measured speed, again and again: on a shared
                # CPU the step time changes as other jobs come and go
                recent.append((step, elapsed))
                s0, t0 = recent[max(0, len(recent) - 10)] if len(recent) > 1 else (0, 0.0)
                per_step = (elapsed - t0) / max(1, step - s0)
                total_steps = max(step + 1, step + int((cfg.minutes * 60 * 0.97 - elapsed) / per_step))
                if step == 30:
                    log.info("%.2f s/step: about %d steps in %.1f minutes", per_step, total_steps, cfg.minutes)
            if step % 50 == 0:
                log.info("step %d/%d loss %.3f %s (%.1f min)", step, total_steps, loss.item(),
                         " ".join(f"{k}={v:.3f}" for k, v in parts.items()), elapsed / 60)
            if cfg.val_every and step % cfg.val_every == 0 and step < total_steps:
                metrics = validate(reader, cfg, n=min(cfg.val_size, 100))
                history.append({"step": step, "minutes": elapsed / 60, **metrics})
                log.info("val @%d: %s", step, json.dumps(metrics))
        minutes = (time.perf_counter() - start) / 60
        metrics = validate(reader, cfg, n=cfg.val_size)
        history.append({"step": step, "minutes": minutes, **metrics})
        styles = style_accuracy(reader, cfg, n=cfg.val_size) if cfg.style_fraction > 0 or cfg.hold_out else None
        reader.training_info = {"config": _jsonable(asdict(cfg)), "steps": step, "train_minutes": minutes,
                                "threads": cfg.threads, "val": metrics, "history": history}
        if styles is not None:
            reader.training_info["val_styles"] = styles
            metrics = {**metrics, "styles": styles}
        return reader.eval(), metrics
    finally:
        torch.set_num_threads(threads_before)


def validate(reader: WatchReader, cfg: ReaderTrainConfig, n: int) -> dict:
    return {str(size): reader_accuracy(reader, VAL_SPLIT, n, size, seed=cfg.seed) for size in (64, 224)}


def style_accuracy(reader: WatchReader, cfg: ReaderTrainConfig, n: int) -> dict:
    """Accuracy on ``n`` clean reader-val watches per size (64, 224) in every one-field style
    variation; ``held_out`` marks the looks training never drew."""
    held = {f"{name}={value}" for name, value in map(style_setting, cfg.hold_out)}
    return {name: {"held_out": name in held,
                   **{str(size): reader_accuracy(reader, VAL_SPLIT, n, size, seed=cfg.seed, style=style)
                      for size in (64, 224)}}
            for name, style in style_variations().items()}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k != "out"}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _tuple(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m unified_vlm train-reader --out DIR [--minutes 20] [--threads 1] ...``"""
    defaults = ReaderTrainConfig()
    p = argparse.ArgumentParser(prog="unified_vlm train-reader", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors), written atomically")
    for name, value in asdict(defaults).items():
        if name in ("out", "reader"):
            continue
        kind = _tuple(type(value[0]) if value else str) if isinstance(value, tuple) else type(value)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value,
                       help=f"{HELP.get(name, '')} (default: {shown})".strip())
    for name, value in asdict(defaults.reader).items():
        kind = _tuple(int) if isinstance(value, tuple) else type(value)
        p.add_argument(f"--reader-{name.replace('_', '-')}", type=kind, default=value, help=f"architecture, default: {value}")
    a = vars(p.parse_args(argv))
    reader_cfg = WatchReaderConfig(**{k[len("reader_"):]: v for k, v in a.items() if k.startswith("reader_")})
    cfg = ReaderTrainConfig(**{k: v for k, v in a.items() if not k.startswith("reader_")}, reader=reader_cfg)
    if len(cfg.sizes) != len(cfg.size_weights):
        p.error(f"--sizes has {len(cfg.sizes)} entries but --size-weights has {len(cfg.size_weights)}")
    try:
        training_style_choices(cfg)
    except ValueError as err:
        p.error(f"--hold-out: {err}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    reader, metrics = train_reader(cfg)
    from unified_vlm.files import publish_dir

    publish_dir(lambda tmp: reader.save_pretrained(tmp, reader.training_info), cfg.out, "watch_reader")
    print(json.dumps(metrics, indent=2))
    print(f"saved to {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
