"""How many CPU threads torch uses: the cores this process may run on, or ``--threads N``.

torch sizes its OpenMP pool from the machine's core count, not from the cores the process is allowed
(``taskset``, cgroups, a scheduler's CPU set). Two processes that each think they own the machine then
oversubscribe it: two torch processes with 2 OpenMP threads each on 2 cores slowed one training step from
~0.1 s to ~7 s. docs/THREADS.md says how to share a machine.
"""

from __future__ import annotations

import os

import torch

# Intel MKL, torch's CPU BLAS on x86, may choose a GEMM kernel by the memory alignment of its operands; then
# the same numbers give different low bits depending on where the allocator put a buffer. Reported on an
# Intel Xeon: after an adapter was loaded and removed, a UNet output differed from the base's by 9.5e-7 with
# every weight bit-identical; the first differing layer had bit-identical inputs and weights at other
# addresses. MKL's Conditional Numerical Reproducibility mode ("AUTO": the fastest code path for this CPU,
# chosen once) makes results independent of alignment, for a fixed thread count. MKL reads the mode once, at
# its first call: it can only be requested before torch computes anything.
REPRODUCIBLE_BLAS = ("MKL_CBWR", "AUTO")


def request_reproducible_blas() -> None:
    """Ask MKL for alignment-independent results unless the user chose an ``MKL_CBWR`` mode themselves."""
    os.environ.setdefault(*REPRODUCIBLE_BLAS)


def allowed_cores() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; the CPU count where that is missing)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows: no affinity API
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count; returns it.

    ``threads`` (``--threads N``) wins; otherwise an explicit ``OMP_NUM_THREADS`` is respected (the user
    or a launcher such as torchrun chose it); otherwise the allowed cores.
    """
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = int(env) if env.isdigit() and int(env) > 0 else allowed_cores()
    torch.set_num_threads(threads)
    return threads
