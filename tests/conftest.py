"""Session-wide settings that must hold before any test module is imported."""

import os

# Idle OpenMP threads sleep rather than spin: the suite runs in several processes (pytest-xdist,
# pyproject's addopts) and many tests start processes of their own, and spinning threads of a
# process that waits take the cores from those that work (on 2 cores, the suite in two workers
# took 13.8 min and 25 CPU-minutes spinning, 10.2 min and 18 sleeping). libgomp reads this when
# torch loads it, so it is set before the import; the processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA the triton backend's tests run its kernels in Triton's interpreter on CPU tensors.
# Triton reads TRITON_INTERPRET when it decorates a kernel, including its own library functions
# at import (and torch._dynamo imports Triton), so it is set here, before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(optionalhook=True)   # a hook of pytest-xdist; without it (`-p no:xdist`) unused
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core this process may use, at most four (each worker holds torch,
    and the distributed tests start two to four processes of their own)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))
