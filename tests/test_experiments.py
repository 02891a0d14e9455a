"""Experiments: every shipped experiment file plans, bad files fail naming what to change, the
runner skips / resumes / records failures on a real two-cell matrix, and report summarises it."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from unified_vlm.experiments import results
from unified_vlm.experiments.plan import CellError, plan_cells
from unified_vlm.experiments.report import line_figure
from unified_vlm.experiments.report import load as load_report
from unified_vlm.experiments.report import main as report_main
from unified_vlm.experiments.runner import main as experiment_main
from unified_vlm.experiments.runner import slurm_script
from unified_vlm.experiments.spec import SpecError, load_spec, select

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))


def write(path: Path, payload: dict) -> Path:
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path


def steps_of(plans, cell_id: str) -> int:
    plan = next(p for p in plans if p.id == cell_id)
    return plan.config["trainer"]["max_steps"]


# ------------------------------------------------------------------------------------ shipped files
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[e.stem for e in EXPERIMENTS])
def test_shipped_experiment_dry_runs(experiment, tmp_path, capsys):
    assert experiment_main([str(experiment), "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    spec = load_spec(experiment)
    cells = spec.cells()
    assert f"{len(cells)} cell(s)" in out
    assert out.count(" -m unified_vlm fit --config ") == len(cells)
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_regimes_follow_the_papers_step_arithmetic(tmp_path):
    """Equal-epoch baselines train the share of the mixed run's draws their tasks make up; equal-step
    ones as many steps as the mixed run (docs/paper.md 3.2: 459 / 306 / 153 at paper size)."""
    tiny = plan_cells(load_spec(ROOT / "configs/experiments/tiny_mixed_vs_specific.yaml"), tmp_path)
    fixed = 400  # the tiny experiment's trainer.max_steps, on the paper's equal mix (data.proportions null)
    for arch in ("siglip_vq", "vq_vq"):  # every record once: 1 of 3 records per watch is a generation record
        assert steps_of(tiny, f"architecture={arch}__regime=mixed__seed=0") == fixed
        assert steps_of(tiny, f"architecture={arch}__regime=understanding_epoch__seed=1") == round(fixed * 2 / 3)
        assert steps_of(tiny, f"architecture={arch}__regime=generation_epoch__seed=2") == round(fixed / 3)
        assert steps_of(tiny, f"architecture={arch}__regime=generation_step__seed=0") == fixed
    # With data.proportions the shares come from the weights: {vqa 0.6, caption 0.2, generation 0.2}
    raw = yaml.safe_load((ROOT / "configs/experiments/tiny_mixed_vs_specific.yaml").read_text())
    raw["fixed"].update({"data.proportions": {"vqa": 0.6, "caption": 0.2, "generation": 0.2}, "trainer.max_steps": 300})
    weighted_file = tmp_path / "weighted.yaml"
    weighted_file.write_text(yaml.safe_dump(raw))
    weighted = plan_cells(load_spec(weighted_file), tmp_path / "weighted")
    assert steps_of(weighted, "architecture=siglip_vq__regime=understanding_epoch__seed=1") == 240
    assert steps_of(weighted, "architecture=siglip_vq__regime=generation_epoch__seed=2") == 60
    tiny = weighted
    understanding = next(p for p in tiny if p.id == "architecture=siglip_vq__regime=understanding_step__seed=0")
    assert understanding.config["data"]["mode"] == "understanding"
    assert understanding.config["data"]["proportions"] == {"vqa": 0.6, "caption": 0.2}
    assert understanding.config["trainer"]["max_epochs"] == -1
    assert understanding.config["seed_everything"] == 0
    seed2 = next(p for p in tiny if p.id == "architecture=siglip_vq__regime=understanding_step__seed=2")
    assert seed2.config["seed_everything"] == 2 and seed2.id in seed2.config["trainer"]["default_root_dir"]

    # With a curriculum, its stage and the mix after it shrink by their own shares: 600 steps of
    # {vqa 0.5, generation 0.5}, then 1,800 of {vqa 0.4, caption 0.2, generation 0.4}.
    learned = plan_cells(load_spec(ROOT / "configs/experiments/tiny_learned_mixed_vs_specific.yaml"), tmp_path / "learned")
    assert steps_of(learned, "architecture=siglip_vq__regime=mixed__seed=0") == 2400
    understanding = next(p for p in learned if p.id == "architecture=siglip_vq__regime=understanding_epoch__seed=0")
    assert understanding.config["trainer"]["max_steps"] == 300 + 1080
    assert understanding.config["data"]["curriculum"]["steps"] == 300
    generation = next(p for p in learned if p.id == "architecture=vq_vq__regime=generation_epoch__seed=1")
    assert generation.config["trainer"]["max_steps"] == 300 + 720 and generation.config["data"]["curriculum"]["steps"] == 300
    same_steps = next(p for p in learned if p.id == "architecture=siglip_vq__regime=generation_step__seed=0")
    assert same_steps.config["trainer"]["max_steps"] == 2400 and same_steps.config["data"]["curriculum"]["steps"] == 600

    paper = plan_cells(load_spec(ROOT / "configs/experiments/paper_mixed_vs_specific.yaml"), tmp_path,
                       [c for c in load_spec(ROOT / "configs/experiments/paper_mixed_vs_specific.yaml").cells() if c.labels["seed"] == "42"
                        and c.labels["architecture"] == "vq_vq"])
    assert steps_of(paper, "architecture=vq_vq__regime=understanding_epoch__seed=42") == 306
    assert steps_of(paper, "architecture=vq_vq__regime=generation_epoch__seed=42") == 153
    assert steps_of(paper, "architecture=vq_vq__regime=generation_step__seed=42") == 459


# ------------------------------------------------------------------------------------ bad files
BASE = str(ROOT / "configs" / "tiny_vq_vq.yaml")


@pytest.mark.parametrize("payload, message", [
    ({"base": BASE, "axis": {}}, "unknown top-level key(s) 'axis' (did you mean 'axes'?)"),
    ({"axes": {}}, "no base config"),
    ({"base": "configs/nope.yaml"}, "no config file 'configs/nope.yaml'"),
    ({"base": BASE, "axes": {"lr": {"kind": "grid", "values": [1]}}}, "kind must be one of"),
    ({"base": BASE, "axes": {"lr": {"kind": "key", "key": "model.optim.lr", "values": [1], "step": 2}}}, "unknown key(s) ['step']"),
    ({"base": BASE, "axes": {"regime": {"kind": "regime", "values": ["mixed", "understanding"]}}}, "unknown regime(s) ['understanding']"),
    ({"base": BASE, "axes": {"seed": {"kind": "seed", "values": [0, "one"]}}}, "must be an integer"),
    ({"base": BASE, "fixed": {"trainer.default_root_dir": "x"}}, "is set by the runner"),
    ({"base": BASE, "fixed": {"trainer.max_steps": 3}, "axes": {"steps": {"kind": "key", "key": "trainer.max_steps", "values": [1, 2]}}},
     "set by both fixed and axis 'steps'"),
    ({"base": BASE, "fixed": {"data.mode": "understanding"}, "axes": {"regime": {"kind": "regime", "values": ["mixed"]}}},
     "fixed sets data.mode but the regime axis sets it"),
    ({"base": BASE, "axes": {"seed": {"kind": "seed", "values": [0, 1]}}, "exclude": [{"name": "typo", "match": {"seed": "7"}}]},
     "'7' matches no label of axis 'seed'"),
    ({"base": BASE, "axes": {"seed": {"kind": "seed", "values": [0]}}, "exclude": [{"name": "all", "match": {"seed": "*"}}]},
     "leave no cell"),
    ({"base": BASE, "axes": {"lr": {"kind": "key", "key": "model.optim.lr", "values": ["1/2"]}}}, "cannot name a cell directory"),
    ({"base": BASE, "report": {"lines": [{"axis": "strength"}]}}, "report.lines[0]"),
    ({"base": BASE, "axes": {"seed": {"kind": "seed", "values": [0]}}, "report": {"replicates": "start"}}, "report.replicates"),
    ({"base": BASE, "report": {"compare": "total"}}, "report.compare lists test scores as scope.metric"),
])
def test_bad_experiment_files_name_the_problem(tmp_path, payload, message):
    path = write(tmp_path / "bad.yaml", payload)
    with pytest.raises(SpecError) as error:
        load_spec(path).cells()
    assert message in str(error.value)


def test_cells_that_do_not_parse_fail_before_any_runs(tmp_path, capsys):
    path = write(tmp_path / "bad_cells.yaml", {
        "base": BASE,
        "axes": {"variant": {"kind": "overrides", "values": {
            "ok": {}, "typo": {"model.optim.lrr": 0.001}, "typo2": {"data.num_train_watchs": 8}, "badtype": {"trainer.max_steps": "three"}}}},
    })
    with pytest.raises(CellError) as error:
        plan_cells(load_spec(path), tmp_path / "out")
    text = str(error.value)
    assert "3 cell(s) would not run" in text and "variant=ok" not in text
    assert "cell variant=typo " in text and "fit has no key model.optim.lrr (did you mean model.optim.lr" in text
    assert "cell variant=typo2 " in text and "fit has no key data.num_train_watchs (did you mean data.num_train_watches" in text
    assert "cell variant=badtype " in text and 'Parser key "trainer.max_steps"' in text
    assert experiment_main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert "would not run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_only_and_slurm_select_cells(tmp_path):
    path = write(tmp_path / "e.yaml", {
        "base": BASE,
        "axes": {"regime": {"kind": "regime", "values": ["mixed", "understanding_epoch", "generation_step"]},
                 "seed": {"kind": "seed", "values": [0, 1]}},
        "exclude": [{"name": "one seed of generation", "match": {"regime": "generation_*", "seed": "1"}}],
        "slurm": {"time": "00:10:00"},
    })
    spec = load_spec(path)
    cells = spec.cells()
    assert len(cells) == 5
    assert [c.id for c in select(cells, "regime=understanding_*")] == ["regime=understanding_epoch__seed=0", "regime=understanding_epoch__seed=1"]
    assert [c.id for c in select(cells, "seed=1,regime=mixed")] == ["regime=mixed__seed=1"]
    with pytest.raises(SpecError, match="matches no cell"):
        select(cells, "seed=7")
    plans = plan_cells(spec, tmp_path / "out")
    assert experiment_main([str(path), "--out", str(tmp_path / "out"), "--emit-slurm", str(tmp_path / "array.sh")]) == 0
    script = (tmp_path / "array.sh").read_text()
    assert script == slurm_script(spec, plans, tmp_path / "out")
    assert "#SBATCH --array=0-4" in script and "#SBATCH --time=00:10:00" in script
    assert '--cell "${CELLS[$SLURM_ARRAY_TASK_ID]}"' in script
    assert all(f"  {p.id}" in script for p in plans)
    assert json.loads((tmp_path / "out" / "experiment.json").read_text())["cells"][0]["id"] == plans[0].id
    assert "#SBATCH --array=0-1" in slurm_script(spec, [p for p in plans if p.cell.labels["seed"] == "1"], tmp_path / "out")
    assert experiment_main([str(path), "--out", str(tmp_path / "out"), "--cell", "regime=nope"]) == 2


# ------------------------------------------------------------------------------------ report
def fake_cell(root: Path, cell_id: str, total: float | None, mode: str = "mixed", curve=(0.3, 0.6)) -> None:
    """A cell directory as the runner leaves it (total None: a failed cell)."""
    directory = root / cell_id
    (directory / "logs" / "version_0").mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"data": {"mode": mode}}))
    with open(directory / "logs" / "version_0" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "val/vqa/total", "val/gen/total"])
        writer.writeheader()
        for step, value in zip((9, 19), curve):
            writer.writerow({"step": step, "val/vqa/total": value, "val/gen/total": 1 - value})
    if total is None:
        (directory / results.FAILED).write_text(json.dumps({"reason": "exit status 1"}))
        return
    scores = {"summary": {"all_turns": {"time": total / 2, "total": total, "count": 40, "count_per_attribute": {"time": 10}},
                          "first_turn": {"total": total, "count": 10}}, "results": [{"score": 1.0}]}
    (directory / results.SCORES).write_text(json.dumps(scores))
    (directory / results.DONE).write_text("{}")


def strength_by_seed(tmp_path: Path, **extra) -> Path:
    """An experiment file of two learning rates by two seeds (the report and archive tests' matrix)."""
    return write(tmp_path / "e.yaml", {
        "name": "fake", "base": BASE,
        "axes": {"strength": {"kind": "key", "key": "model.optim.lr", "values": [0.1, 0.3]},
                 "seed": {"kind": "seed", "values": [0, 1]}},
        **extra,
    })


def test_report_averages_over_seeds_and_marks_failures(tmp_path, capsys):
    spec_path = strength_by_seed(tmp_path)
    out = tmp_path / "run"
    fake_cell(out, "strength=0.1__seed=0", 0.5)
    fake_cell(out, "strength=0.1__seed=1", 0.7)
    fake_cell(out, "strength=0.3__seed=0", 0.4)
    fake_cell(out, "strength=0.3__seed=1", None)
    assert report_main([str(spec_path), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    mean, std = statistics.fmean([0.5, 0.7]), statistics.stdev([0.5, 0.7])
    assert f"| 0.1 | {0.3:.3f} ± {0.0707:.3f} | {mean:.3f} ± {std:.3f} | 2 |  |" in text  # all_turns: time, total
    assert "| 0.3 | 0.200 | 0.400 | 1 | seed=1: failed |" in text
    assert "### first_turn" in text and "count" not in text
    assert "`strength=0.3__seed=1`: exit status 1" in text
    for figure in ("curves.png", "strength.png", "bars.png"):
        assert (out / figure).stat().st_size > 1000, figure
    experiment = load_report(str(spec_path), out)
    assert [c.state for c in experiment.cells] == ["done", "done", "done", "failed"]


def test_steps_to_threshold_per_group(tmp_path):
    """The first validation at or above a level, as optimiser steps (the CSV's step + 1), averaged
    over the seeds that reached it; a column a cell does not log is '-', a level never reached 'never'."""
    from unified_vlm.experiments.report import steps_to, thresholds_table

    assert steps_to([{"step": 9, "a": 0.3}, {"step": 19, "a": 0.7}, {"step": 29, "a": 0.9}], "a", 0.7) == 20
    assert steps_to([{"step": 9, "a": 0.3}], "a", 0.7) is None
    spec_path = strength_by_seed(tmp_path, report={"thresholds": {"val/vqa/total": 0.5, "val/gen/total": 0.6, "val/other": 1.0}})
    out = tmp_path / "run"
    fake_cell(out, "strength=0.1__seed=0", 0.5, curve=(0.3, 0.6))  # vqa reaches 0.5 at step 20
    fake_cell(out, "strength=0.1__seed=1", 0.5, curve=(0.55, 0.6))  # at step 10
    fake_cell(out, "strength=0.3__seed=0", 0.5, curve=(0.2, 0.3))  # never
    fake_cell(out, "strength=0.3__seed=1", None)
    table = thresholds_table(load_report(str(spec_path), out))
    assert "| 0.1 | 15 ± 7 (2/2) | 10 (1/2) | - |" in table  # gen = 1 - vqa: seed 0 0.7 at step 10, seed 1 never
    assert "| 0.3 | never (0/1) | 10 (1/1) | - |" in table
    with pytest.raises(SpecError, match="report.thresholds"):
        load_spec(write(tmp_path / "bad.yaml", {"name": "bad", "base": BASE, "axes": {"seed": {"kind": "seed", "values": [0]}},
                                               "report": {"thresholds": {"val/vqa/total": "high"}}}))


def test_differences_state_mixed_minus_each_baseline_in_standard_errors():
    """Hand-made scores: mixed 0.90/0.92/0.94 against 0.80/0.81/0.85 is +0.100, and its standard error
    sqrt(0.0004/3 + 0.0007/3) = 0.0191 makes it 5.2 SE; a baseline with one seed gets no SE, a regime
    without the score (generation-only for VQA) no row, an experiment without a regime axis no table."""
    from unified_vlm.experiments.report import CellResult, Experiment, difference, differences_table

    assert difference([1.0], [0.5, 0.7]) == (pytest.approx(0.4), None)
    assert difference([0.5, 0.5], [0.5, 0.5]) == (0.0, None)  # no spread: no SE, not a division by zero
    scores = {"mixed": [0.90, 0.92, 0.94], "understanding_step": [0.80, 0.81, 0.85], "understanding_epoch": [0.70]}
    cells = [CellResult(f"regime={regime}__seed={seed}", {"regime": regime, "seed": str(seed)}, "done",
                        {"all_turns.total": value, "generation.faithfulness.total": 0.6} if regime == "mixed"
                        else {"all_turns.total": value}, [], ())
             for regime, values in scores.items() for seed, value in enumerate(values)]
    axes = [{"name": "regime", "kind": "regime", "labels": list(scores)}, {"name": "seed", "kind": "seed", "labels": ["0", "1", "2"]}]
    table = differences_table(Experiment("x", "", Path("."), axes, {}, cells))
    assert "| all_turns.total | understanding_step | 0.920 | 0.820 | +0.100 | +5.2 | 3 / 3 |" in table
    assert "| all_turns.total | understanding_epoch | 0.920 | 0.700 | +0.220 | - | 3 / 1 |" in table
    assert "generation.faithfulness.total" not in table  # no baseline scores it
    no_regime = [{"name": "seed", "kind": "seed", "labels": ["0", "1", "2"]}]
    assert differences_table(Experiment("x", "", Path("."), no_regime, {}, [])) == ""


def test_the_gain_of_mixing_is_drawn_against_a_size_axis(tmp_path):
    """Part 5 of the learned-size experiments (model size): mixed minus each baseline at each width,
    hand-made. h128: VQA mixed 0.50/0.60 against 0.40/0.42 is +0.14 with SE sqrt(0.005/2 + 0.0002/2)
    = 0.0510; faithfulness 0.60/0.60 against 0.50/0.55 is +0.075, SE 0.025. h256: one mixed seed, no SE."""
    from unified_vlm.experiments.report import CellResult, Experiment, gain_figure, gain_points

    scores = {("h128", "mixed"): [(0.50, 0.6), (0.60, 0.6)], ("h128", "understanding_step"): [(0.40, None), (0.42, None)],
              ("h128", "generation_step"): [(None, 0.50), (None, 0.55)],
              ("h256", "mixed"): [(0.70, 0.7)], ("h256", "understanding_step"): [(0.80, None), (0.84, None)]}
    cells = []
    for (width, regime), values in scores.items():
        for seed, (vqa, drawn) in enumerate(values):
            cell_scores = {k: v for k, v in (("all_turns.total", vqa), ("generation.faithfulness.total", drawn)) if v is not None}
            cells.append(CellResult(f"width={width}__regime={regime}__seed={seed}",
                                    {"width": width, "regime": regime, "seed": str(seed)}, "done", cell_scores, [], ()))
    axes = [{"name": "width", "kind": "overrides", "labels": ["h128", "h256"]},
            {"name": "regime", "kind": "regime", "labels": ["mixed", "understanding_step", "generation_step"]},
            {"name": "seed", "kind": "seed", "labels": ["0", "1"]}]
    experiment = Experiment("size", "", tmp_path, axes, {}, cells)
    spec = {"axis": "width", "metrics": ["all_turns.total", "generation.faithfulness.total"], "x": {"h128": 128, "h256": 256}}
    points = gain_points(experiment, spec)
    assert set(points) == {("all_turns.total", "understanding_step", ()), ("generation.faithfulness.total", "generation_step", ())}
    (x1, d1, se1), (x2, d2, se2) = points[("all_turns.total", "understanding_step", ())]
    assert (x1, x2) == (128.0, 256.0) and d1 == pytest.approx(0.14) and se1 == pytest.approx(0.05099, abs=1e-5)
    assert d2 == pytest.approx(-0.12) and se2 is None
    assert points[("generation.faithfulness.total", "generation_step", ())] == [(128.0, pytest.approx(0.075), pytest.approx(0.025))]
    assert gain_figure(experiment, spec, tmp_path / "width_gain.png").stat().st_size > 1000
    assert gain_points(experiment, {"axis": "regime"}) == {}  # along the regime axis itself: no gain to draw


def test_archive_keeps_what_the_report_reads_and_grows_across_machines(tmp_path, capsys):
    """``report --archive DIR``: finished cells' scores and logs, a few KB each, from which ``report
    DIR`` gives the same tables once the run directories (here: two machines') are gone."""
    spec_path = strength_by_seed(tmp_path)
    first, second, kept = tmp_path / "machine1", tmp_path / "machine2", tmp_path / "archive"
    fake_cell(first, "strength=0.1__seed=0", 0.5)
    fake_cell(first, "strength=0.3__seed=0", 0.4)
    (first / "strength=0.3__seed=0" / "checkpoints").mkdir()
    (first / "strength=0.3__seed=0" / "checkpoints" / "last.ckpt").write_bytes(b"x" * 1000)
    assert report_main([str(spec_path), "--out", str(first), "--archive", str(kept)]) == 0
    assert "archived 2 finished cell(s)" in capsys.readouterr().out
    fake_cell(second, "strength=0.1__seed=1", 0.7)
    fake_cell(second, "strength=0.3__seed=1", None)  # failed: not archived
    assert report_main([str(spec_path), "--out", str(second), "--archive", str(kept)]) == 0
    assert sorted(p.name for p in kept.iterdir() if p.is_dir()) == [
        "strength=0.1__seed=0", "strength=0.1__seed=1", "strength=0.3__seed=0"]
    cell = kept / "strength=0.3__seed=0"
    assert not (cell / "checkpoints").exists() and "results" not in json.loads((cell / results.SCORES).read_text())
    # one command leaves both reports: the run directory's (its own cells) and the archive's (all of them)
    assert (second / "report.md").is_file() and f"wrote {kept / 'report.md'}" in capsys.readouterr().out
    text = (kept / "report.md").read_text()
    mean, std = statistics.fmean([0.5, 0.7]), statistics.stdev([0.5, 0.7])
    assert f"| 0.1 | {0.3:.3f} ± {0.0707:.3f} | {mean:.3f} ± {std:.3f} | 2 |  |" in text
    assert report_main([str(kept)]) == 0  # where the run directories are gone, the same report
    assert (kept / "report.md").read_text() == text
    assert [c.state for c in load_report(str(kept)).cells] == ["done", "done", "done", "not run"]
    assert len(load_report(str(kept)).cells[0].metrics) == 2  # the training curve came along
    other = write(tmp_path / "other.yaml", {"name": "other", "base": BASE,
                                            "axes": {"seed": {"kind": "seed", "values": [0]}}})
    fake_cell(tmp_path / "run3", "seed=0", 0.5)
    assert report_main([str(other), "--out", str(tmp_path / "run3"), "--archive", str(kept)]) == 2
    assert "archives experiment 'fake', not 'other'" in capsys.readouterr().err


def test_a_new_checkout_skips_the_cells_finished_in_an_archive(tmp_path, capsys):
    """``experiment --archive DIR``: the cells a committed archive holds are not run again where the run
    directory is gone (a new checkout); the rest are planned as usual. A wrong archive is refused."""
    spec_path = strength_by_seed(tmp_path)
    first, kept, fresh = tmp_path / "machine1", tmp_path / "archive", tmp_path / "new_checkout"
    fake_cell(first, "strength=0.1__seed=0", 0.5)
    fake_cell(first, "strength=0.3__seed=1", 0.4)
    assert report_main([str(spec_path), "--out", str(first), "--archive", str(kept)]) == 0
    capsys.readouterr()

    assert experiment_main([str(spec_path), "--out", str(fresh), "--archive", str(kept), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "2 cell(s) finished in the archive" in printed and "experiment fake: 2 cell(s)" in printed
    assert "[new] strength=0.1__seed=1" in printed and "[new] strength=0.3__seed=0" in printed
    assert "] strength=0.1__seed=0" not in printed and "] strength=0.3__seed=1" not in printed
    assert experiment_main([str(spec_path), "--out", str(fresh), "--archive", str(kept),
                            "--emit-slurm", str(tmp_path / "array.sh")]) == 0
    script = (tmp_path / "array.sh").read_text()
    assert "#SBATCH --array=0-1" in script and "strength=0.1__seed=0" not in script
    # every selected cell archived: nothing runs, the command succeeds and names the archive's report
    assert experiment_main([str(spec_path), "--out", str(fresh), "--archive", str(kept), "--only", "seed=0,strength=0.1"]) == 0
    printed = capsys.readouterr().out
    assert "1/1 cell(s) done" in printed and f"--archive {kept}" in printed
    assert not (fresh / "strength=0.1__seed=0").exists()

    assert experiment_main([str(spec_path), "--archive", str(tmp_path / "nowhere"), "--dry-run"]) == 2
    assert "no such directory" in capsys.readouterr().err
    other = write(tmp_path / "other.yaml", {"name": "other", "base": BASE, "axes": {"seed": {"kind": "seed", "values": [0]}}})
    assert experiment_main([str(other), "--out", str(fresh), "--archive", str(kept), "--dry-run"]) == 2
    assert "archives experiment 'fake', not 'other'" in capsys.readouterr().err
    # the same name with other axes (a file edited since it was archived) is refused by both commands
    edited = write(tmp_path / "edited.yaml", {"name": "fake", "base": BASE, "axes": {"seed": {"kind": "seed", "values": [0]}}})
    assert experiment_main([str(edited), "--out", str(fresh), "--archive", str(kept), "--dry-run"]) == 2
    assert "with other axes" in capsys.readouterr().err
    assert report_main([str(edited), "--out", str(fresh), "--archive", str(kept)]) == 2
    assert "with other axes" in capsys.readouterr().err


def test_report_averages_over_a_named_replicate_axis(tmp_path):
    """An overrides axis whose values are replicates (each its own start and seed) is averaged over."""
    spec_path = write(tmp_path / "e.yaml", {
        "name": "fake", "base": BASE,
        "axes": {"frozen": {"kind": "overrides", "values": {"nothing": {"model.freeze": None}, "lm": {"model.freeze": ["lm"]}}},
                 "start": {"kind": "overrides", "values": {"a": {"seed_everything": 0}, "b": {"seed_everything": 1}}}},
        "report": {"replicates": "start"},
    })
    out = tmp_path / "run"
    for cell, total in (("frozen=nothing__start=a", 0.5), ("frozen=nothing__start=b", 0.7), ("frozen=lm__start=a", 0.4)):
        fake_cell(out, cell, total)
    assert report_main([str(spec_path), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    mean, std = statistics.fmean([0.5, 0.7]), statistics.stdev([0.5, 0.7])
    assert "mean ± sample std over the `start` axis" in text
    assert f"| nothing | {0.3:.3f} ± {0.0707:.3f} | {mean:.3f} ± {std:.3f} | 2 |  |" in text
    assert "| lm | 0.200 | 0.400 | 1 | start=b: not run |" in text


def test_a_label_left_out_of_the_x_mapping_is_drawn_as_a_reference(tmp_path):
    """Fig. 4 style: strengths on the x axis, the undistorted run as a dashed reference line."""
    spec_path = write(tmp_path / "e.yaml", {
        "name": "fake", "base": BASE,
        "axes": {"distortion": {"kind": "key", "key": "model.optim.lr", "values": {"none": 0.1, "s0.1": 0.2, "s0.3": 0.3}}},
        "report": {"lines": [{"axis": "distortion", "metrics": ["all_turns.total"], "x": {"s0.1": 0.1, "s0.3": 0.3}}]},
    })
    out = tmp_path / "run"
    for cell, total in (("distortion=none", 0.6), ("distortion=s0.1", 0.5), ("distortion=s0.3", 0.4)):
        fake_cell(out, cell, total)
    assert report_main([str(spec_path), "--out", str(out)]) == 0
    assert (out / "distortion.png").stat().st_size > 1000
    experiment = load_report(str(spec_path), out)
    spec = {"axis": "distortion", "metrics": ["all_turns.total"]}  # no mapping: "none" has no place
    with pytest.raises(ValueError, match=r"labels \['none', 's0.1', 's0.3'\] are not numbers"):
        line_figure(experiment, spec, tmp_path / "x.png")


def test_metrics_of_a_resumed_cell_drop_the_redone_steps(tmp_path):
    for version, steps in ((0, [0, 1, 2, 3]), (1, [2, 3, 4])):
        directory = tmp_path / "logs" / f"version_{version}"
        directory.mkdir(parents=True)
        with open(directory / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "train/loss"])
            writer.writeheader()
            writer.writerows({"step": s, "train/loss": 10 * version + s} for s in steps)
    merged = results.merged_metrics(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in merged] == [(0, 0), (1, 1), (2, 12), (3, 13), (4, 14)]


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_runner_end_to_end_skip_resume_failure_report(tmp_path, tiny_vq_dir, capsys):
    """Two cells of a few steps as real subprocesses: one finishes, one fails (its records file does
    not exist) and is recorded; a rerun skips the finished cell; an interrupted cell (a last.ckpt and
    no done marker) resumes from its checkpoint; report writes the table and figures."""
    from test_cli import MAIN_CONFIG, tiny_overrides

    tiny = tiny_overrides(tmp_path, tiny_vq_dir, MAIN_CONFIG)
    experiment = {
        "name": "two_cells",
        "base": [str(MAIN_CONFIG), str(tiny)],
        "fixed": {"trainer.max_steps": 2, "trainer.val_check_interval": 1, "vqa_probe.max_records": 2},
        "axes": {"variant": {"kind": "overrides", "values": {"ok": {}, "broken": {"data.train_records": str(tmp_path / "missing.jsonl")}}}},
    }
    spec_path = write(tmp_path / "two_cells.yaml", experiment)
    out = tmp_path / "run"
    ok, broken = out / "variant=ok", out / "variant=broken"

    assert experiment_main([str(spec_path), "--out", str(out), "--workers", "2"]) == 1
    printed = capsys.readouterr().out
    assert "1/2 cell(s) done; not done: variant=broken" in printed
    assert results.state(ok) == "done"
    for name in ("done.json", "test_scores.json", "metrics.csv", "log.txt", "command.sh", "config.yaml", "cell.json", "checkpoints/last.ckpt"):
        assert (ok / name).is_file(), name
    assert json.loads((ok / "cell.json").read_text())["threads"] >= 1
    assert yaml.safe_load((ok / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    failure = json.loads((broken / results.FAILED).read_text())
    assert failure["reason"] == "exit status 1" and "missing.jsonl" in failure["log_tail"]

    # a rerun skips the finished cell (--cell: what each SLURM array task runs)
    log_size = (ok / "log.txt").stat().st_size
    assert experiment_main([str(spec_path), "--out", str(out), "--cell", "variant=ok"]) == 0
    assert "1 cell(s) already done, skipped" in capsys.readouterr().out
    assert (ok / "log.txt").stat().st_size == log_size

    # an interrupted cell (checkpoint at step 2, no done marker) resumes to the longer schedule, and its
    # record adds the earlier run's time to this one's
    (ok / results.DONE).unlink()
    (ok / results.SCORES).unlink()
    (ok / "interrupted.json").write_text(json.dumps({"exit_status": 143, "seconds": 100.0, "seconds_total": 100.0, "runs": 1}))
    experiment["fixed"]["trainer.max_steps"] = 3
    write(spec_path, experiment)
    assert experiment_main([str(spec_path), "--out", str(out), "--only", "variant=ok", "--dry-run"]) == 0
    assert f"--ckpt_path {ok / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert experiment_main([str(spec_path), "--out", str(out), "--only", "variant=ok"]) == 0
    done = json.loads((ok / results.DONE).read_text())
    assert done["resumed"] is True and done["runs"] == 2 and done["seconds_total"] == round(100.0 + done["seconds"], 1)
    assert not (ok / "interrupted.json").exists()
    assert "resume from" in (ok / "log.txt").read_text()
    assert f"done after {done['seconds']} s ({done['seconds_total']} s over 2 run(s))" in (ok / "log.txt").read_text()
    assert torch.load(ok / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    steps = [r["step"] for r in results.read_csv(ok / "metrics.csv") if "train/loss" in r]
    assert len(results.versions(ok)) == 2 and sorted(set(steps)) == sorted(steps), "no step logged twice"

    experiment["fixed"]["trainer.max_steps"] = 4  # a finished cell is not rerun silently with another schedule
    write(spec_path, experiment)
    assert experiment_main([str(spec_path), "--out", str(out), "--dry-run"]) == 0
    assert "[done] variant=ok (done with a different command: delete the directory to rerun)" in capsys.readouterr().out

    assert report_main([str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| ok |" in text and "| broken | - |" in text and "failed" in text
    assert (out / "curves.png").is_file() and (out / "bars.png").is_file()


def test_bar_labels_keep_the_scope_only_where_names_would_collide():
    from unified_vlm.experiments.report import tick_labels

    assert tick_labels(["all_turns.weather", "all_turns.total"]) == ["weather", "total"]
    assert tick_labels(["all_turns.weather", "first_turn.weather", "all_turns.total"]) == [
        "all_turns.weather", "first_turn.weather", "all_turns.total"]


# ------------------------------------------------------------------------------------ archives
ARCHIVES = sorted(p for p in (ROOT / "docs" / "runs").glob("*") if p.is_dir())


@pytest.mark.parametrize("archive", ARCHIVES, ids=[p.name for p in ARCHIVES])
def test_committed_archives_load_and_match_their_experiment_file(archive):
    """docs/runs/<name>: what docs/results.md reports, redrawable by `report docs/runs/<name>`."""
    experiment = load_report(str(archive))
    spec = load_spec(ROOT / "configs" / "experiments" / f"{archive.name}.yaml")
    assert experiment.name == spec.name == archive.name
    assert [c.id for c in experiment.cells] == [c.id for c in spec.cells()]
    finished = [c for c in experiment.cells if c.state == "done"]
    assert finished and all(c.scores and c.metrics for c in finished)
    archived = {p.name for p in archive.iterdir() if p.is_dir()}
    assert archived == {c.id for c in finished}  # only finished cells are archived
    assert sum(f.stat().st_size for f in archive.rglob("*") if f.is_file()) < 200_000 * max(1, len(archived))
