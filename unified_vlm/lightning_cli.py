"""LightningCLI wiring for UnifiedVLM + UnifiedDataModule."""
from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from unified_vlm.callbacks import EvaluationReport, GenerationProbe, PredictionWriter, VQAProbe
from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
from unified_vlm.models.unified import UnifiedVLM


class UnifiedCLI(LightningCLI):
    """Adds an always-on evaluation report and checkpointing, and scores the model after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EvaluationReport, "report")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(VQAProbe, "vqa_probe")
        parser.add_lightning_class_args(GenerationProbe, "generation_probe")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_argument("--test_after_fit", type=bool, default=True, help="score the trained model on the test split after fit")

    def before_instantiate_classes(self) -> None:
        """Train (once) and cache any missing built-in weights the model config names, before the
        model is built (its constructor only looks them up)."""
        from unified_vlm.pretraining.build_assets import prepare_builtin_assets

        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.get("model")
        prepare_builtin_assets(model.as_dict() if hasattr(model, "as_dict") else dict(model or {}))

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit", True) and not self.trainer.fast_dev_run:
            self.trainer.test(self.model, datamodule=self.datamodule)


def run_lightning_cli(argv: list[str]) -> UnifiedCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return UnifiedCLI(
        UnifiedVLM,
        UnifiedDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
