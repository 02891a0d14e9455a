"""The watch reader: a small CNN that reads a watch picture back into its attributes.

It scores generated watches (does the picture show what the prompt asked?) and gives the
features for a Fréchet distance. It is trained only on rendered watches
(``python -m unified_vlm train-reader``) and shares nothing with the models it judges.

Three branches read boxes of the paper's fixed layout (docs/paper.md 1.1), scaled to the input
size, so 64 px and 224 px pictures are read by the same weights:

- the **hands** branch unrolls the face into polar coordinates (rows: distance from the centre,
  columns: ``polar_columns`` angles clockwise from 12 o'clock) and convolves with circular
  padding along the angle, so every column is read by the same weights; it predicts, per hand,
  which column the hand points to. Reading angles this way is translation-equivariant: one
  training watch teaches every angle (the three hands differ by length and width, which the
  radial profile shows). Hour is decoded from the hour-hand angle minus the minute's share,
  as the renderer draws it;
- the **face** branch sees the face square at ``face_size`` and says whether the picture is a
  watch at all (a face disc with hands);
- the **corner** branch sees each of the four corner boxes where the paper draws the weather
  icon and the battery (docs/paper.md 1.1), at ``corner_scale`` of the 224 px resolution, and
  predicts what the corner holds (nothing, sunny, cloudy, raining, battery) and the battery
  percentage (101 classes, read from the fill bar and the digits).

Corners come from the fixed layout rather than from a detector: the reader is specific to
this synthetic domain on purpose, and looking at each corner at full resolution is what makes
the 23-pixel fill bar and the small digits readable.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_vlm.datamodules.watch import CORNER_ANCHORS_224, CORNERS, DEFAULT_STYLE, REFERENCE_SIZE, WEATHERS, WatchStyle
from unified_vlm.models.part_files import WEIGHTS_NAME, load_part_weights, read_part_config, save_part

READER_ASSET = "watch_reader"  # directory name under unified_vlm/assets (and the cache)
SHIPPED_READERS = {"builtin": READER_ASSET, "all_styles": "watch_reader_all_styles"}  # load_reader names
CORNER_CLASSES = ("none",) + WEATHERS + ("battery",)
HANDS = ("hour", "minute", "second")
POLAR_RADII = (0.08, 0.98)  # inner and outer radius sampled, in face radii
# Corner box in 224 px coordinates, relative to the corner anchor: the 30 px icon, or the 26 px
# battery outline plus its "100%" text (which starts 30 px right of the anchor).
CORNER_BOX = (-4, -4, 60, 36)  # x0, y0, x1, y1 (exclusive)
FACE_BOX = (18, 18, 206, 206)  # the face disc (radius 89 around 112) with a small margin


@dataclass
class WatchReaderConfig:
    """Architecture of a :class:`WatchReader`; saved as ``config.json`` beside the weights."""

    face_size: int = 96
    face_channels: tuple[int, ...] = (16, 32, 64, 64)
    corner_scale: float = 1.0
    corner_channels: tuple[int, ...] = (16, 32, 64, 96)
    polar_rows: int = 12
    polar_columns: int = 120  # angle resolution: 3 degrees, half a minute step (refined between columns)
    polar_channels: tuple[int, ...] = (12, 24, 32)
    feature_dim: int = 64  # per branch embedding; features() concatenates face, hands and 4 corners

    def __post_init__(self) -> None:
        self.face_channels = tuple(int(c) for c in self.face_channels)
        self.corner_channels = tuple(int(c) for c in self.corner_channels)
        self.polar_channels = tuple(int(c) for c in self.polar_channels)
        if self.polar_columns % 60:
            raise ValueError(f"polar_columns must be a multiple of 60 (one column per minute step or finer), got {self.polar_columns}")
        if self.face_size < 32:
            raise ValueError(f"face_size must be at least 32 px, got {self.face_size}")
        if not 0.25 <= self.corner_scale <= 2.0:
            raise ValueError(f"corner_scale must be in [0.25, 2], got {self.corner_scale}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WatchReaderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WatchReaderConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def _conv_tower(channels: Sequence[int]) -> nn.Sequential:
    """Stride-2 conv + BN + SiLU, then a 3x3 conv at the same size, per stage."""
    layers: list[nn.Module] = []
    cin = 3
    for cout in channels:
        layers += [
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
        ]
        cin = cout
    return nn.Sequential(*layers)


class _PolarBranch(nn.Module):
    """Polar face (N, 3, rows, columns) -> per-column hand logits (N, 3, columns) and an embedding.

    Convolutions pad circularly along the angle and halve only the radius; the radius is then
    folded into channels, so each column ends with a description of its whole ray.
    """

    def __init__(self, channels: Sequence[int], rows: int, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for k, cout in enumerate(channels):
            stride = (1, 1) if k == 0 else (2, 1)
            for conv_stride, c_in in ((stride, cin), ((1, 1), cout)):
                layers += [nn.Conv2d(c_in, cout, 3, stride=conv_stride, padding=(1, 0), bias=False),
                           nn.BatchNorm2d(cout), nn.SiLU()]
            cin = cout
            if k:
                rows = (rows + 1) // 2
        self.convs = nn.ModuleList(layers)
        self.ray = nn.Sequential(nn.Conv1d(cin * rows, dim, 1), nn.SiLU(),
                                 nn.Conv1d(dim, dim, 5, padding=2, padding_mode="circular"), nn.SiLU())
        self.hands = nn.Conv1d(dim, len(HANDS), 3, padding=1, padding_mode="circular")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for layer in self.convs:
            if isinstance(layer, nn.Conv2d):
                x = F.pad(x, (1, 1, 0, 0), mode="circular")
            x = layer(x)
        rays = self.ray(x.flatten(1, 2))  # (N, dim, columns)
        return self.hands(rays).float(), rays.mean(-1)


class _Branch(nn.Module):
    """Conv tower, then a linear embedding of the flattened map (keeps where things are)."""

    def __init__(self, channels: Sequence[int], in_hw: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.tower = _conv_tower(channels)
        h, w = in_hw
        for _ in channels:
            h, w = (h + 1) // 2, (w + 1) // 2
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * h * w, dim), nn.SiLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.tower(x))


def to_tensor_batch(images: Any) -> Tensor:
    """PIL images, a list of (3, S, S) tensors, or a (N, 3, S, S) tensor -> float (N, 3, S, S) in [0, 1].

    uint8 tensors are divided by 255; float tensors must already be in [0, 1] (checked loosely,
    so a tensor in [-1, 1] or [0, 255] fails with a message rather than reading garbage).
    """
    if isinstance(images, Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
    else:
        items = list(images)
        if not items:
            raise ValueError("no images given")
        if all(hasattr(im, "convert") for im in items):  # PIL
            sizes = {im.size for im in items}
            if len(sizes) > 1:
                raise ValueError(f"images of different sizes {sorted(sizes)}: read each size separately")
            arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in items])
            batch = torch.from_numpy(arrays).permute(0, 3, 1, 2)
        else:
            batch = torch.stack([torch.as_tensor(im) for im in items])
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, S, S), got shape {tuple(batch.shape)}")
    if batch.shape[-1] != batch.shape[-2]:
        raise ValueError(f"the reader reads square pictures, got {batch.shape[-2]}x{batch.shape[-1]}")
    if batch.dtype == torch.uint8:
        return batch.float() / 255.0
    batch = batch.float()
    lo, hi = float(batch.min()), float(batch.max())
    if lo < -0.05 or hi > 1.05:
        raise ValueError(f"float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return batch.clamp(0.0, 1.0)


class WatchReader(nn.Module):
    """Reads hour, minute, second, weather, battery, both corners and is-watch from a picture.

    ``forward`` returns raw logits; ``read`` returns one attribute dict per image and
    ``features`` the (N, D) embedding used for Fréchet distances.
    """

    def __init__(self, config: WatchReaderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or WatchReaderConfig()
        s = config.corner_scale
        x0, y0, x1, y1 = CORNER_BOX
        self.corner_hw = (round((y1 - y0) * s), round((x1 - x0) * s))
        d = config.feature_dim
        self.face = _Branch(config.face_channels, (config.face_size, config.face_size), d)
        self.corner = _Branch(config.corner_channels, self.corner_hw, d)
        self.polar = _PolarBranch(config.polar_channels, config.polar_rows, d)
        rows = torch.linspace(*POLAR_RADII, config.polar_rows)[:, None]
        angles = torch.arange(config.polar_columns) * (2 * math.pi / config.polar_columns)
        # sampling grid in face-crop coordinates (grid_sample's [-1, 1]); 89/94: face radius / half the face box
        radius = 89 / ((FACE_BOX[2] - FACE_BOX[0]) / 2)
        grid = torch.stack([rows * radius * angles.sin(), -rows * radius * angles.cos()], dim=-1)
        self.register_buffer("polar_grid", grid, persistent=False)  # (rows, columns, 2)
        self.watch_head = nn.Linear(d, 1)
        self.corner_head = nn.Linear(d, len(CORNER_CLASSES) + 101)  # what the corner holds + battery %

    @property
    def num_features(self) -> int:
        """Width of ``features()``; torchmetrics reads this attribute."""
        return 6 * self.config.feature_dim

    # -------------------------------------------------------------- geometry
    def views(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(face crops (N, 3, F, F), polar faces (N, 3, rows, columns), corner crops (N*4, 3, h, w))
        in [-1, 1], corners in CORNERS order.

        Boxes are the 224 px layout scaled to the input size; ``roi_align`` averages several
        samples per output pixel when shrinking (so no aliasing) and reads outside the picture
        as white, the background colour.
        """
        from torchvision.ops import roi_align

        images = to_tensor_batch(images).to(self.watch_head.weight.device)
        n, size = images.shape[0], images.shape[-1]
        scale = size / REFERENCE_SIZE
        bx0, by0, bx1, by1 = CORNER_BOX
        boxes = [[float(c) for c in FACE_BOX]]
        for corner in CORNERS:
            ax, ay = CORNER_ANCHORS_224[corner]
            boxes.append([ax + bx0, ay + by0, ax + bx1, ay + by1])
        boxes_t = torch.tensor(boxes, device=images.device) * scale  # (5, 4) in input pixels
        index = torch.arange(n, device=images.device, dtype=boxes_t.dtype).repeat_interleave(5)[:, None]
        rois = torch.cat([index, boxes_t.repeat(n, 1)], dim=1)
        dark = images - 1.0  # so that roi_align's zero padding reads as white
        fsize = self.config.face_size
        face = roi_align(dark, rois[0::5], (fsize, fsize), 1.0, sampling_ratio=-1, aligned=True) + 1.0
        corner_rois = rois.view(n, 5, 5)[:, 1:].reshape(-1, 5)
        corners = roi_align(dark, corner_rois, self.corner_hw, 1.0, sampling_ratio=-1, aligned=True) + 1.0
        grid = self.polar_grid.to(face.dtype).expand(n, -1, -1, -1)
        polar = F.grid_sample(face, grid, mode="bilinear", padding_mode="border", align_corners=False)
        cl = torch.channels_last
        return tuple((v * 2 - 1).contiguous(memory_format=cl) for v in (face, polar, corners))

    # -------------------------------------------------------------- network
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits: hands (N, 3, columns) over angle columns per hand (hour, minute, second),
        watch (N,), corner (N, 4, 5), battery (N, 4, 101); and the branch embeddings
        ``face_emb`` (N, D), ``hands_emb`` (N, D), ``corner_emb`` (N, 4, D)."""
        face, polar, corners = self.views(images)
        n = face.shape[0]
        face_emb = self.face(face)
        corner_emb = self.corner(corners).view(n, len(CORNERS), -1)
        out = {}
        out["hands"], out["hands_emb"] = self.polar(polar)
        out["watch"] = self.watch_head(face_emb).float().squeeze(-1)
        c = self.corner_head(corner_emb).float()
        out["corner"], out["battery"] = c[..., : len(CORNER_CLASSES)], c[..., len(CORNER_CLASSES):]
        out["face_emb"], out["corner_emb"] = face_emb, corner_emb
        return out

    @torch.no_grad()
    def features(self, images: Any, batch_size: int = 256) -> Tensor:
        """(N, 6*feature_dim) float32: face, hands and the four corner embeddings, for Fréchet distances."""
        self.eval()
        batch = to_tensor_batch(images)
        chunks = []
        for start in range(0, batch.shape[0], batch_size):
            out = self(batch[start: start + batch_size])
            parts = [out["face_emb"], out["hands_emb"], out["corner_emb"].flatten(1)]
            chunks.append(torch.cat(parts, dim=1).float().cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def read(self, images: Any, batch_size: int = 256) -> list[dict[str, Any]]:
        """One dict per image: hour (1..12), minute, second, weather, battery (0..100), weather_pos,
        battery_pos, ``is_watch`` (probability) and ``time`` ("HH:MM:SS")."""
        self.eval()
        batch = to_tensor_batch(images)
        readings: list[dict[str, Any]] = []
        for start in range(0, batch.shape[0], batch_size):
            readings += decode(self(batch[start: start + batch_size]))
        return readings

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike, metadata: dict | None = None) -> None:
        """``config.json`` (architecture, plus ``metadata`` under "training") and ``model.safetensors``."""
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        save_part(directory, {"config": config, "training": metadata or {}}, self)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "WatchReader":
        """Load a reader written by :meth:`save_pretrained` (or ``train-reader --out``); eval mode."""
        payload = read_part_config(directory, "watch reader", "`python -m unified_vlm train-reader --out DIR` "
                                   "(or use the built-in: load_reader('builtin'))")
        model = cls(WatchReaderConfig.from_dict(payload["config"]))
        load_part_weights(model, directory, "watch reader", as_float=True)
        model.training_info = payload.get("training", {})
        return model.eval()


def _median_class(logits: Tensor) -> Tensor:
    """The median of the softmax distribution over ordered classes: minimises the expected absolute error."""
    cdf = logits.softmax(-1).cumsum(-1)
    return (cdf < 0.5).sum(-1).clamp(max=logits.shape[-1] - 1)


def decode(out: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Readings from ``WatchReader.forward`` logits.

    The weather corner is the corner most likely to hold an icon; the battery corner the most
    likely battery among the other three (the two are always distinct). Battery is the median
    of its 101-class distribution, hour 0 is reported as 12.
    """
    corner_p = out["corner"].softmax(-1)  # (N, 4, 5)
    icon_p = corner_p[..., 1:4].sum(-1)
    weather_idx = icon_p.argmax(-1)
    battery_p = corner_p[..., 4].clone()
    battery_p.scatter_(1, weather_idx[:, None], -1.0)
    battery_idx = battery_p.argmax(-1)
    rows = torch.arange(len(weather_idx))
    weather = corner_p[rows, weather_idx, 1:4].argmax(-1)
    battery = _median_class(out["battery"][rows, battery_idx])
    hour, minute, second = decode_time(out["hands"])
    watch_p = torch.sigmoid(out["watch"])
    readings = []
    for i in range(len(rows)):
        h = int(hour[i]) or 12  # the 12 o'clock position is read as 12, never 00
        m, s = int(minute[i]), int(second[i])
        readings.append({
            "hour": h, "minute": m, "second": s, "time": f"{h:02d}:{m:02d}:{s:02d}",
            "weather": WEATHERS[int(weather[i])], "battery": int(battery[i]),
            "weather_pos": CORNERS[int(weather_idx[i])], "battery_pos": CORNERS[int(battery_idx[i])],
            "is_watch": float(watch_p[i]),
        })
    return readings


def hand_angles_deg(hands: Tensor) -> Tensor:
    """(N, 3) angles in degrees from per-column logits (N, 3, C): the argmax column refined by the
    probability-weighted offset of its two neighbours (sub-column precision)."""
    n, k, c = hands.shape
    p = hands.float().softmax(-1)
    best = p.argmax(-1)  # (N, 3)
    offsets = torch.tensor([-1, 0, 1], device=hands.device)
    cols = (best[..., None] + offsets) % c
    w = p.gather(-1, cols)
    refined = best + (w * offsets).sum(-1) / w.sum(-1).clamp_min(1e-9)
    return (refined * (360.0 / c)) % 360


def decode_time(hands: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(hour 0..11, minute, second) from hand logits, inverting the renderer's angles (docs/paper.md 1.1):
    minute = angle/6, second = angle/6, hour = hour angle/30 minus the minute's share."""
    angles = hand_angles_deg(hands)
    minute = torch.round(angles[:, 1] / 6).long() % 60
    second = torch.round(angles[:, 2] / 6).long() % 60
    hour = torch.round(angles[:, 0] / 30 - minute / 60).long() % 12
    return hour, minute, second


def hand_columns(hour: Tensor, minute: Tensor, second: Tensor, columns: int) -> Tensor:
    """(N, 3) fractional angle columns of the hour, minute and second hands (the training targets)."""
    degrees = torch.stack([(hour % 12 + minute / 60) * 30, minute * 6.0, second * 6.0], dim=1)
    return degrees * (columns / 360.0)


def load_reader(path: str | os.PathLike | None = "builtin") -> WatchReader:
    """A shipped reader by name, else a directory from ``train-reader``.

    ``builtin`` (or None): ``unified_vlm/assets/watch_reader``, trained on the default look; every
    generation score in docs/ was read by it. ``all_styles``: ``unified_vlm/assets/watch_reader_all_styles``,
    trained with half its watches in random looks (icon designs, battery colours and bars, fonts,
    render modes; docs/evaluation.md), for scoring pictures that are not in the default look.
    Either is also looked up under ``$UNIFIED_VLM_CACHE``."""
    from unified_vlm.assets import cached, shipped

    name = "builtin" if path is None else str(path)
    if name in SHIPPED_READERS:
        asset = SHIPPED_READERS[name]
        found = shipped(asset)
        if found is None and (cached(asset) / WEIGHTS_NAME).is_file():
            found = cached(asset)
        if found is None:
            raise FileNotFoundError(
                f"no built-in {'' if name == 'builtin' else name + ' '}watch reader "
                f"(neither unified_vlm/assets/{asset} nor {cached(asset)}): "
                f"train one with `python -m unified_vlm train-reader --out {cached(asset)}` or pass a reader directory"
            )
        return WatchReader.from_pretrained(found)
    return WatchReader.from_pretrained(Path(path))


def reader_accuracy(reader: WatchReader, split: str, n: int, size: int, seed: int = 0,
                    style: WatchStyle = DEFAULT_STYLE) -> dict[str, float]:
    """How well ``reader`` reads ``n`` clean renders of ``split`` at ``size`` px in ``style`` (see
    ``reading_accuracy``)."""
    from unified_vlm.datamodules.watch import render_watch, sample_watch

    attrs = [sample_watch(seed, split, i) for i in range(n)]
    return reading_accuracy(reader.read([render_watch(a, size, style) for a in attrs]), attrs)


def reading_accuracy(readings: Sequence[dict], attrs: Sequence[Any]) -> dict[str, float]:
    """Readings against the true ``WatchAttributes``: weather / corners exact-match rate; time the
    mean docs/paper.md 4.2 time score; battery_mae the mean absolute error in points; is_watch the
    share read as a watch (probability > 0.5)."""
    from unified_vlm.evaluation.vqa import score_time

    if len(readings) != len(attrs):
        raise ValueError(f"{len(readings)} readings for {len(attrs)} watches")
    mean = lambda values: float(np.mean(values))  # noqa: E731
    pairs = list(zip(readings, attrs))
    return {
        "weather": mean([r["weather"] == a.weather for r, a in pairs]),
        "weather_pos": mean([r["weather_pos"] == a.weather_pos for r, a in pairs]),
        "battery_pos": mean([r["battery_pos"] == a.battery_pos for r, a in pairs]),
        "time": mean([score_time(a.time_str(), r["time"]) for r, a in pairs]),
        "battery_mae": mean([abs(r["battery"] - a.battery) for r, a in pairs]),
        "is_watch": mean([r["is_watch"] > 0.5 for r in readings]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unified_vlm.evaluation.reader [--reader DIR] [--n 1000] [--sizes 64,224] [--styles all]``:
    the reader's accuracy on fresh renders of a split no training used (in the default look, or in
    every one-field style variation), and its reading speed."""
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m unified_vlm.evaluation.reader", description=main.__doc__)
    p.add_argument("--reader", default="builtin", help="builtin, all_styles, or a train-reader directory")
    p.add_argument("--n", type=int, default=1000, help="watches per size")
    p.add_argument("--split", default="reader-check", help="a split that no training used")
    p.add_argument("--sizes", default="64,224")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--styles", default="default",
                   help="default, all (the default and every one-field variation: icons=flat, battery_bar=paper, ...), "
                        "or a comma list of variation names")
    p.add_argument("--vq-roundtrip", default=None, metavar="TOKENIZER",
                   help="also read the renders after a round trip through this VQ tokenizer (builtin or a dir): "
                        "what a perfect VQ-output model could at best produce")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    reader = load_reader(a.reader)
    from unified_vlm.datamodules.watch import render_watch, sample_watch, style_variations

    variations = style_variations()
    names = ["default"] if a.styles == "default" else list(variations) if a.styles == "all" else a.styles.split(",")
    unknown = [name for name in names if name not in variations]
    if unknown:
        p.error(f"--styles: unknown {unknown}; known: default, all, {', '.join(variations)}")
    for size in (int(s) for s in a.sizes.split(",")):
        attrs = [sample_watch(0, a.split, i) for i in range(a.n)]
        for name in names:
            images = to_tensor_batch([render_watch(x, size, variations[name]) for x in attrs])
            start = time.perf_counter()
            readings = reader.read(images)
            seconds = time.perf_counter() - start
            acc = reading_accuracy(readings, attrs)
            print(json.dumps({"size": size, "style": name, "n": a.n, **{k: round(v, 4) for k, v in acc.items()},
                              "read_seconds": round(seconds, 2), "threads": a.threads}))
        if a.vq_roundtrip:
            from unified_vlm.models.builders import build_vq_tokenizer

            images = to_tensor_batch([render_watch(x, size) for x in attrs])
            vq = build_vq_tokenizer(a.vq_roundtrip).eval()
            with torch.no_grad():
                recon = torch.cat([vq.decode(vq.encode(images[i: i + 200])) for i in range(0, len(images), 200)])
            if recon.shape[-1] != size:
                recon = F.interpolate(recon, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            acc = reading_accuracy(reader.read(recon.clamp(0, 1)), attrs)
            print(json.dumps({"size": size, "n": a.n, "vq_roundtrip": a.vq_roundtrip,
                              **{k: round(v, 4) for k, v in acc.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
