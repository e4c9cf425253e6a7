"""Suite-wide settings: OpenMP threads sleep when idle, so test processes and the daemons they
start do not stall each other on a 2-core machine (a daemon on its own lets them spin briefly
and measures what cores are free instead: docs/engine.md)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
