"""Measurements the bench scripts share (imported as ``benchlib``: each bench runs as ``python bench/<name>.py``,
so this folder is on ``sys.path``). Import torch-using helpers only after the bench has set
``OMP_WAIT_POLICY``."""

from __future__ import annotations

import time


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def matmul_peak(n: int, repeats: int = 5) -> tuple[float, float]:
    """fp32 GFLOP/s of an n x n x n ``torch.mm`` (best of ``repeats``: the peak the hardware reaches on this
    process's threads): wall, and cpu-based (per CPU-second x threads)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return 2 * n**3 / min(wall) / 1e9, 2 * n**3 / (min(cpu) / torch.get_num_threads()) / 1e9
