"""Generation quality during training, beside the VQA probe: the learning curves of both tasks in one run.

At the end of every validation run (``--trainer.val_check_interval N`` sets how often) the model
draws one watch for each of (up to ``max_images``) generation prompts of the validation split.
The watch reader scores them against what each prompt states, and their Fréchet distance to
``fd_reference`` held-out renders is computed on the reader's features
(``unified_vlm.evaluation.generation``). ``val/gen/<attribute>``, ``val/gen/total``,
``val/gen/is_watch`` and ``val/gen/fd`` are logged, with the prompt gain
(``val/gen/prompt_gain`` and ``val/gen/prompt_gain/<attribute>``: the teacher-forced image loss
under another prompt minus under its own, ``unified_vlm.evaluation.prompt_gain``), which turns
positive long before faithfulness leaves chance, and a grid (ground truth above generated) is
saved as ``probe/generation_step<N>.png`` in the run directory and sent to TensorBoard when that
logger is used. ``--generation_probe.max_images 0`` turns it off.
"""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from unified_vlm.callbacks.evaluation_report import (
    gather_objects,
    image_grid,
    local_prompt_gain,
    pooled_prompt_gain,
    run_dir,
    split_style,
    validation_records,
)
from unified_vlm.evaluation.record_tasks import generate_images


class GenerationProbe(L.Callback):
    def __init__(self, max_images: int = 32, reader: str = "builtin", fd_reference: int = 500, grid_size: int = 8) -> None:
        if max_images < 0 or grid_size < 0:
            raise ValueError(f"generation_probe.max_images and grid_size must be >= 0, got {max_images}, {grid_size}")
        if fd_reference < 2:
            raise ValueError(f"generation_probe.fd_reference must be at least 2, got {fd_reference}")
        self.max_images, self.reader_path = max_images, reader
        self.fd_reference, self.grid_size = fd_reference, grid_size
        self.last: dict[str, float] = {}
        self._reader = None
        self._real_features: dict[int, torch.Tensor] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.max_images and stage == "fit":
            from unified_vlm.evaluation.reader import load_reader

            self._reader = load_reader(self.reader_path)  # a missing reader fails now, not after the first validation

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.max_images == 0 or trainer.sanity_checking or not hasattr(pl_module, "chat_format"):
            return
        records = validation_records(trainer, "generation", self.max_images)
        if not records and trainer.world_size == 1:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = generate_images(pl_module, records) if records else []
            gains = gather_objects(trainer, [local_prompt_gain(pl_module, records)])
        pl_module.train(was_training)
        gain = pooled_prompt_gain(gains)
        if gain:
            for key, value in gain.items():
                pl_module.log(f"val/gen/{key}", value, rank_zero_only=True)
            rank_zero_info(f"step {trainer.global_step} prompt gain (image loss under another prompt minus its own): "
                           + " ".join(f"{k.removeprefix('prompt_gain/')} {v:+.4f}" for k, v in gain.items()))
        items = [{"prompt": r["conversations"][0]["value"], "image": img, "target": r.get("image")}
                 for r, img in zip(records, images)]
        items = [i for i in gather_objects(trainer, items) if i["image"] is not None]
        directory = run_dir(trainer) / "probe"  # on every rank: reading log_dir is a collective call under DDP
        if trainer.global_rank == 0 and len(items) >= 2:
            self._score(trainer, pl_module, items, directory)

    def _score(self, trainer, pl_module, items: list[dict], directory) -> None:
        from unified_vlm.evaluation.generation import frechet_distance, reference_renders, score_generation

        images = torch.stack([i["image"].float() for i in items])
        size = int(images.shape[-1])
        if size not in self._real_features:
            self._real_features[size] = self._reader.features(
                reference_renders(self.fd_reference, size, style=split_style(trainer, "val")))
        faith = score_generation(self._reader, images, [i["prompt"] for i in items])
        self.last = {k: float(v) for k, v in faith.items() if isinstance(v, float)}
        self.last["fd"] = frechet_distance(self._real_features[size], self._reader.features(images))
        for key, value in self.last.items():
            pl_module.log(f"val/gen/{key}", value, rank_zero_only=True)
        rank_zero_info(f"step {trainer.global_step} generation on {len(items)} validation prompts: "
                       + " ".join(f"{k} {v:.3f}" for k, v in self.last.items()))
        self._save_grid(trainer, items[: self.grid_size], directory)

    def _save_grid(self, trainer, items: list[dict], directory) -> None:
        pairs = [(i["target"], i["image"]) for i in items if i["target"] is not None]
        if not pairs:
            return
        from torchvision.utils import save_image

        grid = image_grid(pairs, columns=len(pairs))
        directory.mkdir(parents=True, exist_ok=True)
        save_image(grid, directory / f"generation_step{trainer.global_step}.png")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if type(logger).__name__ == "TensorBoardLogger" and hasattr(experiment, "add_image"):
                experiment.add_image("val/generation", grid, global_step=trainer.global_step)
