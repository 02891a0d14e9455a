"""Writes the test-time report: VQA scores (JSON + printed table) and a grid of generated watches."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only

from unified_vlm.evaluation import record_tasks
from unified_vlm.evaluation.vqa import score_answers
from unified_vlm.files import write_json_atomically

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """The logger's version directory when there is one, else ``default_root_dir``."""
    directory = trainer.log_dir if trainer.logger is not None and trainer.log_dir else trainer.default_root_dir
    return Path(directory)


def gather_objects(trainer: L.Trainer, items: list) -> list:
    """Every rank's ``items``, concatenated in rank order (the list itself on one process)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return items
    gathered: list[list] = [None] * trainer.world_size  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def validation_records(trainer: L.Trainer, task: str, limit: int) -> list[dict]:
    """This rank's share of the first ``limit`` records of ``task`` in the validation split."""
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "datasets", {}).get("val") if datamodule is not None else None
    if dataset is None:
        return []
    chosen = [i for i, t in enumerate(dataset.tasks()) if t == task][:limit]
    return [dataset[i] for i in chosen[trainer.global_rank::trainer.world_size]]


def local_prompt_gain(pl_module, records: list[dict]) -> dict:
    """This rank's prompt gain on its generation records (scalars and their count; {} under 2)."""
    if len(records) < 2:
        return {}
    from unified_vlm.evaluation.prompt_gain import prompt_gain

    gain = prompt_gain(pl_module, records)
    scalars = {k: v for k, v in gain.items() if isinstance(v, float)}
    counts = {k.removeprefix("count/"): v for k, v in gain.items() if k.startswith("count/")}
    return {"scalars": scalars, "n": len(records), "counts": counts}


def pooled_prompt_gain(parts: list[dict]) -> dict[str, float]:
    """Every rank's ``local_prompt_gain`` averaged, weighted by the records each one scored."""
    from unified_vlm.evaluation.captions import ATTRIBUTES

    pooled: dict[str, float] = {}
    for key in ("prompt_gain", *(f"prompt_gain/{a}" for a in ATTRIBUTES)):
        attribute = key.partition("/")[2]
        weighted = [(p["scalars"][key], p["counts"].get(attribute, 0) if attribute else p["n"])
                    for p in parts if p and key in p["scalars"]]
        total = sum(w for _, w in weighted)
        if total:
            pooled[key] = sum(v * w for v, w in weighted) / total
    return pooled


def image_grid(pairs: list[tuple[torch.Tensor, Optional[torch.Tensor]]], cell: int = 128, columns: int = 8) -> torch.Tensor:
    """Ground truth above generated, ``columns`` pairs per row; a missing image is drawn grey."""
    tiles = []
    for target, generated in pairs:
        top = F.interpolate(target[None].float(), size=(cell, cell), mode="nearest")[0]
        bottom = (
            F.interpolate(generated[None].float(), size=(cell, cell), mode="nearest")[0]
            if generated is not None
            else torch.full((3, cell, cell), 0.5)
        )
        tiles.append(torch.cat([top, torch.ones(3, 2, cell), bottom], dim=1))
    from torchvision.utils import make_grid

    return make_grid(torch.stack(tiles), nrow=columns, padding=4, pad_value=1.0)


class EvaluationReport(L.Callback):
    """Collects ``test_step`` outputs; at the end of testing scores both directions and writes them
    into ``test_scores.json`` in the run directory:

    - ``summary``: every VQA turn and the first turns (docs/paper.md 4.2), printed as a table;
    - ``generation``: faithfulness of the generated watches to what their prompts state, read by
      the watch reader (``reader``: ``builtin``, ``all_styles`` or a ``train-reader`` directory), and the Fréchet
      distance on the reader's features against ``fd_reference`` held-out renders, with a
      bootstrap 95 % interval (``unified_vlm.evaluation.generation``); standard Inception FID
      too when ``inception_weights`` names a local weights file;
      and the prompt gain (``unified_vlm.evaluation.prompt_gain``; prompts swapped within each
      test batch);
    - ``captions``: which attributes the generated captions state and how many are right
      (``unified_vlm.evaluation.captions``);
    - ``results``: every scored VQA turn.

    ``generation_grid.png`` shows ground truth above generated for the first ``grid_size`` prompts.
    Metrics are also logged as ``test/...``.
    """

    def __init__(self, scores_file: str = "test_scores.json", grid_file: str = "generation_grid.png", grid_size: int = 16,
                 reader: Optional[str] = "builtin", fd_reference: int = 1000, bootstrap: int = 100,
                 inception_weights: Optional[str] = None) -> None:
        if fd_reference < 2 or bootstrap < 0:
            raise ValueError(f"report.fd_reference must be >= 2 and report.bootstrap >= 0, got {fd_reference}, {bootstrap}")
        self.scores_file, self.grid_file, self.grid_size = scores_file, grid_file, grid_size
        self.reader, self.fd_reference, self.bootstrap = reader, fd_reference, bootstrap
        self.inception_weights = inception_weights
        self.vqa: list[dict] = []
        self.generated: list[dict] = []
        self.captions: list[dict] = []
        self.summary: Optional[dict] = None
        self._reader = None  # loaded once in setup

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Give the model its test step (``record_tasks.run_records``, unless it has one); check the
        reader and Inception files before anything runs, not after a long test."""
        if stage == "test":
            record_tasks.attach(pl_module)
            self.load_test_files()

    def load_test_files(self) -> None:
        """Load the watch reader and check the Inception weights file, as testing needs them; also called
        when ``fit`` starts with ``test_after_fit``, so a missing file fails before training, not after it."""
        from unified_vlm.evaluation.reader import load_reader

        self._reader = load_reader(self.reader) if self.reader is not None else None
        if self.inception_weights is not None and not Path(self.inception_weights).is_file():
            raise FileNotFoundError(f"report.inception_weights: {self.inception_weights} does not exist "
                                    "(standard FID needs the Inception weights file on local disk; nothing is downloaded)")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.vqa, self.generated, self.captions, self.summary = [], [], [], None
        self.gain_parts: list[dict] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict):
            return
        self.vqa.extend(outputs.get("vqa", []))
        self.captions.extend(outputs.get("caption", []))
        self.generated.extend(outputs.get("generation", []))
        records = [r for r in batch if isinstance(r, dict) and r.get("task") == "generation" and r.get("image") is not None]
        with torch.no_grad():
            self.gain_parts.append(local_prompt_gain(pl_module, records))  # prompts swapped within the batch

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        scorer = score_answers(gather_objects(trainer, self.vqa))
        generated = gather_objects(trainer, self.generated)
        captions = gather_objects(trainer, self.captions)
        self.summary = scorer.summary()
        self.summary.update(self._generation(generated, pl_module, split_style(trainer, "test")))
        gain = pooled_prompt_gain(gather_objects(trainer, self.gain_parts))
        if gain and "generation" in self.summary:
            self.summary["generation"]["prompt_gain"] = gain
        if captions:
            self.summary["captions"] = score_caption_items(captions)
        for name, value in flat_metrics(self.summary).items():
            pl_module.log(f"test/{name}", value, sync_dist=False)
        self._write(run_dir(trainer), pl_module, scorer, generated)  # log_dir is read on every rank (DDP)

    def _generation(self, generated: list[dict], pl_module, style=None) -> dict:
        """The ``generation`` entry: faithfulness and Fréchet distance of the generated images."""
        if not generated or self.reader is None:
            return {}
        from unified_vlm.evaluation.generation import generation_report, inception_fid, reference_renders

        made = [g for g in generated if g["image"] is not None]
        report: dict = {"requested": len(generated), "generated": len(made)}
        if len(made) < 2:
            return {"generation": report}
        images = torch.stack([g["image"].float() for g in made])
        real = reference_renders(self.fd_reference, images.shape[-1], style=style)
        report.update(generation_report(self._reader, images, [g["prompt"] for g in made], real=real,
                                        bootstrap=self.bootstrap, renderer=renderer_name(pl_module)))
        if self.inception_weights is not None:
            report["inception_fid"] = inception_fid(real, images, self.inception_weights)
        return {"generation": report}

    @rank_zero_only
    def _write(self, directory: Path, pl_module, scorer, generated: list[dict]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"summary": {k: self.summary[k] for k in ("all_turns", "first_turn")},
                   **{k: v for k, v in self.summary.items() if k not in ("all_turns", "first_turn")},
                   "results": [asdict(r) for r in scorer.results]}
        write_json_atomically(directory / self.scores_file, payload)
        print("\nVQA scores on the test split (docs/paper.md 4.2 rules)\n" + scorer.format_table())
        if "generation" in self.summary:
            print(format_generation(self.summary["generation"]))
        if "captions" in self.summary:
            print(format_captions(self.summary["captions"]))
        print(f"wrote {directory / self.scores_file}")
        shown = [g for g in generated if g.get("target") is not None][: self.grid_size]
        if shown:
            from torchvision.utils import save_image

            grid = image_grid([(g["target"], g["image"]) for g in shown])
            save_image(grid, directory / self.grid_file)
            sampling = dict(getattr(pl_module, "hparams", {}).get("sampling", {}))
            write_json_atomically(
                directory / (Path(self.grid_file).stem + ".json"),
                {
                    "layout": "each column: ground truth (top) and generated (bottom)",
                    "sampling": sampling,
                    "prompts": [{"record_id": g["record_id"], "prompt": g["prompt"]} for g in shown],
                },
            )
            print(f"wrote {directory / self.grid_file}")


def split_style(trainer, split: str):
    """The look of ``split`` (a dataset variant's ``SplitStyle``), or None for the standard one."""
    variant = getattr(getattr(trainer, "datamodule", None), "variant", None)
    return variant.style(split) if variant is not None else None


def renderer_name(pl_module) -> str:
    """What made the pixels: the VQ decoder, or the feature space's renderer (docs/paper.md 7.2)."""
    output = dict(getattr(pl_module, "hparams", {}).get("image_output") or {})
    if output.get("space", "vq") == "vq":
        return "vq_decoder"
    return f"features via {output.get('renderer')}"


def score_caption_items(items: list[dict]) -> dict:
    """Caption metrics of ``record_tasks.write_captions`` outputs."""
    from unified_vlm.evaluation.captions import score_captions

    records = [{"id": c["record_id"], "attributes": c.get("attributes"),
                "conversations": [{"from": "human", "value": c["prompt"]}, {"from": "gpt", "value": c["reference"]}]}
               for c in items]
    return score_captions([c["caption"] for c in items], records)


def flat_metrics(summary: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a nested summary as ``a/b/c`` keys (counts, anything under a count and None
    left out), for loggers."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and "count" not in name and not key.startswith("n_"):
            out[name] = float(value)
    return out


def format_generation(report: dict) -> str:
    """Faithfulness per stated attribute and the Fréchet distance, for the console."""
    lines = [f"\nGeneration: {report.get('generated', 0)} of {report.get('requested', 0)} prompts gave an image"
             + (f" ({report['renderer']})" if report.get("renderer") else "")]
    faith = report.get("faithfulness") or {}
    for key, value in faith.items():
        if isinstance(value, float):
            lines.append(f"  faithfulness {key:<12} {value:.4f}")
    fd = report.get("frechet") or {}
    if fd:
        lines.append(f"  reader Fréchet distance {fd.get('fd', float('nan')):.3f} "
                     f"(95% interval {fd.get('low', float('nan')):.3f} to {fd.get('high', float('nan')):.3f}; "
                     f"{fd.get('n_fake')} generated vs {fd.get('n_real')} renders)")
    gain = report.get("prompt_gain") or {}
    if gain:
        lines.append("  prompt gain (image loss under another prompt minus its own): "
                     + " ".join(f"{k.removeprefix('prompt_gain/')} {v:+.4f}" for k, v in gain.items()))
    if "inception_fid" in report:
        lines.append(f"  Inception FID {report['inception_fid']:.2f}")
    return "\n".join(lines)


def format_captions(summary: dict) -> str:
    """Caption precision and recall per attribute, for the console."""
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"\nCaptions ({summary['total'].get('count', 0)}): attribute, stated, precision, recall"]
    for key, value in summary.items():
        lines.append(f"  {key:<12} {fmt(value.get('stated'))} {fmt(value.get('precision'))} {fmt(value.get('recall'))}")
    return "\n".join(lines)
