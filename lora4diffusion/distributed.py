"""Multi-process training (torchrun) and device choice, kept to a few small helpers.

Under ``torchrun --nproc_per_node=K`` every process sees RANK, LOCAL_RANK and WORLD_SIZE in its environment;
``init`` turns that into a process group (gloo on CPU, nccl on CUDA). Without WORLD_SIZE > 1 every helper
here is a no-op for a single process, so the single-process code path stays exactly what it was.
``keep_freed_memory`` is the one CPU runtime setting (glibc's allocator), applied by the CLI.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os

import torch
import torch.distributed as dist

from lora4diffusion.errors import UserError

log = logging.getLogger("lora4diffusion")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
_owned = False  # whether init() created the process group (then cleanup() destroys it)


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed activation buffers back to the OS after every forward.

    By default glibc serves blocks of a few MB with mmap (or trims them off the heap top) and returns them on
    free, so the next forward page-faults them in again: sampling 200 digits in fp32 spent 7.5 s of 25 s in
    the kernel (4.3 M minor faults). A 1 GiB trim threshold, 32 MiB mmap threshold (glibc's maximum) and
    64 MiB top pad keep them: 0.1 s kernel time (benchmarks/RESULTS.md). Process-wide, so the CLI calls it;
    library users may too. Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    return all([mallopt(m_trim_threshold, 1 << 30), mallopt(m_mmap_threshold, 32 << 20),
                mallopt(m_top_pad, 64 << 20)])  # fmt: skip


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {os.environ[name]!r}") from None


def env_world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), before the process group exists."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """auto | cpu | cuda -> a torch.device; under torchrun, CUDA means this process's GPU (LOCAL_RANK)."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name not in DEVICE_CHOICES:
        raise UserError(f"unknown device {name!r} (choose from {', '.join(DEVICE_CHOICES)})")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available (use --device cpu or auto)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = local_rank() if env_world_size() > 1 else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op for one process or if joined."""
    global _owned
    if env_world_size() <= 1 or is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl needs each rank on its own GPU before the first collective
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=_env_int("RANK", 0), world_size=env_world_size())
    _owned = True
    atexit.register(cleanup)
    if not is_main():  # one process speaks for the run
        log.setLevel(logging.WARNING)


def barrier() -> None:
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over all ranks (``value`` itself for one process)."""
    if world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def cleanup() -> None:
    """Leave the process group, if ``init`` created it."""
    global _owned
    if _owned and is_initialized():
        dist.destroy_process_group()
    _owned = False

