"""Probes of the understanding adapter (docs/paper.md 4.4): is an attribute linearly readable from the
vectors the language model receives for one image token, before any LM layer?

The paper's "transfer happens inside the LLM" argument rests on this: if an understanding-only
model's adapter outputs already separate the weather classes, a unified model's extra weather
skill cannot come from the adapter. Everything here works on plain tensors, so a notebook can
probe any features; ``main`` is the ``python -m unified_vlm probe`` command for a trained run.

Features of a token are ``model.encode_understanding`` at that position: encoder -> distortion
(if any) -> feature norm (if any) -> understanding projector (+ the token's learned slot vector,
a constant that the standardisation below removes exactly).
"""
from __future__ import annotations

import argparse
import json
import logging
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

SPLITS = {"train": "fit", "val": "validate", "test": "test"}


# ---------------------------------------------------------------------------------- features
@torch.no_grad()
def token_features(model, images: Tensor, token: int, batch_size: int = 64) -> Tensor:
    """(N, hidden) float32 CPU features of image token ``token`` for images (N, 3, H, W) in [0, 1]."""
    num_tokens = model.encoder.num_tokens
    if not -num_tokens <= token < num_tokens:
        raise ValueError(f"token {token} is out of range: the understanding encoder gives {num_tokens} tokens per image (0..{num_tokens - 1})")
    was_training = model.training
    model.eval()
    try:
        chunks = [model.encode_understanding(images[i:i + batch_size].to(model.device))[:, token].float().cpu()
                  for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def images_and_labels(dataset, attribute: str, limit: Optional[int] = None) -> tuple[Tensor, list[str]]:
    """One (image, label) per distinct image of a record dataset; label = ``attributes[attribute]``.

    Items must be ``{"image": (3,H,W) tensor, "image_path", "attributes"}`` (``TensorImages`` over
    ``WatchStream`` or ``RecordDataset``). Three task records share one watch, so images repeat.
    """
    images, labels, seen = [], [], set()
    for i in range(len(dataset)):
        item = dataset[i]
        key = item.get("image_path", i)
        if key in seen:
            continue
        seen.add(key)
        attributes = item.get("attributes")
        if not attributes:
            raise ValueError(f"record {item.get('id', i)} carries no attributes, so it has no {attribute!r} label to probe")
        if attribute not in attributes:
            raise ValueError(f"unknown attribute {attribute!r}; records have {sorted(attributes)}")
        images.append(item["image"])
        labels.append(str(attributes[attribute]))
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError("the dataset has no records to probe")
    return torch.stack(images), labels


# ---------------------------------------------------------------------------------- linear probe
@dataclass
class ProbeResult:
    """What a linear probe measured; ``to_dict`` is what probe.json holds."""

    classes: list[str]
    n_train: int
    n_test: int
    feature_dim: int
    train_accuracy: float
    test_accuracy: float
    majority_baseline: float
    """Test accuracy of always answering the most frequent training class."""
    test_accuracy_by_epoch: list[float]
    """Held-out accuracy after each epoch (``method='sgd'`` only; the paper logged 100 % from epoch 1)."""
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_labels(labels: Sequence) -> tuple[Tensor, list[str]]:
    """Class indices (sorted class names) for any labels: strings, numbers, a tensor or an array."""
    if isinstance(labels, (Tensor, np.ndarray)):
        labels = labels.tolist()
    classes = sorted({str(label) for label in labels})
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[str(label)] for label in labels], dtype=torch.long), classes


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random (train, test) split; both non-empty."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"a held-out split needs at least 2 samples, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return order[n_test:], order[:n_test]


def standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Zero mean, unit variance per feature with the *training* statistics (constant features: scale 1)."""
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std > 1e-8 * std.max().clamp(min=1e-30), std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


def linear_probe(
    features: Tensor | np.ndarray,
    labels: Sequence,
    test_fraction: float = 0.2,
    seed: int = 42,
    method: str = "lbfgs",
    max_iter: int = 100,
    epochs: int = 50,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    lr_step_epochs: int = 20,
) -> ProbeResult:
    """Train Linear(D -> classes) on standardised features, report train and held-out accuracy.

    The probe, the standardisation, the seed and the split share follow the paper (docs/paper.md 4.4:
    seed 42, 4,500 / 1,085 samples, about 0.2 held out). ``method``: ``lbfgs`` (default) fits the
    same L2-regularised (``weight_decay``) cross-entropy with full-batch L-BFGS in ``max_iter``
    iterations, a fraction of the time of ``sgd``, the paper's exact recipe (SGD lr 0.01, momentum
    0.9, weight decay 1e-4, StepLR(20, 0.1), 50 epochs, batch 64), which also reports the
    held-out accuracy per epoch.
    """
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features).float()
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"features must be (N, D) with one label each; got {tuple(x.shape)} and {len(labels)} labels")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    y, classes = encode_labels(labels)
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes, got only {classes}")
    if method not in ("lbfgs", "sgd"):
        raise ValueError(f"method must be 'lbfgs' or 'sgd', got {method!r}")
    if epochs < 1 or batch_size < 1 or max_iter < 1:
        raise ValueError(f"epochs, batch_size and max_iter must be positive, got {epochs}, {batch_size} and {max_iter}")
    train_idx, test_idx = split_indices(len(x), test_fraction, seed)
    x_train, x_test = standardise(x[train_idx], x[test_idx])
    y_train, y_test = y[train_idx], y[test_idx]

    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], len(classes))
    with torch.no_grad():  # seeded initialisation, independent of the global RNG
        bound = 1.0 / x.shape[1] ** 0.5
        probe.weight.copy_(torch.rand(probe.weight.shape, generator=generator) * 2 * bound - bound)
        probe.bias.copy_(torch.rand(probe.bias.shape, generator=generator) * 2 * bound - bound)
    def accuracy(inputs: Tensor, targets: Tensor) -> float:
        with torch.no_grad():
            return float((probe(inputs).argmax(-1) == targets).float().mean())

    by_epoch: list[float] = []
    if method == "lbfgs":
        optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(probe(x_train), y_train) + 0.5 * weight_decay * probe.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    else:
        optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step_epochs, gamma=0.1)
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(probe(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
            scheduler.step()
            by_epoch.append(accuracy(x_test, y_test))
    majority = int(torch.bincount(y_train, minlength=len(classes)).argmax())
    return ProbeResult(
        classes=classes,
        n_train=len(train_idx),
        n_test=len(test_idx),
        feature_dim=int(x.shape[1]),
        train_accuracy=accuracy(x_train, y_train),
        test_accuracy=accuracy(x_test, y_test),
        majority_baseline=float((y_test == majority).float().mean()),
        test_accuracy_by_epoch=by_epoch,
        settings={"test_fraction": test_fraction, "seed": seed, "method": method, "weight_decay": weight_decay,
                  **({"max_iter": max_iter} if method == "lbfgs" else
                     {"epochs": epochs, "lr": lr, "momentum": momentum, "batch_size": batch_size, "lr_step_epochs": lr_step_epochs})},
    )


# ---------------------------------------------------------------------------------- t-SNE
def tsne_embedding(features: Tensor | np.ndarray, seed: int = 42, perplexity: float = 30.0, pca_dims: int = 50,
                   learning_rate: float = 200.0, max_iter: int = 1000) -> np.ndarray:
    """(N, 2) t-SNE of standardised features after PCA, the paper's settings (docs/paper.md 4.4).

    Perplexity is capped below N / 3 so that small sets still embed.
    """
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("t-SNE needs scikit-learn: pip install scikit-learn") from err
    x = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 4:
        raise ValueError(f"t-SNE needs (N, D) features with N >= 4, got shape {x.shape}")
    distinct = len(np.unique(x, axis=0))
    if distinct < 4:  # t-SNE of (nearly) one point is undefined; scikit-learn would crash on it
        raise ValueError(f"t-SNE needs at least 4 distinct feature vectors, got {distinct} among {len(x)}: "
                         "this token carries (almost) no information about the images")
    (z,) = standardise(torch.from_numpy(x))
    z = z.numpy()
    dims = min(pca_dims, z.shape[0], z.shape[1])
    if dims < z.shape[1]:
        z = PCA(n_components=dims, random_state=seed).fit_transform(z)
    perplexity = min(perplexity, (len(z) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, learning_rate=learning_rate, max_iter=max_iter, random_state=seed)
    return tsne.fit_transform(z)


def plot_embedding(points: np.ndarray, labels: Sequence, path: str | Path, title: str = "") -> Path:
    """Scatter plot of 2-d points coloured by class, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, classes = encode_labels(labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, name in enumerate(classes):
        mask = (y == i).numpy()
        ax.scatter(points[mask, 0], points[mask, 1], s=8, alpha=0.7, label=f"{name} ({int(mask.sum())})")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)  # long run paths wrap instead of running off the figure
    ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- command
def load_run(config: str, ckpt_path: str, data_overrides: Optional[dict[str, Any]] = None):
    """(model, data module) of a run: the model from its checkpoint, the data from its config.yaml
    (with ``data_overrides`` applied)."""
    import yaml
    from jsonargparse import ArgumentParser

    from unified_vlm.datamodules.collate import ConversationCollator
    from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
    from unified_vlm.files import load_checkpoint
    from unified_vlm.models.unified import UnifiedVLM

    if not Path(config).is_file():
        raise FileNotFoundError(f"no config file at {config}")
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}")
    raw = yaml.safe_load(Path(config).read_text()) or {}
    data = {k: v for k, v in (raw.get("data") or {}).items() if k != "collator"}
    data.update(data_overrides or {})
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(UnifiedDataModule, "data", skip={"collator"})
    datamodule = parser.instantiate(parser.parse_object({"data": data})).data
    load_checkpoint(ckpt_path)  # refuses a file that would run code, or a truncated one, naming it (as fit/test do)
    model = UnifiedVLM.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    datamodule.collator = ConversationCollator.for_model(model)
    return model, datamodule


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unified_vlm probe",
        description="Linear probe and t-SNE of one image token's adapter outputs, labelled by a watch attribute (docs/paper.md 4.4).",
    )
    p.add_argument("--config", required=True, help="the run's config.yaml (its data section picks the watches)")
    p.add_argument("--ckpt_path", required=True, help="model checkpoint (e.g. RUN/checkpoints/last.ckpt)")
    p.add_argument("--attribute", default="weather", help="record attribute used as the class (weather, weather_pos, battery_pos, hour, ...)")
    p.add_argument("--token", type=int, default=0, help="image token index (vq_codes: raster order, 0 = top-left; siglip pooled+patch: 0 = pooled)")
    p.add_argument("--out", required=True, help="output directory for probe.json and tsne.png")
    p.add_argument("--split", choices=sorted(SPLITS), default="test", help="data split to draw watches from")
    p.add_argument("--num_watches", type=int, default=1000, help="distinct watches to probe (streamed splits are drawn this large)")
    p.add_argument("--test_fraction", type=float, default=0.2, help="held-out share of the probe's samples")
    p.add_argument("--seed", type=int, default=42, help="split, probe and t-SNE seed")
    p.add_argument("--method", choices=["lbfgs", "sgd"], default="lbfgs",
                   help="lbfgs: full-batch, fast; sgd: the paper's exact recipe (50 epochs, per-epoch accuracy)")
    p.add_argument("--epochs", type=int, default=50, help="probe training epochs (sgd)")
    p.add_argument("--tsne_iter", type=int, default=1000, help="t-SNE iterations (the first 250 are early exaggeration)")
    p.add_argument("--no_tsne", action="store_true", help="skip the t-SNE figure")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_watches < 4:
        raise SystemExit(f"--num_watches must be at least 4, got {args.num_watches}")
    model, datamodule = load_run(args.config, args.ckpt_path, {f"num_{args.split}_watches": args.num_watches})
    datamodule.setup(SPLITS[args.split])
    images, labels = images_and_labels(datamodule.datasets[args.split], args.attribute, limit=args.num_watches)
    features = token_features(model, images, args.token)
    result = linear_probe(features, labels, test_fraction=args.test_fraction, seed=args.seed, method=args.method, epochs=args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "attribute": args.attribute,
        "token": args.token,
        "split": args.split,
        "num_images": len(labels),
        "checkpoint": str(args.ckpt_path),
        "und_distortion": model.hparams.get("und_distortion"),
        **result.to_dict(),
    }
    report["distinct_features"] = int(len(torch.unique(features, dim=0)))
    if not args.no_tsne:
        try:
            points = tsne_embedding(features, seed=args.seed, max_iter=args.tsne_iter)
        except ValueError as err:  # a constant token: the probe result stands, the figure cannot exist
            report["tsne"] = f"skipped: {err}"
        else:
            source = "/".join(Path(args.ckpt_path).parts[-3:])
            title = f"{source}: token {args.token} by {args.attribute} (probe test acc {result.test_accuracy:.2f})"
            report["tsne"] = plot_embedding(points, labels, out / "tsne.png", title).name
    (out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"linear probe of {args.attribute!r} on token {args.token}: train {result.train_accuracy:.3f}, "
          f"test {result.test_accuracy:.3f} (majority {result.majority_baseline:.3f}; "
          f"{result.n_train} train / {result.n_test} test, {result.feature_dim}-d) -> {out / 'probe.json'}")
    if "tsne" in report:
        print(f"t-SNE: {report['tsne']}")
    return 0
