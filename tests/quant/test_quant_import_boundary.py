from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

QUANT_DIR = Path(__file__).resolve().parents[2] / "quant"


def test_quant_package_never_imports_daemon_in_a_fresh_interpreter():
    code = (
        "import sys, codelm.quant, codelm.quant.cuda, codelm.quant.gguf_repack;"
        "bad = sorted(m for m in sys.modules if m.startswith('codelm.daemon'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_quant_sources_have_no_daemon_import_statements():
    # Also catches imports inside functions, which the fresh-interpreter check cannot see.
    pattern = re.compile(r"^\s*(from|import)\s+(codelm\.daemon|daemon)\b", re.MULTILINE)
    for path in QUANT_DIR.glob("*.py"):
        assert not pattern.search(path.read_text()), path
