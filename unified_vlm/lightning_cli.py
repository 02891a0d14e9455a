"""LightningCLI wiring for UnifiedVLM + UnifiedDataModule."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import unified_vlm.fsdp  # noqa: F401  (registers --trainer.strategy unified_fsdp)
from unified_vlm.callbacks import EvaluationReport, GenerationProbe, NonFiniteLossGuard, PredictionWriter, RunCheckpoint, VQAProbe
from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
from unified_vlm.models.unified import UnifiedVLM
from unified_vlm.precision import resolve_precision

log = logging.getLogger(__name__)

# Model settings that do not change the network: a checkpoint is usable under any values of these.
NOT_ARCHITECTURE = {"sampling", "optim", "text_loss_average", "text_tokenizer", "checkpoint_weights"}
NOT_ARCHITECTURE_NESTED = {"encoder": {"freeze"}, "backbone": {"gradient_checkpointing"},
                           "image_output": {"loss_weight", "prompt_dropout"}}


class CommandRefused(ValueError):
    """A command line that would do something other than what it looks like; the CLI prints the
    message (it says what to give instead) and exits 2."""


class UnifiedTrainer(L.Trainer):
    """``L.Trainer`` whose ``precision`` also takes ``auto`` (the default): see ``unified_vlm.precision``.

    Args:
        precision: ``auto`` (bf16-mixed on a CUDA device with bf16 or a CPU with native bf16,
            avx512_bf16/amx_bf16; else 32-true; logged with the reason) or any Lightning precision
            (32-true, bf16-mixed, 16-mixed, ...), which is used as given.
    """

    def __init__(self, *args: Any, precision: Union[_PRECISION_INPUT, Literal["auto"], None] = "auto", **kwargs: Any) -> None:
        super().__init__(*args, precision=resolve_precision(precision, kwargs.get("accelerator", "auto")), **kwargs)


# Where a model's frozen base weights are read from. A trainable-only checkpoint checks the weights
# themselves (a fingerprint, models/trainable_checkpoint.py), so these may move.
BASE_PATHS = (("encoder", "weights"), ("backbone", "options", "path"), ("image_output", "tokenizer"))


def _base_path(model: dict, keys: tuple[str, ...]):
    value = model
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def missing_base_paths(model: dict) -> list[str]:
    """``model.<key>=<path>`` for each base-weights path of ``model`` that does not exist."""
    out = []
    for keys in BASE_PATHS:
        value = _base_path(model, keys)
        if isinstance(value, str) and value != "builtin" and not Path(value).exists():
            out.append(f"model.{'.'.join(keys)}={value}")
    return out


def architecture_differences(saved: dict, configured: dict, base_paths_may_move: bool = False) -> list[str]:
    """``model.<key>: checkpoint X, config Y`` for every setting that shapes the network and differs.

    Only settings the checkpoint records are compared: one written before a setting existed
    (e.g. ``image_output.head_options``) was made with its default. With ``base_paths_may_move``
    (a trainable-only checkpoint) the ``BASE_PATHS`` are not compared."""
    out = []
    moved = {keys[0]: keys[1:] for keys in BASE_PATHS} if base_paths_may_move else {}
    for key in sorted(saved):
        if key in NOT_ARCHITECTURE or key.startswith("_"):
            continue
        a, b = saved.get(key), configured.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            skip = set(NOT_ARCHITECTURE_NESTED.get(key, set()))
            rest = moved.get(key, ())
            if len(rest) == 1:
                skip.add(rest[0])
            elif len(rest) == 2:  # a path inside an options mapping
                a = {**a, rest[0]: {k: v for k, v in (a.get(rest[0]) or {}).items() if k != rest[1]}}
                b = {**b, rest[0]: {k: v for k, v in (b.get(rest[0]) or {}).items() if k != rest[1]}}
            for sub in sorted(a):
                if sub not in skip and _plain(a.get(sub)) != _plain(b.get(sub)):
                    out.append(f"model.{key}.{sub}: checkpoint {a.get(sub)!r}, config {b.get(sub)!r}")
        elif _plain(a) != _plain(b):
            out.append(f"model.{key}: checkpoint {a!r}, config {b!r}")
    return out


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class UnifiedCLI(LightningCLI):
    """Adds an always-on evaluation report and checkpointing, and scores the model after ``fit``."""

    def __init__(self, *args: Any, argv: Optional[list[str]] = None, **kwargs: Any) -> None:
        self._argv = list(argv or [])
        super().__init__(*args, args=argv, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EvaluationReport, "report")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(VQAProbe, "vqa_probe")
        parser.add_lightning_class_args(GenerationProbe, "generation_probe")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(NonFiniteLossGuard, "nonfinite")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_argument("--test_after_fit", type=bool, default=True, help="score the trained model on the test split after fit")
        parser.add_argument("--untrained", type=bool, default=False,
                            help="test/predict without --ckpt_path: use the freshly initialised (untrained) model, "
                                 "e.g. for a smoke test; without it, they refuse to run")

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the whole model config by the checkpoint's hyper-parameters, dropping
        command-line options without a word. Here the config decides: a checkpoint whose network
        differs from it is refused, and the config's (command line's) sampling settings are used.
        Without any ``--config`` (``-c``) or ``--model.*`` option, the checkpoint's model is used (logged)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        from unified_vlm.files import load_checkpoint

        # Every --ckpt_path is read here first, with tensors and plain data only (weights_only): a file that
        # would run code, or a truncated one, is refused naming the file before Lightning loads it.
        checkpoint = load_checkpoint(ckpt_path)
        trainable_only = bool(checkpoint.get("trainable_only"))
        saved = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        if not saved:
            return
        configured = self.config[sub].model.as_dict()
        # A config file in any form (--config F, --config=F, -c F, ...: what the parser read) or a model option.
        gave_model = bool(self.config[sub].get("config")) or any(
            a == "--model" or a.startswith(("--model=", "--model.")) and not a.startswith("--model.sampling.")
            for a in self._argv)
        if trainable_only:
            missing = missing_base_paths(configured if gave_model else saved)
            if missing:
                raise CommandRefused(
                    f"checkpoint {ckpt_path} holds only the trainable weights (model.checkpoint_weights: trainable); the "
                    f"frozen base is read from {', '.join(missing)}, which does not exist. Give its new location with the "
                    "run's config, e.g. --config $RUN/config.yaml --model.backbone.options.path NEW_DIR (the weights there "
                    "are checked against the checkpoint's fingerprint)")
        if gave_model:
            differences = architecture_differences(saved, configured, base_paths_may_move=trainable_only)
            if differences:
                raise ValueError(
                    f"checkpoint {ckpt_path} holds a different model than the config:\n  " + "\n  ".join(differences)
                    + "\nUse the run's own config ($RUN/config.yaml) with its checkpoint, or drop --config to use the checkpoint's model"
                )
            return  # same network: the config (with its command-line options) decides everything else
        log.info("no --config given: using the model stored in %s", ckpt_path)
        cli_sampling = {a.split("=")[0].removeprefix("--model.sampling.") for a in self._argv if a.startswith("--model.sampling.")}
        given = configured.get("sampling", {})
        saved = dict(saved, sampling={**saved.get("sampling", {}), **{k: given[k] for k in cli_sampling if k in given}})
        self.config = self.parser.parse_object({sub: {"model": saved}}, self.config)

    def before_instantiate_classes(self) -> None:
        if self.subcommand in ("test", "predict"):
            config = self.config[self.subcommand]
            if not config.get("ckpt_path") and not config.get("untrained"):
                raise CommandRefused(
                    f"{self.subcommand} without --ckpt_path would use an untrained model and write its results as if "
                    f"trained. Give the checkpoint: python -m unified_vlm {self.subcommand} --config $RUN/config.yaml "
                    "--ckpt_path $RUN/checkpoints/last.ckpt (or --untrained true to run the untrained model on purpose)"
                )
        optim = self.config[self.subcommand].model.get("optim") or {}
        for name in ("lr", "projector_lr", "weight_decay"):
            value = optim.get(name) if hasattr(optim, "get") else getattr(optim, name, None)
            if value is not None and value < 0:
                raise ValueError(f"model.optim.{name}={value} is negative: the loss would climb; give a positive value")
        if self.subcommand == "fit":
            trainer = self.config[self.subcommand].trainer
            if trainer.max_steps == 0 or trainer.max_epochs == 0:
                raise ValueError(
                    f"fit with trainer.max_steps={trainer.max_steps} / max_epochs={trainer.max_epochs} trains nothing "
                    "and would score an untrained model as if trained; give a positive number of steps"
                )
        # Train (once) and cache any missing built-in weights the model config names, before the model
        # is built (its constructor only looks them up).
        from unified_vlm.pretraining.build_assets import prepare_builtin_assets

        model = self.config[self.subcommand].get("model")
        prepare_builtin_assets(model.as_dict() if hasattr(model, "as_dict") else dict(model or {}))

    def _refuse_what_fsdp_cannot_run(self) -> None:
        from unified_vlm.fsdp import DECODING_REFUSED, decoding_settings_refused, is_fsdp

        if not is_fsdp(self.trainer.strategy):
            return
        if self.trainer.strategy.root_device.type == "cpu":
            raise CommandRefused("FSDP needs a GPU here (torch's FullyShardedDataParallel refuses CPU devices); "
                                 "on CPUs use --trainer.strategy ddp")
        if getattr(self.model, "checkpoint_weights", "all") == "trainable":
            raise CommandRefused("model.checkpoint_weights: trainable is not supported under FSDP (each rank holds a shard "
                                 "of the frozen base, whose fingerprint the checkpoint records); use all, or DDP for LoRA runs")
        refused = decoding_settings_refused(self.subcommand, self.config[self.subcommand])
        if refused:
            raise CommandRefused(f"{DECODING_REFUSED}. Turn it off: {' '.join(refused)}; then score the saved "
                                 "checkpoint with test under --trainer.strategy ddp (or on one device)")

    def before_test(self) -> None:
        self._refuse_what_fsdp_cannot_run()

    def before_predict(self) -> None:
        self._refuse_what_fsdp_cannot_run()

    def before_fit(self) -> None:
        """With ``test_after_fit``, what the post-fit test needs (``data.test_records`` and its images, the
        watch reader that scores the generated watches, the Inception weights) is checked now: a missing or
        broken file fails before training, not after it. (The train and val records are checked when
        ``setup("fit")`` loads them.) Under FSDP, what it cannot run is refused first."""
        self._refuse_what_fsdp_cannot_run()
        if not self.config[self.subcommand].get("test_after_fit", True) or self.trainer.fast_dev_run:
            return
        data = getattr(self.datamodule, "hparams", {})
        if data.get("test_records") is not None:
            from unified_vlm.datamodules.records import RecordError, load_located_records

            try:
                load_located_records(data["test_records"], image_root=data.get("image_root"),
                                     allow_outside_root=data.get("allow_images_outside_root", False))
            except (RecordError, OSError) as err:
                raise CommandRefused(f"the test after fit (test_after_fit) reads data.test_records: {err}") from None
        for callback in self.trainer.callbacks:
            if isinstance(callback, EvaluationReport):
                try:
                    callback.load_test_files()
                except OSError as err:
                    raise CommandRefused(
                        f"the test after fit (test_after_fit) could not score the trained model: {err}. Fix that before "
                        "training, or pass --test_after_fit false (or --report.reader null to score understanding only)"
                    ) from None

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit", True) and not self.trainer.fast_dev_run:
            self.trainer.test(self.model, datamodule=self.datamodule)


def run_lightning_cli(argv: list[str]) -> UnifiedCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return UnifiedCLI(
        UnifiedVLM,
        UnifiedDataModule,
        trainer_class=UnifiedTrainer,
        argv=argv,
        save_config_kwargs={"overwrite": True},
    )
