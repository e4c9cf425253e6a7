"""Suite-wide settings: OpenMP threads sleep when idle, so test processes and the daemons they
start do not stall each other on a 2-core machine (a daemon on its own lets them spin briefly
and measures what cores are free instead: docs/engine.md). Without a GPU, Triton kernels run
through Triton's interpreter on CPU tensors (tests/quant/test_quant_triton.py), which must be
chosen before anything imports triton."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
