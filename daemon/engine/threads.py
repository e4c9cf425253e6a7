"""CPU threads per request: the cores other processes leave free, measured as we go.

torch's OpenMP threads spin briefly between parallel regions (libgomp's default). On an idle
machine that is what makes a second thread pay off; when another process keeps a core busy,
a thread that shares it stalls every op of the team, and one thread is faster (measured in
docs/engine.md). So each request runs with as many threads as there are cores the rest of
the machine left free over the last two spans of at least half a second each.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from codelm.quant.dispatch import CpuClock

logger = logging.getLogger(__name__)

WINDOW_S = 0.5  # the shortest span the other processes' CPU use is averaged over
# A neighbour using up to half a CPU does not cost a thread: on 2 cores a SmolLM2 decode step
# took 11.2 ms with 2 threads and 11.8 with 1 beside a process busy 30% of the time, 13.1 and
# 11.4 beside one busy 60% of the time.
SLACK_CPUS = 0.5


class CpuShare:
    """`threads()`: 1..`cores`, one fewer for each CPU other processes keep busy.

    Busy time comes from /proc/stat, summed over the CPUs this process may run on, less this
    process's own CPU time (its spinning threads included). Only load that lasts counts: the
    lesser of the last two spans, so a burst (the client that sent this request starting up)
    costs nothing, a build costs a thread from its second span on, and the threads come back
    as soon as one span is quiet. Where /proc/stat cannot be read (not Linux), every call gets
    `cores`.
    """

    def __init__(self, cores: int, stat_path: str | Path = "/proc/stat") -> None:
        self.cores = max(1, cores)
        self.clock = CpuClock(stat_path)
        self.n_cpus = self.clock.n_cpus
        self.others = 0.0  # CPUs the other processes kept busy: the lesser of the last two spans
        self._previous = 0.0  # the span before the last one
        self.current = self.cores
        self._last = self.clock.sample()

    def threads(self) -> int:
        if self._last is None:
            return self.cores
        if time.monotonic() - self._last[0] < WINDOW_S:
            return self.current  # a span too short to judge: /proc/stat is not read
        now = self.clock.sample()
        if now is None:
            return self.cores
        span, self._last = self.clock.between(self._last, now), now
        self.others, self._previous = min(span, self._previous), span
        free = self.n_cpus - self.others
        threads = max(1, min(self.cores, math.floor(free + SLACK_CPUS)))
        if threads != self.current:
            logger.info(
                "other processes use %.1f of %d CPUs: %d threads (was %d)",
                self.others, self.n_cpus, threads, self.current,
            )  # fmt: skip
            self.current = threads
        return threads
