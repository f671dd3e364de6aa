"""Session-wide settings that must hold before any test module is imported."""

import os

import torch

# Without CUDA the triton backend's tests run its kernels in Triton's interpreter on CPU tensors.
# Triton reads TRITON_INTERPRET when it decorates a kernel, including its own library functions
# at import (and torch._dynamo imports Triton), so it is set here, before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
