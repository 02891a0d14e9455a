"""``precision: auto``: the training precision this machine runs fast.

bf16 is only fast where the hardware computes it natively: on an AVX2-only CPU a bf16 matmul runs
about 100x slower than fp32 (docs/machines.md), so a hard-coded ``bf16-mixed`` turns a 20-minute job
into hours there. ``auto`` picks ``bf16-mixed`` on a CUDA device with bf16 support or on a CPU
with native bf16 instructions (AVX512_BF16 or AMX), else ``32-true``. An explicit precision wins.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags (Linux); empty where /proc/cpuinfo does not exist."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def auto_precision(accelerator: Optional[str] = "auto", flags: Optional[set[str]] = None) -> tuple[str, str]:
    """(precision, reason) for ``accelerator`` (``cpu``, ``gpu``/``cuda`` or ``auto``)."""
    accelerator = str(accelerator or "auto").lower()
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"CUDA device {torch.cuda.get_device_name()} supports bf16"
        return "32-true", f"CUDA device {torch.cuda.get_device_name()} has no bf16 support"
    if accelerator not in ("cpu", "auto"):
        return "32-true", f"accelerator {accelerator!r}: bf16 support not checked"
    flags = cpu_flags() if flags is None else flags
    native = [f for f in CPU_BF16_FLAGS if f in flags]
    if native:
        return "bf16-mixed", f"the CPU computes bf16 natively ({', '.join(native)})"
    return "32-true", "the CPU has no native bf16 (no avx512_bf16/amx_bf16 flag): bf16 would be about 100x slower than fp32"


def resolve_precision(precision, accelerator: Optional[str] = "auto"):
    """``auto`` -> the chosen precision (logged with its reason); anything else unchanged."""
    if precision != "auto":
        return precision
    chosen, reason = auto_precision(accelerator)
    log.info("precision auto -> %s: %s", chosen, reason)
    return chosen
