from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from quant_helpers import SUB_SCALED_BLOCKS, q4_k_blocks, q6_k_blocks

from codelm.quant import (
    Int4Weight,
    Int8Weight,
    SubScaledInt8Weight,
    dequantize,
    dequantize_gguf,
    quantize_int4,
    repack_gguf,
    repack_reader_tensor,
    unpack_int4,
)

T = GGMLQuantizationType


def _weights(n: int = 64, k: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[:, :32] += 0.3  # a shifted block, so Q4_1's min is far from -max
    return w


@pytest.fixture(params=["numpy", "native"])
def unpacker(request, monkeypatch):
    """Q8_0 / Q5_0 blocks unpacked by numpy, or by the native kernels where they are loaded
    (codelm_unpack_gguf_int8: the loader's path, since its dispatcher loads them first)."""
    from codelm.quant import native

    if request.param == "numpy":
        monkeypatch.setattr(native, "_loaded", "off for this test")
    elif isinstance(reason := native.library(), str):
        pytest.skip(reason)
    return request.param


@pytest.mark.parametrize(
    ("qtype", "cls", "scheme"),
    [
        (T.Q4_0, Int4Weight, "int4"),
        (T.Q4_1, Int4Weight, "int4"),
        (T.Q5_0, Int8Weight, "int8"),
        (T.Q8_0, Int8Weight, "int8"),
    ],
)
def test_gguf_repack_dequantises_exactly_like_gguf_when_native_type(qtype, cls, scheme, unpacker):
    blocks = quants.quantize(_weights(), qtype)
    qw = repack_gguf(blocks, qtype, (64, 256), name="blk.0.ffn_up.weight")
    assert isinstance(qw, cls) and qw.scheme == scheme and qw.group_size == 32
    expected = quants.dequantize(blocks, qtype)
    assert np.array_equal(dequantize(qw).numpy(), expected)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16])
def test_dequantize_gguf_gives_gguf_values_bit_for_bit(qtype, monkeypatch, unpacker):
    from codelm.quant import gguf_repack

    monkeypatch.setattr(gguf_repack, "_Q5_CHUNK", 3 * 256)  # several row chunks, one ragged
    w = _weights(10, 256)
    w[3, 40] = 2.5  # an outlier block
    blocks = quants.quantize(w, qtype)
    expected = quants.dequantize(blocks, qtype).reshape(10, 256)
    got = dequantize_gguf(blocks, qtype.name, (10, 256))
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected)


def test_dequantize_gguf_refuses_data_that_does_not_hold_the_shape():
    blocks = quants.quantize(_weights(4, 64), T.Q5_0)
    with pytest.raises(ValueError, match="do not hold shape"):
        dequantize_gguf(blocks, T.Q5_0, (8, 64), name="blk.0.attn_q.weight")


def test_gguf_repack_reads_low_nibbles_as_first_half_of_block():
    # One Q4_0 block, d = 1: byte j holds element j (low nibble) and j + 16 (high nibble).
    qs = np.array([(j % 16) | ((15 - j % 16) << 4) for j in range(16)], dtype=np.uint8)
    block = np.concatenate([np.array([1.0], dtype="<f2").view(np.uint8), qs])
    qw = repack_gguf(block[None, :], "Q4_0", (1, 32))
    q = unpack_int4(qw.data)[0].tolist()
    assert q[:16] == list(range(16)) and q[16:] == list(range(15, -1, -1))
    assert dequantize(qw)[0].tolist() == [float(v - 8) for v in q]


def test_gguf_repack_q4_1_zero_is_min_plus_eight_d():
    blocks = quants.quantize(_weights(4, 64), T.Q4_1)
    raw = blocks.reshape(4, 2, 20)
    d = raw[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32)
    m = raw[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32)
    qw = repack_gguf(blocks, T.Q4_1, (4, 64))
    assert np.array_equal(qw.zeros.numpy(), m + 8 * d)
    assert np.array_equal(qw.scales.numpy(), d)


def test_gguf_repack_q4_1_warns_when_zero_not_exact_in_fp32(caplog):
    # A block whose min dwarfs its step: m + 8 d needs more than float32's 24 bits.
    head = np.array([1.23e-4, 1025.0], dtype="<f2").view(np.uint8)
    block = np.concatenate([head, np.full(16, 0x11, dtype=np.uint8)])
    with caplog.at_level(logging.WARNING, logger="codelm.quant.gguf_repack"):
        repack_gguf(block[None, :], T.Q4_1, (1, 32), name="odd")
    assert "odd: 1 of 1 Q4_1 blocks" in caplog.text


def test_gguf_repack_keeps_q4_k_values_as_int4_groups_of_32():
    data = q4_k_blocks(8, 512)
    qw = repack_gguf(data, T.Q4_K, (8, 512), name="blk.0.ffn_down.weight")
    assert isinstance(qw, Int4Weight) and qw.group_size == 32
    expected = quants.dequantize(data, T.Q4_K).reshape(8, 512)
    got = dequantize(qw).numpy()
    # The zero point 8 d sc - dmin m rounds once in float32, where ggml's d sc q - dmin m
    # rounds after the subtraction: at most an ulp or two of the values apart.
    assert np.abs(got - expected).max() <= 2 * np.spacing(np.abs(expected).max())
    assert (got == expected).mean() > 0.9
    # The q of each group are the file's nibbles: a requantisation would move some of them.
    nibbles = data.reshape(8, 2, 144)[..., 16:].reshape(8, 2, 4, 32)
    q = unpack_int4(qw.data).numpy().reshape(8, 2, 4, 2, 32)
    assert np.array_equal(q[:, :, :, 0], nibbles & 0x0F)
    assert np.array_equal(q[:, :, :, 1], nibbles >> 4)


def test_gguf_repack_reads_q4_k_scales_and_mins():
    """One super-block whose 8 scales are 1..8 (8 spread over the top bits) and mins 0..7."""
    scales = np.zeros(12, dtype=np.uint8)
    sc, m = [1, 2, 3, 4, 5, 6, 7, 63], [0, 1, 2, 3, 4, 5, 6, 40]
    for j in range(4):
        scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        scales[j + 4] = m[j] | ((m[j + 4] >> 4) << 6)
        scales[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4)
    head = np.array([1.0, 0.5], dtype="<f2").view(np.uint8)
    block = np.concatenate([head, scales, np.full(128, 0x21, dtype=np.uint8)])
    qw = repack_gguf(block[None, :], T.Q4_K, (1, 256))
    assert qw.scales[0].tolist() == [float(v) for v in sc]
    # Nibbles 1 (low, even groups) and 2 (high, odd groups): w = sc q - 0.5 m.
    expected = [sc[g] * (1 if g % 2 == 0 else 2) - 0.5 * m[g] for g in range(8)]
    assert dequantize(qw)[0].reshape(8, 32)[:, 0].tolist() == expected
    assert np.array_equal(dequantize(qw).numpy(), quants.dequantize(block[None, :], T.Q4_K))


@pytest.mark.parametrize(("qtype", "scheme"), [(T.F16, "int8"), (T.F32, "int8")])
def test_gguf_repack_requantises_other_types_within_half_step(qtype, scheme):
    w = _weights(32, 128)
    data = quants.quantize(w, qtype)
    qw = repack_gguf(data, qtype, (32, 128))
    assert qw.scheme == scheme and qw.is_per_channel
    source = quants.dequantize(data, qtype)
    err = np.abs(dequantize(qw).numpy() - source)
    assert (err <= qw.scales.numpy() / 2 + 1e-7).all()


@pytest.mark.parametrize("qtype", sorted(SUB_SCALED_BLOCKS))
def test_gguf_repack_keeps_k_quant_values_beside_their_int8_blocks(qtype):
    data = SUB_SCALED_BLOCKS[qtype](8, 512)
    qw = repack_gguf(data, qtype, (8, 512), scheme="int8", int8_group_size=32)
    assert isinstance(qw, SubScaledInt8Weight) and qw.group_size == 32
    source = quants.dequantize(data, T[qtype]).reshape(8, 512)
    # The file's own values, bit for bit (Q6_K's d sc q is exact in float32: 11 + 7 + 5 bits;
    # Q4_K's and Q5_K's d sc q - dmin m round once, at the subtraction, as gguf's do) ...
    assert np.array_equal(qw.exact().numpy(), source)
    assert qw.sub_data.min() >= -32 and qw.sub_data.max() <= 31
    # ... and the int8 blocks every other kernel takes, within half a step of them.
    err = np.abs(dequantize(qw).numpy() - source).reshape(8, 16, 32)
    assert (err <= qw.scales.numpy()[..., None] / 2 + 1e-7).all()


def test_gguf_repack_reads_q6_k_bits_in_ggml_order():
    """One super-block: value 32j + l of each half is the low (j < 2) or high nibble of low
    byte l + 32 (j % 2) with bits 2j, 2j + 1 of high byte l above it."""
    low = np.array([0x21] * 32 + [0x43] * 32 + [0x65] * 32 + [0x87] * 32, dtype=np.uint8)
    high = np.array([0b11100100] * 32 + [0b00011011] * 32, dtype=np.uint8)
    scales = np.arange(1, 17, dtype=np.int8).view(np.uint8)
    block = np.concatenate([low, high, scales, np.array([1.0], dtype="<f2").view(np.uint8)])
    qw = repack_gguf(block[None, :], T.Q6_K, (1, 256), int8_group_size=32)
    q = qw.sub_data[0].view(8, 32)[:, 0].tolist()
    # half 0: nibbles 1, 3, 2, 4 with pairs 0, 1, 2, 3; half 1: 5, 7, 6, 8 with 3, 2, 1, 0.
    assert q == [v - 32 for v in (1, 19, 34, 52, 53, 39, 22, 8)]
    assert qw.sub_scales[0].tolist() == list(range(1, 17))
    assert np.array_equal(qw.exact().numpy(), quants.dequantize(block[None, :], T.Q6_K))


def test_gguf_repack_dequantises_k_quants_then_quantises_int4_when_asked():
    data = q6_k_blocks(8, 512)
    qw = repack_gguf(data, T.Q6_K, (8, 512), scheme="int4", group_size=64, search=True)
    assert qw.scheme == "int4" and qw.group_size == 64
    source = quants.dequantize(data, T.Q6_K)
    # Requantised with the range search: no worse, in squared error, than plain min/max int4
    # of the same values (whose error is at most half a step everywhere).
    plain, _ = quantize_int4(torch.from_numpy(np.ascontiguousarray(source)), 64)
    searched_mse = np.square(dequantize(qw).numpy() - source).mean()
    plain_mse = np.square(dequantize(plain).numpy() - source).mean()
    assert searched_mse <= plain_mse


def test_gguf_repack_rejects_byte_count_that_does_not_match_shape():
    blocks = quants.quantize(_weights(4, 64), T.Q8_0)
    with pytest.raises(ValueError, match=r"w: 272 bytes of Q8_0 do not hold shape \(4, 128\)"):
        repack_gguf(blocks, T.Q8_0, (4, 128), name="w")


def test_gguf_repack_rejects_one_dimensional_tensor():
    with pytest.raises(ValueError, match=r"norm: expected a 2-D weight, got shape \(64,\)"):
        repack_gguf(np.zeros(64, dtype=np.float32), T.F32, (64,), name="norm")


def test_gguf_repack_reader_tensor_reverses_ggml_dims(tmp_path):
    w = _weights(48, 128)
    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    blocks = quants.quantize(w, T.Q4_1)
    writer.add_tensor("blk.0.attn_q.weight", blocks, raw_shape=blocks.shape, raw_dtype=T.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = GGUFReader(str(path)).tensors[0]
    qw = repack_reader_tensor(tensor)
    assert qw.shape == (48, 128)
    assert torch.equal(dequantize(qw), torch.from_numpy(quants.dequantize(blocks, T.Q4_1)))
