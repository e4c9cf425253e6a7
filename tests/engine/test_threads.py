"""CpuShare: threads per request from what other processes leave free (/proc/stat)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from codelm.daemon.engine import engine as engine_module
from codelm.daemon.engine import threads
from codelm.daemon.engine.threads import CpuShare
from codelm.daemon.protocol import CompleteRequest

TICK = os.sysconf("SC_CLK_TCK")


class Machine:
    """A fake clock, /proc/stat (two CPUs plus one outside our affinity) and our CPU time."""

    def __init__(self, tmp_path, monkeypatch) -> None:
        self.stat = tmp_path / "stat"
        self.now = 100.0
        self.busy = {0: 0.0, 1: 0.0, 2: 0.0}  # CPU-seconds busy per CPU
        self.ours = 0.0
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(os, "times", lambda: SimpleNamespace(user=self.ours, system=0))
        self.write()

    def write(self) -> None:
        lines = ["cpu  1 2 3 4 5 6 7 8 9 10"]
        for cpu, busy in self.busy.items():
            # user nice system idle iowait irq softirq steal guest guest_nice
            user = round(busy * TICK)
            lines.append(f"cpu{cpu} {user} 0 0 {10**6} 500 0 0 0 {user} 0")
        self.stat.write_text("\n".join([*lines, "intr 1 2 3", "ctxt 5"]) + "\n")

    def run(self, seconds: float, others: dict[int, float], ours: float = 0.0) -> None:
        """`seconds` pass with CPUs busy as given (fraction per CPU), ours included."""
        self.now += seconds
        for cpu, share in others.items():
            self.busy[cpu] += share * seconds
        self.ours += ours * seconds
        self.write()


@pytest.fixture
def machine(tmp_path, monkeypatch) -> Machine:
    return Machine(tmp_path, monkeypatch)


def test_an_idle_machine_gets_every_core(machine):
    share = CpuShare(2, machine.stat)
    machine.run(1.0, {0: 0.05, 1: 0.05})
    assert share.threads() == 2


def test_a_lasting_busy_core_costs_a_thread_that_comes_back_when_freed(machine):
    share = CpuShare(2, machine.stat)
    machine.run(1.0, {0: 1.0})
    assert share.threads() == 2  # one span: could be a burst
    machine.run(1.0, {0: 1.0})
    assert share.threads() == 1
    assert share.others == pytest.approx(1.0, abs=0.02)
    machine.run(1.0, {})
    assert share.threads() == 2


def test_a_burst_in_one_span_costs_nothing(machine):
    share = CpuShare(2, machine.stat)
    machine.run(1.0, {})
    assert share.threads() == 2
    machine.run(0.6, {0: 1.0})  # e.g. the client that sends the request starting up
    assert share.threads() == 2
    machine.run(1.0, {})
    assert share.threads() == 2


def test_half_a_cpu_of_background_use_does_not_cost_a_thread(machine):
    share = CpuShare(2, machine.stat)
    for _ in range(2):
        machine.run(1.0, {0: 0.25, 1: 0.2})
        assert share.threads() == 2
    for _ in range(2):
        machine.run(1.0, {0: 0.4, 1: 0.3})
        share.threads()
    assert share.current == 1


def test_our_own_cpu_time_is_not_counted_against_us(machine):
    share = CpuShare(2, machine.stat)
    machine.run(1.0, {0: 1.0, 1: 1.0}, ours=2.0)
    assert share.threads() == 2


def test_cpus_outside_our_affinity_do_not_count(machine):
    share = CpuShare(2, machine.stat)
    machine.run(1.0, {2: 1.0})
    assert share.threads() == 2


def test_a_short_span_keeps_the_last_answer(machine):
    share = CpuShare(2, machine.stat)
    for _ in range(2):
        machine.run(1.0, {1: 1.0})
        share.threads()
    assert share.threads() == 1
    machine.run(0.1, {})  # too short to judge: the last answer stands
    assert share.threads() == 1


def test_never_fewer_than_one_thread(machine):
    share = CpuShare(2, machine.stat)
    for _ in range(2):
        machine.run(1.0, {0: 1.0, 1: 1.0})
        share.threads()
    assert share.threads() == 1


def test_without_proc_stat_every_call_gets_every_core(tmp_path):
    share = CpuShare(4, tmp_path / "missing")
    assert share.threads() == 4


def test_engine_runs_a_request_with_the_threads_cpushare_gives(default_engine, monkeypatch):
    seen = []
    real_generate = engine_module.generate

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_generate(*args, **kwargs)

    before = torch.get_num_threads()
    monkeypatch.setattr(default_engine, "cpu", SimpleNamespace(threads=lambda: 1))
    monkeypatch.setattr(engine_module, "generate", spy)
    text = "def add(a, b):\n    return "
    default_engine.complete(CompleteRequest(uri="file:///t.py", text=text, line=1, character=11))
    assert seen == [1]
    assert torch.get_num_threads() == before
