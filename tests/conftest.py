"""Suite-wide settings: OpenMP threads sleep when idle, so test processes and the daemons they
start do not stall each other on a 2-core machine (a daemon on its own lets them spin briefly
and measures what cores are free instead: docs/engine.md). Without a GPU, Triton kernels run
through Triton's interpreter on CPU tensors (tests/quant/test_quant_triton.py), which must be
chosen before anything imports triton.

The run has a CODELM_HOME of its own, so it neither reads the user's kernel choices, weight
caches and config.toml nor leaves files among them; its data/models links to the models folder
`make install` fetches into (one copy of the weights)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

from codelm.daemon.runtime import RuntimePaths

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _suite_home() -> str:
    models = RuntimePaths.for_home(os.environ.get("CODELM_HOME")).data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="codelm-tests-"))
    (home / "data").mkdir()
    (home / "data" / "models").symlink_to(models, target_is_directory=True)
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return str(home)


os.environ["CODELM_HOME"] = _suite_home()
