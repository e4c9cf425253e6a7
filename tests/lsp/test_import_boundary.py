from __future__ import annotations

import subprocess
import sys

MODULES = [
    "codelm.lsp",
    "codelm.lsp.cli",
    "codelm.lsp.server",
    "codelm.lsp.completion",
    "codelm.lsp.daemon_link",
    "codelm.lsp.postprocess",
]


def test_lsp_import_leaves_torch_out_in_a_fresh_interpreter():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + "heavy = [m for m in ('torch', 'codelm.daemon.engine', 'aiohttp') if m in sys.modules]\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # aiohttp is imported on first use, after `initialize` has been answered.
    assert out.stdout.strip() == ""
