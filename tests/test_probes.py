"""Adapter probes (docs/paper.md 4.4): the linear probe on plain tensors, t-SNE, and the ``probe``
command on a tiny distorted VQ-VQ checkpoint trained in the test."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_cli import CONFIG_DIR, tiny_overrides
from unified_vlm.cli import main
from unified_vlm.evaluation.probes import linear_probe, plot_embedding, standardise, token_features, tsne_embedding


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def clusters(n=600, dim=64, classes=3, spread=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g) * spread
    return centres[labels] + torch.randn(n, dim, generator=g), [("sunny", "cloudy", "raining")[i] for i in labels]


@pytest.mark.parametrize("method", ["lbfgs", "sgd"])
def test_separable_features_are_read_perfectly(method):
    features, labels = clusters()
    result = linear_probe(features * 50 + 7, labels, method=method)  # scale and offset: standardised away
    assert result.classes == ["cloudy", "raining", "sunny"]
    assert result.n_train + result.n_test == 600 and result.n_test == 120 and result.feature_dim == 64
    assert result.test_accuracy >= 0.99 and result.train_accuracy >= 0.99
    assert result.majority_baseline < 0.5
    assert len(result.test_accuracy_by_epoch) == (50 if method == "sgd" else 0)


def test_random_labels_stay_near_chance():
    features, _ = clusters(n=900, dim=16, spread=0.0)
    labels = torch.randint(0, 3, (900,), generator=torch.Generator().manual_seed(1)).tolist()
    result = linear_probe(features, labels)
    assert abs(result.test_accuracy - 1 / 3) < 0.1
    assert result.test_accuracy <= result.majority_baseline + 0.08


def test_the_probe_is_seeded():
    features, labels = clusters(spread=0.15)  # overlapping classes: accuracy depends on the split
    a, b = linear_probe(features, labels, seed=3), linear_probe(features, labels, seed=3)
    as_numbers = torch.tensor([("cloudy", "raining", "sunny").index(label) for label in labels])
    assert linear_probe(features, as_numbers, seed=3).test_accuracy == a.test_accuracy  # a label tensor works too
    c = linear_probe(features, labels, seed=4)
    assert a.to_dict() == b.to_dict() and a.test_accuracy != c.test_accuracy


def test_standardise_uses_training_statistics_only():
    train, test = torch.tensor([[0.0, 5.0], [2.0, 5.0]]), torch.tensor([[4.0, 6.0]])
    z_train, z_test = standardise(train, test)
    assert torch.allclose(z_train, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))  # a constant feature keeps scale 1
    assert torch.allclose(z_test, torch.tensor([[3.0, 1.0]]))


@pytest.mark.parametrize(
    "features, labels, kwargs, match",
    [
        (torch.zeros(10, 4), ["a"] * 10, {}, "at least 2 classes"),
        (torch.zeros(10, 4), ["a", "b"] * 4, {}, "one label each"),
        (torch.full((4, 2), float("nan")), ["a", "b"] * 2, {}, "NaN"),
        (torch.zeros(4, 2), ["a", "b"] * 2, {"test_fraction": 1.0}, "test_fraction"),
        (torch.zeros(4, 2), ["a", "b"] * 2, {"method": "adam"}, "method"),
    ],
)
def test_bad_probe_input_is_refused(features, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_probe(features, labels, **kwargs)


def test_tsne_separates_clusters_and_plots(tmp_path):
    features, labels = clusters(n=60, dim=32, spread=5.0)
    points = tsne_embedding(features)
    assert points.shape == (60, 2)
    distances = torch.cdist(torch.as_tensor(points), torch.as_tensor(points)).fill_diagonal_(float("inf"))
    nearest = distances.argmin(1).tolist()
    agree = sum(labels[i] == labels[j] for i, j in enumerate(nearest)) / len(labels)
    assert agree >= 0.95  # the clusters survive in 2-d: each point's nearest neighbour shares its class
    path = plot_embedding(points, labels, tmp_path / "t.png", "clusters")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tsne_refuses_a_constant_token():
    with pytest.raises(ValueError, match="at least 4 distinct feature vectors, got 1"):
        tsne_embedding(torch.ones(10, 4))


def test_probe_command_on_a_tiny_distorted_checkpoint(tmp_path, tiny_vq_dir, capsys):
    """Fit tiny SigLIP-VQ with a distortion for 3 steps, then probe token 0 (the pooled token) by weather.
    (The untrained test VQ maps every watch to one code, so VQ-code tokens would all be equal.)"""
    config = CONFIG_DIR / "tiny_siglip_vq.yaml"
    distorted = tmp_path / "distortion.yaml"
    distorted.write_text("model:\n  und_distortion: {strength: 0.3, seed: 1, translation: true}\n")
    main(["fit", "--config", str(config), "--config", str(tiny_overrides(tmp_path, tiny_vq_dir, config)), "--config", str(distorted),
          "--test_after_fit", "false"])
    run = tmp_path / "version_0"
    assert "strength: 0.3" in (run / "config.yaml").read_text()
    out = tmp_path / "probe"
    args = ["probe", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
            "--attribute", "weather", "--token", "0", "--out", str(out), "--num_watches", "24", "--tsne_iter", "500"]
    assert main(args) == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["attribute"] == "weather" and report["token"] == 0 and report["num_images"] == 24
    assert report["n_train"] + report["n_test"] == 24 and set(report["classes"]) <= {"sunny", "cloudy", "raining"}
    assert 0.0 <= report["test_accuracy"] <= 1.0 and report["feature_dim"] == 32  # the tiny LM's hidden size
    assert report["und_distortion"] == {"strength": 0.3, "seed": 1, "translation": True}
    assert report["distinct_features"] == 24 and report["tsne"] == "tsne.png"
    assert (out / "tsne.png").read_bytes()[:4] == b"\x89PNG"
    assert "linear probe of 'weather' on token 0" in capsys.readouterr().out

    with pytest.raises(ValueError, match="token 99 is out of range"):
        main(args[:-8] + ["--token", "99", "--out", str(out), "--num_watches", "24", "--no_tsne"])
    with pytest.raises(ValueError, match="unknown attribute 'colour'"):
        main(args[:5] + ["--attribute", "colour", "--out", str(out), "--no_tsne"])


def test_token_features_pick_one_token(tiny_model_kwargs, watch_records):
    from unified_vlm.models.unified import UnifiedVLM

    torch.manual_seed(0)
    model = UnifiedVLM(**tiny_model_kwargs)
    images = torch.stack([r["image"] for r in watch_records[:5]])
    model.train()
    feats = token_features(model, images, token=1, batch_size=2)
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.no_grad():
        assert torch.allclose(feats, model.encode_understanding(images)[:, 1])
    assert feats.shape == (5, 32)


def test_probe_refuses_a_checkpoint_that_would_run_code(tmp_path):
    """The probe loads checkpoints through the safe loader, as fit and test do."""
    from unified_vlm.files import CheckpointError

    config = tmp_path / "config.yaml"
    config.write_text("data: {image_size: 16}\n")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Path(".")}, evil)  # a pathlib object: not plain data
    with pytest.raises(CheckpointError, match="refused to load"):
        main(["probe", "--config", str(config), "--ckpt_path", str(evil), "--out", str(tmp_path / "probe"), "--no_tsne"])
