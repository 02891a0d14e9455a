"""``python -m unified_vlm <command>``: LightningCLI's fit/validate/test/predict plus the tools.

Tool subcommands map to plain ``main(argv)`` functions (litgpt style); training subcommands go
through LightningCLI so every YAML key is type-checked against the code that consumes it.
The tools keep argparse on purpose: a parser that jsonargparse (4.53) derives from a typed
function spells flags with underscores (``--max_steps``), takes required parameters as
positionals, lists as ``[32,64]`` and switches as ``--flag true``, so moving them would change
every tool's documented command line (``--max-steps``, ``--channels 32,64``, ``--no-progress-bar``).
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Callable, Optional

TOOLS: dict[str, tuple[str, str]] = {
    "data": ("unified_vlm.datamodules.materialize:main", "materialise Smart Watch UI splits to PNG + JSONL"),
    "list": ("unified_vlm.cli:list_main", "list registered encoders, quantizers, projectors, heads, backbones"),
    "pretrain-encoder": ("unified_vlm.pretraining.pretrain_encoder:main", "supervised attribute pretraining of the watch encoder"),
    "pretrain-contrastive": ("unified_vlm.pretraining.pretrain_contrastive:main",
                             "SigLIP sigmoid-contrastive (image, caption) pretraining of the watch encoder"),
    "train-vq": ("unified_vlm.pretraining.train_vq:main", "train the VQ image tokenizer on watch images"),
    "train-feature-decoder": ("unified_vlm.pretraining.train_feature_decoder:main", "train a pixel decoder for continuous (SigLIP) output features"),
    "evaluate": ("unified_vlm.experiments.evaluate:main", "score every checkpoint of a run directory (one row each)"),
    "train-reader": ("unified_vlm.pretraining.train_reader:main", "train the watch reader that scores generated watches"),
    "build-assets": ("unified_vlm.pretraining.build_assets:main", "rebuild the built-in weights shipped in unified_vlm/assets"),
    "probe": ("unified_vlm.evaluation.probes:main", "linear probe + t-SNE of one image token's adapter outputs by attribute"),
    "experiment": ("unified_vlm.experiments.runner:main", "run the cells of an experiment file (resumable; --dry-run, --workers, SLURM)"),
    "report": ("unified_vlm.experiments.report:main", "tables (mean ± std over seeds) and figures of an experiment's cells"),
    "memory": ("unified_vlm.models.memory:main", "parameters per module and GPU memory per device (DDP/FSDP, full/LoRA), no weights read"),
    "export": ("unified_vlm.models.export:main", "a run's model as a Hugging Face backbone dir (LoRA merged) + parts, tokenizer, config"),
}
LIGHTNING = {
    "fit": "train a model (then score it on the test split)",
    "validate": "validation loss of a checkpoint",
    "test": "score a checkpoint: VQA per attribute + generated watches",
    "predict": "answer / generate for the test split with a checkpoint",
}


def _load(target: str) -> Callable[[Optional[list[str]]], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def list_main(argv: Optional[list[str]] = None) -> int:
    """Print every registry and its entries with a one-line description."""
    import unified_vlm.models  # noqa: F401  (registers everything)
    from unified_vlm.registry import ALL_REGISTRIES

    for kind, registry in ALL_REGISTRIES.items():
        print(f"{kind}:")
        for name, doc in registry.describe():
            print(f"  {name:<22} {doc}")
    return 0


def config_paths(argv: list[str]) -> list[str]:
    """The files given to ``--config`` in every form the parser accepts: ``--config F``,
    ``--config=F``, ``-c F``, ``-cF``, ``-c=F`` and the abbreviations ``--con``/``--conf``/``--confi``."""
    paths, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "-c" or (len(name) >= 5 and "--config".startswith(name)):
            if eq:
                paths.append(value)
            elif i + 1 < len(argv):
                paths.append(argv[i + 1])
                i += 1
        elif argv[i].startswith("-c") and not argv[i].startswith("--") and len(argv[i]) > 2:
            paths.append(argv[i][2:])
        i += 1
    return paths


def config_file_errors(argv: list[str]) -> list[str]:
    """A message per ``--config`` (``-c``) file that is not valid YAML, naming the file (jsonargparse
    names only ``<unicode string>`` with a line and column)."""
    import yaml

    paths = config_paths(argv)
    errors = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except OSError:
            continue  # a missing file is reported by the parser
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            errors.append(f"{path}: invalid YAML: " + str(err).replace('"<file>"', repr(path)).replace("<unicode string>", path))
    return errors


def print_help() -> None:
    print("usage: python -m unified_vlm <command> [options]\n\ncommands:")
    for name, text in LIGHTNING.items():
        print(f"  {name:<18} {text}")
    for name, (_, text) in TOOLS.items():
        print(f"  {name:<18} {text}")
    print("\n'python -m unified_vlm <command> --help' shows a command's options.")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Lightning's top logger always gets its own console handler: stop its messages there, not twice.
    logging.getLogger("lightning").propagate = False
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        return 0
    command = argv[0]
    if command in TOOLS:
        return int(_load(TOOLS[command][0])(argv[1:]) or 0)
    if command not in LIGHTNING:
        import difflib

        close = difflib.get_close_matches(command, list(LIGHTNING) + list(TOOLS), n=2)
        print(f"unknown command {command!r}." + (f" Did you mean {' or '.join(close)}?" if close else ""), file=sys.stderr)
        print_help()
        return 2
    errors = config_file_errors(argv)
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from unified_vlm.callbacks.checkpoint import TrainingInterrupted
    from unified_vlm.datamodules.records import RecordError
    from unified_vlm.files import CheckpointError
    from unified_vlm.lightning_cli import CommandRefused, run_lightning_cli

    try:
        run_lightning_cli(argv)
    except CheckpointError as err:  # --ckpt_path truncated, corrupt or holding code
        print(f"error: --ckpt_path {err}", file=sys.stderr)
        return 2
    except CommandRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RecordError as err:  # data.train_records / val_records / test_records: the file and record named
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:  # fit saved last.ckpt at the signal
        if rank_zero_only.rank == 0:
            print(f"error: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except SIGTERMException:  # Lightning's own stop (outside training, e.g. in test): a SystemExit with code 0
        if rank_zero_only.rank == 0:
            print(f"error: {command} stopped by SIGTERM before it finished; its outputs are incomplete: run it again",
                  file=sys.stderr)
        return 128 + 15
    return 0
