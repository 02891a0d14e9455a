"""Plot the curves of ``generation_binding.py --out DIR`` runs side by side, one line per run.

    python benchmarks/binding_curves.py runs/gb/C_paper runs/gb/E_gen_curr400 --out curves.png
    python benchmarks/binding_curves.py runs/gb/* --draw cfg3 --label C_paper="no curriculum"

Panels: faithfulness per stated attribute and in total (the draw ``--draw`` names, ``cfg1`` by
default: guidance scale 1, the config's temperature), the prompt gain, and, for runs with VQA
batches, the teacher-forced exact match of the two corner questions. Each run's label is its folder
name unless ``--label NAME=TEXT`` says otherwise. Prints the last row of each run as a table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = ("total", "weather", "weather_pos", "battery_pos", "time", "battery")


def load(run: Path) -> list[dict]:
    path = run / "curves.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run}: no curves.jsonl (written by generation_binding.py --out {run})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="folders written by generation_binding.py --out")
    p.add_argument("--draw", default="cfg1", help="which draw's faithfulness to plot (cfg1, cfg3, cfg1_t0.5, ...)")
    p.add_argument("--label", action="append", default=[], metavar="NAME=TEXT", help="legend text for the run folder NAME")
    p.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    args = p.parse_args()
    labels = dict(item.split("=", 1) for item in args.label)
    curves = {run: load(run) for run in args.runs}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_vqa = any("vqa" in row for rows in curves.values() for row in rows)
    panels = list(PANELS) + ["prompt gain"] + (["VQA corner questions"] if with_vqa else [])
    columns = 4
    rows_of_panels = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4 * columns, 3.2 * rows_of_panels), squeeze=False)
    colours = {run: f"C{k % 10}" for k, run in enumerate(curves)}  # one colour per run in every panel
    for ax, panel in zip(axes.flat, panels):
        for run, rows in curves.items():
            label = labels.get(run.name, run.name)
            if panel == "prompt gain":
                points = [(r["step"], r["prompt_gain"]) for r in rows]
            elif panel == "VQA corner questions":
                points = [(r["step"], (r["vqa"]["battery_pos"] + r["vqa"]["weather_pos"]) / 2) for r in rows if "vqa" in r]
            else:
                points = [(r["step"], r[args.draw][panel]) for r in rows if panel in r.get(args.draw, {})]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label, color=colours[run])
        ax.set_title(panel if panel in ("prompt gain", "VQA corner questions") else f"faithfulness: {panel}", fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)

    print(f"{'run':32s} {'step':>5s} " + " ".join(f"{k:>11s}" for k in PANELS) + "  gain")
    for run, rows in curves.items():
        last = rows[-1]
        faith = last.get(args.draw, {})
        print(f"{labels.get(run.name, run.name)[:32]:32s} {last['step']:5d} "
              + " ".join(f"{faith.get(k, float('nan')):11.2f}" for k in PANELS) + f"  {last['prompt_gain']:+.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
