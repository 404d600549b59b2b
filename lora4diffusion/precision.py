"""bf16 or fp32: which precision a command runs in when neither ``--bf16`` nor ``--no-bf16`` is given.

Two questions, kept apart. *Can* bf16 run here (an explicit ``--bf16`` is then honoured, however slow)? On
a CPU always: torch's CPU autocast has bf16 kernels everywhere. On CUDA when ``torch.cuda.is_bf16_supported``.
*Is* bf16 the right default here? Only where the hardware does bf16 arithmetic natively. oneDNN runs bf16 on
any AVX-512 CPU, but without native bf16 instructions it converts every operand and is slower than fp32.
Measured on an Intel Xeon with AVX-512 but no avx512_bf16 / AMX: a GEMM of our models' size ran at
65 GFLOP/s in bf16 vs 227 in fp32; `train-lora` 60 steps 23.5 s vs 13.0 s; the first `sample` of 1,000
digits 16.4 s vs 1.7 s. On an AMD EPYC with avx512_bf16 bf16 is ~2.3x faster than fp32. So:

- CUDA: bf16 where the GPU has it natively (compute capability 8.0+), not where torch would emulate it.
- CPU: bf16 where oneDNN has bf16 kernels for the CPU and the CPU's flags name native bf16 arithmetic:
  x86 ``avx512_bf16`` (AVX512-BF16) or ``amx_bf16`` (AMX tiles), aarch64 ``bf16`` (ARMv8.6 BF16).
  The flags come from /proc/cpuinfo (Linux), else from ``torch.cpu.get_capabilities()`` (recent torch,
  any OS: the same flag names). Where neither says (macOS or Windows with an older torch): fp32. A
  micro-benchmark could decide there instead, but it would make the default depend on how busy the
  machine was when it ran (bf16 and fp32 draw different pixels, so the same command would stop
  reproducing) and needs a cache file to keep its answer; a wrong fp32 costs at most the 2.3x above, a
  wrong bf16 up to the ~10x above.
- ``LORA4DIFFUSION_CPU_BF16=1`` (or ``0``) sets the CPU default to bf16 (fp32) without looking; an
  explicit ``--bf16`` / ``--no-bf16`` (``TrainConfig(bf16=True/False)``) still wins over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lora4diffusion.errors import UserError

ENV = "LORA4DIFFUSION_CPU_BF16"
CPUINFO = Path("/proc/cpuinfo")
# Flags (Linux /proc/cpuinfo, and torch.cpu.get_capabilities' keys) that mean native bf16 arithmetic, the
# fastest first (a Sapphire Rapids Xeon has both x86 ones: oneDNN uses its AMX tiles).
NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16")


@dataclass(frozen=True)
class Precision:
    """The precision chosen and why, e.g. ``bf16 (the CPU has avx512_bf16)`` as text."""

    bf16: bool
    why: str

    def __str__(self) -> str:
        return f"{'bf16' if self.bf16 else 'fp32'} ({self.why})"


def native_bf16_flag(cpuinfo: str) -> str | None:
    """The flag of /proc/cpuinfo text (its first ``flags`` line on x86, ``Features`` on aarch64) that names
    native bf16 arithmetic, or None. Pure: the text in, no hardware read."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            return next((f for f in NATIVE_BF16 if f in flags), None)
    return None


def cpu_flags() -> str | None:
    """This CPU's flags as /proc/cpuinfo text: the file itself, else torch's own CPU probe written as one
    ``flags`` line, else None (unknown)."""
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:
        pass
    probe = getattr(torch.cpu, "get_capabilities", None)  # recent torch only
    if probe is None:
        return None
    try:
        caps = probe()
    except RuntimeError:
        return None
    return "flags\t: " + " ".join(k for k, v in caps.items() if v is True)


def onednn_bf16() -> bool:
    """Whether torch's oneDNN (mkldnn) has bf16 kernels for this CPU (AVX-512 or AVX-NE-CONVERT, ARM BF16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())  # no such op in this torch: oneDNN is there, trust it


def bf16_runs(device: torch.device) -> bool:
    """Whether bf16 autocast can run on ``device`` at all (however slowly): what an explicit --bf16 needs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def _cuda_native() -> bool:
    """The current GPU's (every GPU of a machine is usually the same kind)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without emulation: supported meant native
        return torch.cuda.is_bf16_supported()


def _env_choice() -> bool | None:
    value = os.environ.get(ENV, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise UserError(f"environment variable {ENV} must be 1 (bf16) or 0 (fp32) on CPUs, got {value!r}")
    return value == "1"


def default_precision(device: torch.device) -> Precision:
    """The precision ``device`` runs in unless told: bf16 only where the hardware has it natively."""
    if device.type == "cuda":
        if _cuda_native():
            return Precision(True, "the GPU has native bf16")
        if bf16_runs(device):
            return Precision(False, "this GPU would emulate bf16; --bf16 forces it")
        return Precision(False, "this GPU has no bf16")
    if device.type != "cpu":
        return Precision(False, f"no bf16 autocast on {device.type}")
    forced = _env_choice()
    if forced is not None:
        return Precision(forced, f"{ENV}={int(forced)}")
    if not onednn_bf16():
        return Precision(False, "torch has no oneDNN bf16 kernels for this CPU; --bf16 forces bf16")
    flags = cpu_flags()
    if flags is None:
        return Precision(False, "this CPU's bf16 support is unknown; --bf16 forces bf16")
    flag = native_bf16_flag(flags)
    if flag is None:
        return Precision(False, "this CPU has no native bf16: bf16 would be slower; --bf16 forces it")
    return Precision(True, f"the CPU has {flag}")


def choose_precision(device: torch.device, requested: bool | None = None) -> Precision:
    """What to run in: ``requested`` (--bf16 True, --no-bf16 False) where bf16 can run, else (None) the
    device's default (``default_precision``)."""
    if requested is None:
        return default_precision(device)
    if not requested:
        return Precision(False, "asked for")
    if bf16_runs(device):
        return Precision(True, "asked for")
    return Precision(False, f"bf16 was asked for, but {device.type} cannot run it")
