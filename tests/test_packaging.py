"""Packaging and import boundaries: what each package may pull in, and that a wheel works."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _loaded(imports: list[str], watch: list[str]) -> list[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in imports)
    code += f"print(','.join(m for m in {watch!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_quant_never_imports_the_daemon():
    assert _loaded(["codelm.quant"], ["codelm.daemon"]) == []


def test_engine_never_imports_aiohttp():
    imports = ["codelm.daemon.engine.engine", "codelm.daemon.engine.loader"]
    assert _loaded(imports, ["aiohttp", "codelm.daemon.service"]) == []


def test_wheel_holds_all_three_packages_and_their_scripts(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    wheel = next(tmp_path.glob("codelm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("codelm/daemon/cli.py", "codelm/lsp/cli.py", "codelm/quant/linear.py",
                   "codelm/quant/kernels_x86.c",  # compiled where it runs (quant/native.py)
                   "codelm/daemon/engine/models/llama.py"):  # fmt: skip
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "codelm-daemon = codelm.daemon.cli:main" in scripts
    assert "codelm-lsp = codelm.lsp.cli:main" in scripts
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    # The unpacked wheel imports on its own (dependencies from this interpreter's site). -S: no
    # site processing, so the editable install's path hook is not active.
    site = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    code = "import codelm.lsp.server, codelm.daemon.client, codelm.quant as q; print(q.__file__)"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, cwd="/",
        env={"PYTHONPATH": f"{target}:{site}", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.stdout.strip() == str(target / "codelm" / "quant" / "__init__.py")
