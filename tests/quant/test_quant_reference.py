from __future__ import annotations

import pytest
import torch
from quant_helpers import weight

from codelm.quant import (
    dequantize,
    matmul,
    quantize_int4,
    quantize_int8,
    quantize_rows,
    requantize_int8_per_channel,
    unpack_int4,
)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_int4_error_within_half_step_and_reported(gen, group_size):
    w = weight(gen, 48, 256)
    qw, err = quantize_int4(w, group_size)
    assert qw.group_size == group_size and qw.shape == (48, 256)
    actual = (dequantize(qw) - w).abs()
    assert err == pytest.approx(actual.max().item())
    step = qw.scales.repeat_interleave(group_size, dim=1)
    assert (actual <= step / 2 + 1e-6).all()


def test_quantize_int4_uses_full_range_and_convention(gen):
    qw, _ = quantize_int4(weight(gen, 8, 64), 32)
    q = unpack_int4(qw.data).float().view(8, 2, 32)
    assert q.min() == 0 and q.max() == 15
    expected = (q - 8) * qw.scales[..., None] + qw.zeros[..., None]
    assert torch.equal(dequantize(qw), expected.view(8, 64))


def test_quantize_int8_per_channel_error_within_half_step(gen):
    w = weight(gen, 40, 96)
    qw, err = quantize_int8(w)
    assert qw.is_per_channel and qw.scales.shape == (40, 1)
    actual = (dequantize(qw) - w).abs()
    assert err == pytest.approx(actual.max().item())
    assert (actual <= qw.scales / 2 + 1e-7).all()
    assert qw.data.abs().max() == 127


def test_quantize_keeps_all_zero_rows_exact():
    w = torch.zeros(4, 64)
    w[1] = 1.0
    for qw, err in (quantize_int4(w), quantize_int8(w)):
        assert err == 0.0
        assert torch.equal(dequantize(qw), w)


def test_quantize_int4_rejects_group_not_dividing_k_naming_shape(gen):
    with pytest.raises(ValueError, match=r"q_proj: group_size 32 must divide K of shape \(4, 48\)"):
        quantize_int4(weight(gen, 4, 48), 32, name="q_proj")


def test_quantize_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"\[N, K\] weight, got torch.float32 \(8,\)"):
        quantize_int8(torch.zeros(8))


def test_matmul_equals_float_matmul_of_dequantised(gen):
    qw, _ = quantize_int4(weight(gen, 32, 64))
    x = torch.randn(3, 5, 64, generator=gen)
    assert torch.allclose(matmul(x, qw), x @ dequantize(qw).t())


def test_matmul_rejects_wrong_k_naming_shape(gen):
    qw, _ = quantize_int8(weight(gen, 32, 64))
    with pytest.raises(ValueError, match=r"\(2, 63\), weight expects K=64"):
        matmul(torch.zeros(2, 63), qw)


def test_requantize_int8_per_channel_reports_its_error(gen):
    grouped, _ = quantize_int8(weight(gen, 16, 128), group_size=32)
    per_channel, err = requantize_int8_per_channel(grouped)
    assert per_channel.is_per_channel
    actual = (dequantize(per_channel) - dequantize(grouped)).abs().max().item()
    assert err == pytest.approx(actual)
    assert (actual <= per_channel.scales.max() / 2 + 1e-7).all()


def test_quantize_int4_range_search_lowers_the_squared_error(gen):
    w = weight(gen, 64, 256)
    w[torch.rand(w.shape, generator=gen) < 0.01] *= 6  # a few outliers, as real weights have
    plain, _ = quantize_int4(w, 32)
    searched, err = quantize_int4(w, 32, search=True)
    plain_mse = (dequantize(plain) - w).square().mean()
    searched_mse = (dequantize(searched) - w).square().mean()
    assert searched_mse < plain_mse
    assert err == pytest.approx((dequantize(searched) - w).abs().max().item())
    # The same convention (q - 8) * scale + zero; no range is wider than min/max.
    assert (searched.scales <= plain.scales + 1e-7).all()


@pytest.mark.parametrize(
    ("scheme", "group", "search"),
    [("int8", None, False), ("int8", 32, False), ("int4", 32, False), ("int4", 64, True)],
)
def test_quantize_rows_equals_quantising_the_matrix_whole(gen, scheme, group, search):
    w = weight(gen, 50, 128)
    read = []

    def rows(r0, r1):
        read.append(r1 - r0)
        return w[r0:r1].clone()

    got, err = quantize_rows(rows, 50, scheme, group, search=search, step=16)
    if scheme == "int8":
        whole, whole_err = quantize_int8(w, group)
    else:
        whole, whole_err = quantize_int4(w, group, search=search)
    assert read == [16, 16, 16, 2]  # never more than a step of rows at once
    assert type(got) is type(whole) and got.group_size == whole.group_size
    assert torch.equal(dequantize(got), dequantize(whole)) and err == whole_err
    with pytest.raises(ValueError, match="unknown scheme 'int4'"):
        quantize_rows(rows, 50, "int4", None)
