"""Suite-wide settings: OpenMP threads sleep when idle (the daemon does the same), so test
processes and the daemons they start do not stall each other on a 2-core machine."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
