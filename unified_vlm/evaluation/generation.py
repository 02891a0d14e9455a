"""Generation metrics: does a generated watch show what its prompt asked, and how close is the
distribution of generated watches to real renders?

- **Faithfulness** (``GenerationScorer``, ``score_generation``): the watch reader reads each
  generated picture; every attribute the prompt states (time always, the others about half the
  time, docs/paper.md 1.3) is scored against the reading with the VQA rules (time circular score,
  battery 1 - error/100, weather and corners exact). Reported per attribute, micro-averaged
  over all (image, stated attribute) pairs, and the share of pictures the reader accepts as
  watches. Attributes a prompt does not state are not scored: the generator may draw anything.
- **Fréchet distance** on the reader's features (torchmetrics' ``FrechetInceptionDistance`` /
  ``KernelInceptionDistance`` with ``feature=`` the reader), with a bootstrap 95 % interval.
- **Inception FID** for users with the Inception weights file on disk (``inception_fid``):
  nothing is downloaded; a missing file or package is a clear error.

Every torchmetrics metric here is built with ``sync_on_compute=False``: the callers hand each
process the gathered images already, and a metric that synchronised across DDP ranks by itself
would wait forever for ranks that do not compute it (found with the generation probe under DDP).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from unified_vlm.evaluation.captions import ATTRIBUTES, Parsed, parse_text, score_value
from unified_vlm.evaluation.reader import WatchReader, to_tensor_batch

WATCH_THRESHOLD = 0.5
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


# ------------------------------------------------------------------------------ faithfulness
def reading_strings(reading: Mapping[str, Any]) -> dict[str, str]:
    """A reader's reading as VQA answer strings (what ``score_value`` compares against)."""
    return {
        "time": reading["time"], "weather": reading["weather"], "battery": f"{reading['battery']}%",
        "weather_pos": reading["weather_pos"], "battery_pos": reading["battery_pos"],
    }


def prompt_of(record_or_prompt: Any) -> str:
    """The prompt text of a generation record (first human turn) or a prompt string."""
    if isinstance(record_or_prompt, str):
        return record_or_prompt
    turns = record_or_prompt.get("conversations") if isinstance(record_or_prompt, Mapping) else None
    if not turns:
        raise ValueError("expected a prompt string or a generation record with 'conversations'")
    return next(t["value"] for t in turns if t.get("from") == "human")


class GenerationScorer:
    """Accumulates (prompt, reading) pairs of generated pictures; ``summary()`` gives the metrics.

    A prompt attribute stated with two different values cannot be satisfied and scores 0.
    """

    def __init__(self, watch_threshold: float = WATCH_THRESHOLD) -> None:
        self.watch_threshold = watch_threshold
        self.rows: list[dict] = []

    def add(self, prompt: str | Parsed, reading: Mapping[str, Any], record_id: str = "") -> dict:
        parsed = prompt if isinstance(prompt, Parsed) else parse_text(prompt)
        read = {**reading_strings(reading), "battery": int(reading["battery"])}
        scores = {}
        for attribute in parsed.stated():
            value = parsed.value(attribute)  # None: stated twice with different values
            if value is None:
                scores[attribute] = 0.0
            else:  # the prompt's value is the ground truth, the reading the answer
                truth = f"{value}%" if attribute == "battery" else str(value)
                scores[attribute] = score_value(attribute, truth, read[attribute])
        row = {"id": record_id, "scores": scores, "is_watch": float(reading["is_watch"]),
               "reading": dict(reading)}
        self.rows.append(row)
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> dict:
        """``{attribute: mean score or None, ..., "total": micro mean, "is_watch": share accepted,
        "count": images, "count_per_attribute": {...}}``."""
        if not self.rows:
            raise ValueError("no generated images scored yet: call add() first")
        out: dict = {}
        counts = {}
        pooled: list[float] = []
        for a in ATTRIBUTES:
            values = [r["scores"][a] for r in self.rows if a in r["scores"]]
            out[a] = float(np.mean(values)) if values else None
            counts[a] = len(values)
            pooled += values
        out["total"] = float(np.mean(pooled)) if pooled else None
        out["is_watch"] = float(np.mean([r["is_watch"] > self.watch_threshold for r in self.rows]))
        out["count"] = len(self.rows)
        out["count_per_attribute"] = counts
        return out


def score_generation(reader: WatchReader, images: Any, prompts: Sequence[Any], batch_size: int = 256) -> dict:
    """Faithfulness of ``images`` (tensor (N, 3, S, S) in [0, 1] or PIL list) to ``prompts``
    (strings or generation records), read by ``reader``; see ``GenerationScorer.summary``."""
    prompts = list(prompts)
    readings = reader.read(images, batch_size=batch_size)
    if len(readings) != len(prompts):
        raise ValueError(f"{len(readings)} images for {len(prompts)} prompts")
    scorer = GenerationScorer()
    for reading, prompt in zip(readings, prompts):
        scorer.add(prompt_of(prompt), reading)
    return scorer.summary()


# ----------------------------------------------------------------------------- Fréchet
class ReaderFeatures(nn.Module):
    """The reader as a torchmetrics ``feature=`` network: float images in [0, 1] -> (N, D) float64-ready features."""

    def __init__(self, reader: WatchReader) -> None:
        super().__init__()
        self.reader = reader.eval()
        self.num_features = reader.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.reader.features(images)


class _Precomputed(nn.Module):
    """Identity ``feature=`` network: lets torchmetrics compute FD/KID on features we already have."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: Tensor) -> Tensor:
        return features


def reader_fid_metric(reader: WatchReader):
    """A torchmetrics ``FrechetInceptionDistance`` on the reader's features; ``update(images, real=...)``
    takes float images in [0, 1] of any one square size."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=ReaderFeatures(reader), normalize=True, sync_on_compute=False)
    return metric


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between two feature sets (N, D), by torchmetrics in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), normalize=True, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: Tensor, fake: Tensor, subsets: int = 50, subset_size: int | None = None, seed: int = 0) -> tuple[float, float]:
    """Kernel (KID-style) distance between feature sets: (mean, std) over ``subsets`` random subsets
    of ``subset_size`` per side (default: half the smaller side, at most 1,000, so subsets differ), by torchmetrics."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, fake)
    size = subset_size or max(2, min(len(real), len(fake), 2000) // 2)
    metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size, normalize=True,
                                     sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _check_features(real: Tensor, fake: Tensor) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected feature matrices (N, D) of one width, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 samples per side, got {len(real)} real and {len(fake)} fake")


def frechet_with_interval(real: Tensor, fake: Tensor, bootstrap: int = 100, level: float = 0.95, seed: int = 0) -> dict:
    """FD between feature sets with a bootstrap interval (both sides resampled with replacement).

    Resampling with replacement repeats pictures, and repeats alone raise the FD (it is biased
    upward at finite sample sizes), so the raw percentiles of the draws can lie entirely above
    the estimate. The interval is therefore the bootstrap distribution shifted by its bias
    (``bootstrap_bias`` = mean of the draws minus the estimate): it is centred on ``fd`` and
    as wide as the draws' central ``level`` share. It describes the sampling spread at this
    sample size; compare FDs only at equal sample counts.

    Returns ``{"fd", "low", "high", "level", "bootstrap", "bootstrap_bias", "n_real", "n_fake"}``.
    """
    fd = frechet_distance(real, fake)
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(bootstrap):
        r = real[torch.randint(len(real), (len(real),), generator=gen)]
        f = fake[torch.randint(len(fake), (len(fake),), generator=gen)]
        draws.append(frechet_distance(r, f))
    bias = float(np.mean(draws)) - fd
    alpha = (1 - level) / 2
    low, high = (float(np.quantile(draws, q)) - bias for q in (alpha, 1 - alpha))
    return {"fd": fd, "low": max(0.0, low), "high": high, "level": level, "bootstrap": bootstrap,
            "bootstrap_bias": bias, "n_real": len(real), "n_fake": len(fake)}


def reference_renders(n: int = 1000, size: int = 64, split: str = "fd-reference", seed: int = 0,
                      style: Any = None) -> Tensor:
    """``n`` held-out renders (N, 3, size, size) in [0, 1]: the real side of the Fréchet distance.

    ``fd-reference`` is a split no model and no reader trains on. ``style`` (a
    ``datamodules.variants.SplitStyle``, default: the standard look) draws them the way the test
    split of a dataset variant is drawn (layout, icons, colours, font, rendering)."""
    from unified_vlm.datamodules.watch import DEFAULT_STYLE, render_watch, sample_watch

    layout = getattr(style, "layout", "random")
    look = style.watch_style() if style is not None else DEFAULT_STYLE
    return to_tensor_batch([render_watch(sample_watch(seed, split, i, layout=layout), size, look) for i in range(n)])


def reader_frechet(reader: WatchReader, generated: Any, real: Any | None = None, bootstrap: int = 100,
                   seed: int = 0, kid: bool = True) -> dict:
    """FD (with its interval) and KID between ``generated`` pictures and ``real`` ones (default:
    1,000 ``reference_renders`` at the generated size), on the reader's features."""
    fake = reader.features(generated)
    if real is None:
        size = to_tensor_batch(generated).shape[-1]
        real = reference_renders(1000, size, seed=seed)
    real_features = reader.features(real)
    out = frechet_with_interval(real_features, fake, bootstrap=bootstrap, seed=seed)
    if kid:
        out["kid"], out["kid_std"] = kernel_distance(real_features, fake, seed=seed)
    return out


# ------------------------------------------------------------------------------ Inception
def inception_fid(real: Any, fake: Any, weights_path: str | os.PathLike | None, batch_size: int = 50) -> float:
    """Standard FID (Inception v3 pool3, 2048-d, as pytorch-fid / torch-fidelity) from a local weights file.

    ``weights_path`` is torch-fidelity's ``{name}`` file. No download is ever attempted: no file
    or no ``torch-fidelity`` package is an error saying what to provide.
    """
    name = INCEPTION_WEIGHTS_NAME
    if weights_path is None or not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"Inception weights file {weights_path!r} not found: standard FID needs torch-fidelity's "
            f"{name} on local disk (nothing is downloaded). Pass its path, or use the reader's "
            "Fréchet distance (reader_frechet), which needs no external weights."
        )
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise ModuleNotFoundError(
            "standard Inception FID needs the torch-fidelity package (pip install torch-fidelity); "
            "the reader's Fréchet distance (reader_frechet) works without it"
        ) from err
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights_path),
                                      sync_on_compute=False)
    for images, is_real in ((to_tensor_batch(real), True), (to_tensor_batch(fake), False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start: start + batch_size], real=is_real)
    return float(metric.compute())


inception_fid.__doc__ = inception_fid.__doc__.replace("{name}", INCEPTION_WEIGHTS_NAME)


def generation_report(reader: WatchReader, images: Any, prompts: Iterable[Any], real: Any | None = None,
                      bootstrap: int = 100, renderer: str | None = None) -> dict:
    """Faithfulness and Fréchet metrics of one set of generated pictures, in one dict (for
    ``test_scores.json``); ``renderer`` names what made the pixels (e.g. "vq_decoder", "retrieval:64")."""
    images = to_tensor_batch(images)
    report = {"faithfulness": score_generation(reader, images, list(prompts)),
              "frechet": reader_frechet(reader, images, real, bootstrap=bootstrap),
              "image_size": int(images.shape[-1])}
    if renderer is not None:
        report["renderer"] = renderer
    return report
