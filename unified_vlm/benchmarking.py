"""What the benchmark scripts (``benchmarks/``) share: a training config read with errors that name
it, a precision checked against the device, and the model and data built from the config, so that a
benchmark asked for something it cannot run says what to change instead of printing a traceback."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from unified_vlm.precision import CPU_BF16_FLAGS, cpu_flags, resolve_precision

log = logging.getLogger(__name__)

CPU_PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true")


class BenchmarkError(ValueError):
    """A benchmark cannot run as asked; the message says what to change."""


def read_config(path: str | Path) -> dict[str, Any]:
    """A training config (``configs/tiny_*.yaml``) as a mapping with ``model``, ``data`` and ``trainer``."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise BenchmarkError(f"--config {path}: cannot read it ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise BenchmarkError(f"--config {path}: not valid YAML: {err}") from err
    missing = [key for key in ("model", "data") if not isinstance((config or {}).get(key), dict)]
    if missing:
        raise BenchmarkError(f"--config {path}: no {' or '.join(missing)} section; give a training config "
                             "such as configs/tiny_siglip_vq.yaml")
    config.setdefault("trainer", {})
    return config


def check_precision(requested: Optional[str], config: dict[str, Any]) -> str:
    """``requested`` (or the config's ``trainer.precision``) resolved for the CPU, refused where the CPU
    cannot run it and warned about where it runs slowly (bf16 without native bf16)."""
    precision = str(requested or config["trainer"].get("precision", "auto"))
    if precision not in CPU_PRECISIONS:
        raise BenchmarkError(f"--precision {precision}: the CPU benchmarks run one of {list(CPU_PRECISIONS)}")
    precision = resolve_precision(precision, "cpu")
    if precision.startswith("bf16") and not set(CPU_BF16_FLAGS) & cpu_flags():
        log.warning("%s on a CPU without native bf16 (no %s): about 100x slower than 32-true (docs/machines.md)",
                    precision, "/".join(CPU_BF16_FLAGS))
    return precision


def build(config: dict[str, Any], path: str | Path) -> tuple[Any, Any]:
    """(UnifiedVLM, UnifiedDataModule) of ``config``; a config that does not build names its file."""
    from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
    from unified_vlm.models.unified import UnifiedVLM

    try:
        return UnifiedVLM(**config["model"]), UnifiedDataModule(**config["data"])
    except (TypeError, ValueError, KeyError, FileNotFoundError) as err:
        raise BenchmarkError(f"--config {path}: the model or data does not build: {err}") from err


def linear_params(module: torch.nn.Module) -> int:
    """Weights of the Linear layers in ``module``: 2x this many FLOPs per token forward."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def matmul_peak(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Dense matmul FLOP/s of (m x k) @ (k x n) in ``dtype``, measured for ``seconds`` in this process
    (its threads, its precision): the limit the benchmarks compare model FLOP rates with."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    iterations, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iterations += 1
    return 2 * m * k * n * iterations / (time.perf_counter() - start)


def run(main: Callable[[], Any]) -> None:
    """Run a benchmark's ``main``; a BenchmarkError is printed as ``error: ...`` with exit status 2."""
    try:
        main()
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
