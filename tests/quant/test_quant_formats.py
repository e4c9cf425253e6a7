from __future__ import annotations

import pytest
import torch
from quant_helpers import SUB_SCALED_BLOCKS, weight

from codelm.quant import (
    Int4Weight,
    Int8Weight,
    SubScaledInt8Weight,
    concat_formats,
    dequantize,
    from_tensors,
    pack_int4,
    quantize_int4,
    quantize_int8,
    repack_gguf,
    select_rows,
    to_tensors,
    unpack_int4,
)


def test_pack_int4_puts_even_k_in_high_nibble():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x12, 0xF0]]
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_unpack_int4_round_trips_random_values(gen):
    q = torch.randint(0, 16, (8, 64), generator=gen, dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_int4_weight_rejects_bad_data_dtype_naming_shape():
    with pytest.raises(ValueError, match=r"uint8 \[N, K // 2\].*\(4, 16\)"):
        Int4Weight(
            data=torch.zeros(4, 16, dtype=torch.int8),
            scales=torch.zeros(4, 1),
            zeros=torch.zeros(4, 1),
            group_size=32,
        )


def test_int4_weight_rejects_scales_of_wrong_shape():
    with pytest.raises(ValueError, match=r"scales must be float32 \[4, 2\].*\(4, 1\)"):
        Int4Weight(
            data=torch.zeros(4, 32, dtype=torch.uint8),
            scales=torch.zeros(4, 1),
            zeros=torch.zeros(4, 2),
            group_size=32,
        )


def test_int4_weight_rejects_unsupported_group_size():
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Weight(
            data=torch.zeros(4, 8, dtype=torch.uint8),
            scales=torch.zeros(4, 1),
            zeros=torch.zeros(4, 1),
            group_size=16,
        )


def test_int8_weight_rejects_group_not_dividing_k():
    with pytest.raises(ValueError, match="group_size 32 must divide K=48"):
        Int8Weight(
            data=torch.zeros(2, 48, dtype=torch.int8), scales=torch.zeros(2, 1), group_size=32
        )


def test_int8_weight_rejects_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout"):
        Int8Weight(
            data=torch.zeros(2, 32, dtype=torch.int8),
            scales=torch.zeros(2, 1),
            group_size=32,
            layout="int8_kn",
        )


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_concat_formats_equals_separate_dequantised_rows(gen, scheme):
    quantize = quantize_int4 if scheme == "int4" else quantize_int8
    parts = [quantize(weight(gen, n, 128))[0] for n in (64, 16, 16)]
    fused = concat_formats(parts)
    assert fused.shape == (96, 128)
    assert torch.equal(dequantize(fused), torch.cat([dequantize(p) for p in parts]))


def test_concat_formats_rejects_mixed_schemes(gen):
    w = weight(gen, 16, 64)
    with pytest.raises(ValueError, match="weight 1 is int8"):
        concat_formats([quantize_int4(w)[0], quantize_int8(w)[0]])


def test_concat_formats_rejects_different_k_naming_shapes(gen):
    a, _ = quantize_int4(weight(gen, 16, 64))
    b, _ = quantize_int4(weight(gen, 16, 128))
    with pytest.raises(ValueError, match=r"\(16, 128\), expected K=64"):
        concat_formats([a, b])


def test_select_rows_permutes_dequantised_rows(gen):
    qw, _ = quantize_int4(weight(gen, 32, 64))
    index = torch.randperm(32, generator=gen)
    assert torch.equal(dequantize(select_rows(qw, index)), dequantize(qw)[index])


def _sub_scaled(n: int, seed: int = 1, qtype: str = "Q6_K") -> SubScaledInt8Weight:
    data = SUB_SCALED_BLOCKS[qtype](n, 512, seed)
    return repack_gguf(data, qtype, (n, 512), scheme="int8", int8_group_size=32)


def test_sub_scaled_rows_move_with_their_int8_rows(gen):
    a, b = _sub_scaled(16), _sub_scaled(8, seed=2)
    both = concat_formats([a, b])
    assert isinstance(both, SubScaledInt8Weight)
    assert torch.equal(both.exact(), torch.cat([a.exact(), b.exact()]))
    assert torch.equal(dequantize(both), torch.cat([dequantize(a), dequantize(b)]))
    index = torch.randperm(24, generator=gen)
    picked = select_rows(both, index)
    assert torch.equal(picked.exact(), both.exact()[index])
    assert torch.equal(dequantize(picked), dequantize(both)[index])


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K"])
def test_concat_formats_of_k_quants_keeps_them_exact(qtype):
    # A Q4_K_M / Q5_K_M file's q / k (groups of 32 with zeros) beside its Q6_K v (groups of
    # 256), asked to be int8.
    a, b = _sub_scaled(16, qtype=qtype), _sub_scaled(8, seed=2)
    both = concat_formats([a, b])
    assert isinstance(both, SubScaledInt8Weight) and both.super_group == 32
    assert torch.equal(both.exact(), torch.cat([a.exact(), b.exact()]))


def test_sub_scaled_int8_weight_leaves_its_sub_scales_on_the_cpu():
    qw = _sub_scaled(16)
    assert isinstance(qw.to("cpu"), SubScaledInt8Weight)
    moved = qw.to("meta")  # any other device: the int8 blocks alone
    assert type(moved) is Int8Weight and moved.data.device.type == "meta"


def test_concat_formats_of_sub_scaled_and_plain_int8_is_plain_int8(gen):
    a, plain = _sub_scaled(16), quantize_int8(weight(gen, 8, 512), 32)[0]
    both = concat_formats([a, plain])
    assert type(both) is Int8Weight
    assert torch.equal(dequantize(both), torch.cat([dequantize(a), dequantize(plain)]))


def test_sub_scaled_int8_weight_rejects_sub_scales_of_wrong_shape():
    qw = _sub_scaled(16)
    with pytest.raises(ValueError, match=r"sub_scales must be torch.int8 \[16, 32\]"):
        SubScaledInt8Weight(
            data=qw.data,
            scales=qw.scales,
            group_size=32,
            sub_data=qw.sub_data,
            sub_scales=qw.sub_scales[:, :16],
            super_scales=qw.super_scales,
        )


@pytest.mark.parametrize("scheme", ["int4", "int8", "sub-scaled int8", "sub-scaled with zeros"])
def test_to_tensors_round_trips_through_safetensors(gen, tmp_path, scheme):
    from safetensors.torch import load_file, save_file

    if scheme.startswith("sub-scaled"):
        qw = _sub_scaled(16, qtype="Q5_K" if scheme.endswith("zeros") else "Q6_K")
    else:
        qw = (quantize_int4 if scheme == "int4" else quantize_int8)(weight(gen, 16, 64))[0]
    tensors, meta = to_tensors(qw, prefix="layers.0.q_proj.")
    save_file(tensors, tmp_path / "w.safetensors", metadata=meta)
    back = from_tensors(load_file(tmp_path / "w.safetensors"), meta, prefix="layers.0.q_proj.")
    assert type(back) is type(qw) and back.group_size == qw.group_size
    assert torch.equal(dequantize(back), dequantize(qw))
    if scheme.startswith("sub-scaled"):
        assert torch.equal(back.exact(), qw.exact())


def test_from_tensors_rejects_unknown_layout(gen):
    tensors, meta = to_tensors(quantize_int4(weight(gen, 16, 64))[0])
    with pytest.raises(ValueError, match="unknown layout 'u4x2_nk_lo_first'"):
        from_tensors(tensors, {**meta, "layout": "u4x2_nk_lo_first"})
