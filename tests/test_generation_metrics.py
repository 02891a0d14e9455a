"""Generation metrics: faithfulness of pictures to their prompts, Fréchet/kernel distances, Inception FID errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unified_vlm.assets import shipped
from unified_vlm.datamodules.streams import WatchStream
from unified_vlm.datamodules.watch import render_watch, sample_watch
from unified_vlm.evaluation.generation import (
    GenerationScorer,
    frechet_distance,
    frechet_with_interval,
    generation_report,
    inception_fid,
    kernel_distance,
    prompt_of,
    reader_fid_metric,
    reader_frechet,
    score_generation,
)
from unified_vlm.evaluation.reader import WatchReader, WatchReaderConfig

READING = {"hour": 7, "minute": 13, "second": 7, "time": "07:13:07", "weather": "sunny", "battery": 57,
           "weather_pos": "top-left", "battery_pos": "bottom-right", "is_watch": 0.9}


def test_only_stated_attributes_are_scored_by_the_vqa_rules():
    scorer = GenerationScorer()
    scorer.add("Can you draw a smart watch, showing the time 07:13:07, with 67% battery.", READING)
    scorer.add("Please show a smart watch, the time is 01:13:07, with a raining weather icon, "
               "battery indicator at bottom-right.", {**READING, "is_watch": 0.2})
    s = scorer.summary()
    assert s["time"] == pytest.approx((1.0 + (1 - (6 / 6) / 3)) / 2)  # second: 6 hours off on a 12 h dial
    assert s["battery"] == pytest.approx(0.9)
    assert s["weather"] == 0.0 and s["battery_pos"] == 1.0
    assert s["weather_pos"] is None  # no prompt stated it
    assert s["count_per_attribute"] == {"time": 2, "weather": 1, "battery": 1, "weather_pos": 0, "battery_pos": 1}
    assert s["total"] == pytest.approx((1.0 + 2 / 3 + 0.9 + 0.0 + 1.0) / 5)
    assert s["is_watch"] == 0.5 and s["count"] == 2


def test_conflicting_prompt_and_empty_scorer():
    scorer = GenerationScorer()
    row = scorer.add("a watch, showing sunny weather, showing cloudy weather, displaying 07:13:07", READING)
    assert row["scores"]["weather"] == 0.0 and row["scores"]["time"] == 1.0
    with pytest.raises(ValueError, match="no generated images"):
        GenerationScorer().summary()
    with pytest.raises(ValueError, match="prompt string or a generation record"):
        prompt_of({"id": 1})


def test_frechet_distance_is_the_closed_form_for_a_shift():
    torch.manual_seed(0)
    real = torch.randn(400, 8, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0] + [0.0] * 6, dtype=torch.float64)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, real + shift) == pytest.approx(5.0, rel=1e-4)  # same covariance: |shift|^2
    out = frechet_with_interval(real, real[:200] + shift, bootstrap=50, seed=1)
    assert out["low"] <= out["fd"] <= out["high"] and out["high"] - out["low"] < 5
    assert out["n_real"] == 400 and out["n_fake"] == 200
    other = torch.randn(100, 8, dtype=torch.float64)  # same distribution, few samples: FD biased upward
    out = frechet_with_interval(real[:100], other, bootstrap=50)
    assert out["bootstrap_bias"] > 0 and out["low"] <= out["fd"] <= out["high"]
    same, _ = kernel_distance(real, real, subsets=10, subset_size=100)
    far, _ = kernel_distance(real, real + shift, subsets=10, subset_size=100)
    assert abs(same) < 0.05 < far
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(real, real[:, :4])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(real, real[:1])


def test_reader_features_plug_into_torchmetrics():
    torch.manual_seed(0)
    reader = WatchReader(WatchReaderConfig(face_size=32, face_channels=(8, 8), corner_channels=(8, 8), feature_dim=8,
                                             polar_rows=6, polar_columns=60, polar_channels=(4, 8))).eval()
    images = torch.stack([torch.from_numpy(np.array(render_watch(sample_watch(0, "t", i), 32))).permute(2, 0, 1)
                          for i in range(24)]).float() / 255
    metric = reader_fid_metric(reader)
    metric.update(images, real=True)
    metric.update(images, real=False)
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-4)
    out = reader_frechet(reader, images[:12], real=images[12:], bootstrap=10, kid=True)
    assert out["fd"] >= 0 and out["low"] <= out["high"] and "kid" in out


def test_inception_fid_never_downloads(tmp_path):
    images = torch.rand(2, 3, 32, 32)
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        inception_fid(images, images, missing)
    with pytest.raises(FileNotFoundError, match="not found"):
        inception_fid(images, images, None)
    pytest.importorskip("numpy")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        missing.write_bytes(b"not really weights")
        with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
            inception_fid(images, images, missing)


@pytest.mark.skipif(shipped("watch_reader") is None, reason="no shipped reader")
def test_renders_are_faithful_to_their_own_prompts_and_not_to_others():
    """Ground-truth renders of generation records score near 1 against their prompts; the same
    pictures against the prompts of other watches score far lower."""
    from unified_vlm.evaluation.reader import load_reader

    reader = load_reader()
    stream = WatchStream(split="gen-metric-check", num_watches=120, tasks=("generation",), image_size=64)
    items = [stream[i] for i in range(len(stream))]
    images, records = [it["image"] for it in items], [stream.record(i) for i in range(len(stream))]
    own = score_generation(reader, images, records)
    other = score_generation(reader, images, records[1:] + records[:1])
    assert own["total"] > 0.95 and own["is_watch"] == 1.0
    assert other["total"] < own["total"] - 0.2
    assert own["count"] == 120 and own["count_per_attribute"]["time"] == 120
    report = generation_report(reader, images[:40], records[:40], real=images[40:], bootstrap=3, renderer="vq_decoder")
    assert report["renderer"] == "vq_decoder" and report["image_size"] == 64
    assert report["faithfulness"]["count"] == 40 and report["frechet"]["n_real"] == 80


@pytest.mark.skipif(shipped("watch_reader") is None, reason="no shipped reader")
def test_generation_benchmark_runs_and_orders_the_reference_generators():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "generation_metrics.py"
    spec = importlib.util.spec_from_file_location("generation_metrics", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r["images"]: r for r in bench.run(n=40, size=64, bootstrap=3, n_real=60)}
    total = {k: r["faithfulness"]["total"] for k, r in rows.items()}
    assert total["renders"] > 0.95 and total["other_prompts"] < total["renders"] - 0.2
    assert rows["vq_roundtrip"]["frechet"]["fd"] > rows["renders"]["frechet"]["fd"]


def test_reference_renders_follow_a_variant_style():
    """The Fréchet reference is drawn the way the split under test is drawn (dataset variants)."""
    from unified_vlm.datamodules.variants import SplitStyle
    from unified_vlm.evaluation.generation import reference_renders

    standard = reference_renders(4, 32)
    assert torch.equal(standard, reference_renders(4, 32, style=SplitStyle()))
    assert not torch.equal(standard, reference_renders(4, 32, style=SplitStyle(icons="flat", battery_color="blue")))
