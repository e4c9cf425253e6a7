"""The head's shortlist (cpu.Int8Shortlist): int8_native's two largest logits, and which rows
hold them, from the weights' top 5 bits and a few exact rows."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from codelm.quant import cpu, native, quantize_int8
from codelm.quant.cpu import Int5Native, Int8Native, Int8Shortlist
from codelm.quant.dispatch import DispatchConfig, Dispatcher
from codelm.quant.formats import Int8Weight

_LIB = native.library()
pytestmark = pytest.mark.skipif(isinstance(_LIB, str), reason=f"no native kernel: {_LIB}")


def _head(gen: torch.Generator, n: int = 4096, k: int = 256, group: int = 32) -> Int8Weight:
    """int8 weights over the whole range: every row holds -128 and 127 (round(q / 8) would be
    16 there: the 5 bits stop at 15) and a few values near them."""
    qw = quantize_int8(torch.randn(n, k, generator=gen) * 0.05, group_size=group)[0]
    data = qw.data.clone()
    data[:, 0], data[:, 1], data[:, 2] = -128, 127, 124
    return Int8Weight(data=data, scales=qw.scales, group_size=group)


def _peaked(qw: Int8Weight, row: int, gen: torch.Generator) -> torch.Tensor:
    """x pointing at `row`, as a model's last hidden state points at its next token."""
    w = qw.data[row].float() * qw.scales[row].repeat_interleave(qw.group_size)
    return (w + 0.3 * w.norm() / math.sqrt(w.numel()) * torch.randn(w.shape, generator=gen))[None]


@pytest.mark.parametrize("group", [32, 64, 256])
def test_the_top_bits_logit_is_within_its_bound_of_the_int8_one(gen, group):
    qw = _head(gen, group=group)
    exact = Int8Native(qw)
    shortlist = Int8Shortlist(exact)
    # Its 5-bit weights are round(q / 8), at most 15, as Int5Native holds them.
    high = torch.div(qw.data.short() + 4, 8, rounding_mode="floor").clamp(max=15).to(torch.int8)
    plain = Int5Native(Int8Weight(data=high, scales=qw.scales, group_size=group))
    for x in (torch.randn(3, 256, generator=gen), _peaked(qw, 7, gen) * 1e3):
        assert torch.equal(shortlist.top(x), plain(x))
        gap = (exact(x) - 8 * shortlist.top(x)).abs()
        reach = x.double().norm(dim=1, keepdim=True) * (1 + math.sqrt(32) / 254)
        assert (gap <= shortlist.bound * reach).all()


@pytest.mark.parametrize("group", [32, 256])
def test_the_two_largest_logits_and_their_rows_are_int8_natives(gen, group):
    qw = _head(gen, group=group)
    exact = Int8Native(qw)
    shortlist = Int8Shortlist(exact)
    exact_rows = []
    for row in range(0, 4096, 97):
        x = _peaked(qw, row, gen)
        want, got = exact(x)[0], shortlist.shortlisted(x)[0]
        assert torch.equal(got.topk(2).indices, want.topk(2).indices)
        assert torch.equal(got.topk(2).values, want.topk(2).values)
        # Every other row holds a bound of its own logit, below the runner-up.
        kept = got == want
        assert (got[~kept] >= want[~kept]).all()
        assert (got[~kept] < want.topk(2).values[1]).all()
        exact_rows.append(int(kept.sum()))
    assert max(exact_rows) < 4096 // 4  # a shortlist, not the head again


def test_rows_tied_for_the_top_are_both_kept(gen):
    qw = _head(gen)
    data = qw.data.clone()
    data[10] = data[3000]
    scales = qw.scales.clone()
    scales[10] = scales[3000]
    qw = Int8Weight(data=data, scales=scales, group_size=32)
    exact = Int8Native(qw)
    x = _peaked(qw, 3000, gen)
    got = Int8Shortlist(exact).shortlisted(x)[0]
    assert got[10] == got[3000] == exact(x)[0].max()
    assert int(got.argmax()) == int(exact(x)[0].argmax()) == 10  # the first, as argmax takes


def test_x_with_nan_gets_the_int8_logits(gen):
    exact = Int8Native(_head(gen))
    x = torch.randn(1, 256, generator=gen)
    x[0, 5] = math.nan
    assert torch.equal(Int8Shortlist(exact).shortlisted(x).isnan(), exact(x).isnan())


def test_a_call_runs_the_path_that_has_timed_faster_and_now_and_then_the_other(gen, monkeypatch):
    shortlist = Int8Shortlist(Int8Native(_head(gen)))
    clock = [0.0]
    cost = {"shortlist": 3.0, "exact": 4.0}  # ms a call
    ran = []

    def path(name):
        def run(x):
            clock[0] += cost[name] / 1e3
            ran.append(name)
            return name

        return run

    monkeypatch.setattr(shortlist, "shortlisted", path("shortlist"))
    monkeypatch.setattr(shortlist, "exact", path("exact"))
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock[0])
    x = torch.zeros(1, 256)
    assert [shortlist(x) for _ in range(16)] == ran
    # Each path once to time it, then the faster, and the other every EXPLORE-th call.
    assert ran[:2] == ["shortlist", "exact"]
    assert ran[2:] == ["exact" if (i + 3) % 8 == 0 else "shortlist" for i in range(14)]
    cost["shortlist"] = 9.0  # memory got quiet: the whole int8 head is faster now
    ran.clear()
    for _ in range(16):
        shortlist(x)
    assert ran[-8:].count("shortlist") == 1  # the exploring call alone


def test_the_dispatcher_takes_a_shortlist_only_for_int8_native_and_within_budget(gen, caplog):
    exact = Int8Native(_head(gen))
    assert Dispatcher(DispatchConfig(calibrate=False)).shortlist(exact) is None
    assert Dispatcher(DispatchConfig(dense_budget_bytes=1 << 30)).shortlist(object()) is None
    tight = Dispatcher(DispatchConfig(dense_budget_bytes=1 << 10))
    with caplog.at_level(logging.INFO, logger="codelm.quant.dispatch"):
        assert tight.shortlist(exact, "head") is None
    assert "head: no shortlist" in caplog.text
    roomy = Dispatcher(DispatchConfig(dense_budget_bytes=1 << 30))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="codelm.quant.dispatch"):
        taken = roomy.shortlist(exact, "head")
    # Taken or not as timed here; either way the log says which and why.
    assert ("shortlist taken" if taken else "int8_native kept") in caplog.text
    assert roomy.dense_bytes_used == (taken.nbytes if taken else 0)
    if taken:  # its first calls start from the times the dispatcher measured
        assert set(taken.ms) == {"shortlist", "exact"}
        assert taken.ms["shortlist"] * roomy.config.prefill_tie < taken.ms["exact"]
