"""The native AVX2 int8 kernel: its build, its cache, its refusals and its edge cases.

test_quant_cpu_kernels.py checks it against reference.matmul with the other kernels."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from quant_helpers import (
    SUB_SCALED_BLOCKS,
    int4_blocks_bound,
    int8_blocks_bound,
    requantized_blocks_bound,
    weight,
)

from codelm.daemon.engine.layers import silu_and_mul
from codelm.quant import (
    QuantizedEmbedding,
    concat_formats,
    cpu,
    dequantize,
    dispatch,
    matmul,
    native,
    quantize_int4,
    quantize_int8,
    repack_gguf,
)
from codelm.quant.cpu import (
    CPU_KERNELS,
    Int4AsInt8Tiles,
    Int4Native,
    Int5Native,
    Int8Native,
    Int8Tiles,
    SubScaledTiles,
)
from codelm.quant.dispatch import read_cpu_info
from codelm.quant.formats import Int8Weight, SubScaledInt8Weight, select_rows

_LIB = native.library()
needs_native = pytest.mark.skipif(isinstance(_LIB, str), reason=f"no native kernel: {_LIB}")


def test_library_waits_for_the_build_prepare_started(tmp_path, monkeypatch):
    # The engine starts the build before reading a model; the first kernel that needs the
    # library then waits for that build instead of starting another elsewhere.
    monkeypatch.setattr(native, "_loaded", None)
    started, built_in = threading.Event(), []

    def slow_load(build_dir, arch):
        built_in.append(build_dir)
        started.set()
        time.sleep(0.2)
        return "built by prepare"

    monkeypatch.setattr(native, "_load", slow_load)
    thread = native.prepare(tmp_path)
    assert thread is not None and started.wait(5)
    assert native.library(tmp_path / "elsewhere") == "built by prepare"
    assert built_in == [tmp_path]
    thread.join(5)
    assert native.prepare(tmp_path) is None  # loaded: nothing more to start


@needs_native
def test_native_build_is_reused_when_loaded_again(tmp_path):
    # Libraries of earlier versions: one unused for longer than UNUSED_DAYS, one lately used.
    unused, recent = tmp_path / "kernels-unused.so", tmp_path / "kernels-recent.so"
    for old in (unused, recent):
        old.write_bytes(b"")
    long_ago = time.time() - (native.UNUSED_DAYS + 1) * 86400
    os.utime(unused, (long_ago, long_ago))
    first = native._load(tmp_path)
    assert isinstance(first, ctypes.CDLL)
    built = tmp_path / f"kernels-{first.codelm_build_key}.so"
    assert sorted(tmp_path.iterdir()) == sorted([built, recent])  # the build removed `unused`
    inode = built.stat().st_ino
    os.utime(built, (long_ago, long_ago))
    assert isinstance(native._load(tmp_path), ctypes.CDLL)
    assert built.stat().st_ino == inode  # opened again, not built again
    assert built.stat().st_mtime > long_ago  # and marked as in use
    assert sorted(tmp_path.iterdir()) == sorted([built, recent])  # no temporary files left
    assert native.build_key() == _LIB.codelm_build_key  # the process's own build, not this one


def test_native_says_why_when_compiler_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    reason = native._load(tmp_path)
    assert isinstance(reason, str)
    assert "no-such-cc" in reason


def _with_real_compiler(monkeypatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    if native.shutil.which("cc") is None and native.shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")


def test_native_says_why_when_source_does_not_compile(tmp_path, monkeypatch):
    _with_real_compiler(monkeypatch)
    broken = tmp_path / "kernels_x86.c"
    broken.write_text("int codelm_kernels_abi(void) { return undeclared_name; }\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    reason = native._load(tmp_path / "build")
    assert isinstance(reason, str)
    assert reason.startswith("compiling kernels_x86.c failed") and "undeclared_name" in reason
    assert not list((tmp_path / "build").glob("*.so"))


def test_native_kernel_is_no_candidate_when_k_not_multiple_of_32(gen):
    qw, _ = quantize_int8(weight(gen, 16, 48))
    assert "K=48 or group 48 is not a multiple of 32" in CPU_KERNELS["int8_native"].unavailable(qw)


@needs_native
# Int8Tiles (the prefill copy) computes what Int8Native does, in another order.
@pytest.mark.parametrize("kernel", [Int8Native, Int8Tiles])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_native_kernel_matches_reference_when_real_shapes(gen, rows, kernel):
    # A Qwen2.5-Coder down projection with an odd row count; one x row is all zeros (scale 0).
    qw, _ = quantize_int8(weight(gen, 899, 4864))
    x = torch.randn(rows, 4864, generator=gen)
    x[0, :64] = 0.0
    if rows > 1:
        x[1] = 0.0
    y = kernel(qw)(x)
    assert y.shape == (rows, 899) and y.dtype == torch.float32
    assert ((y - matmul(x, qw)).abs() <= int8_blocks_bound(x, dequantize(qw))).all()
    if rows > 1:
        assert (y[1] == 0).all()


@needs_native
def test_native_kernel_takes_bf16_activations(gen):
    qw, _ = quantize_int8(weight(gen, 64, 256))
    x = torch.randn(2, 256, generator=gen).to(torch.bfloat16)
    y = Int8Native(qw)(x)
    xf = x.float()
    assert ((y - matmul(xf, qw)).abs() <= int8_blocks_bound(xf, dequantize(qw))).all()


@needs_native
@pytest.mark.parametrize("kernel", [Int8Native, Int8Tiles])
@pytest.mark.parametrize("group_size", [32, 64, 896])
def test_native_kernel_matches_reference_when_group_wise(gen, group_size, kernel):
    # GGUF Q8_0 comes in groups of 32: the kernel takes them as they are.
    qw, _ = quantize_int8(weight(gen, 48, 896), group_size=group_size)
    x = torch.randn(5, 896, generator=gen)
    y = kernel(qw)(x)
    assert ((y - matmul(x, qw)).abs() <= int8_blocks_bound(x, dequantize(qw))).all()


@needs_native
@pytest.mark.parametrize(
    ("kernel", "bound"),
    [
        (Int4Native, int4_blocks_bound),
        (Int8Tiles, int4_blocks_bound),
        (Int4AsInt8Tiles, requantized_blocks_bound),
    ],
)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 17])
def test_native_int4_kernel_matches_reference_when_offset_weights(
    gen, group_size, rows, kernel, bound
):
    # Weights centred away from 0, as Q4_1's minimums make them: the zero points carry weight.
    qw, _ = quantize_int4(weight(gen, 136, 896) + 0.03, group_size)
    x = torch.randn(rows, 896, generator=gen)
    x[0, 32:64] = 0.0
    y = kernel(qw)(x)
    assert y.shape == (rows, 136)
    assert ((y - matmul(x, qw)).abs() <= bound(x, qw)).all()


@needs_native
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_as_int8_tiles_are_the_int8_tiles_of_the_requantised_weight(gen, group_size):
    # 100 rows: the last tile is padded. Its numbers are those of int8 tiles built from the
    # int4 weight's values quantised again to int8 blocks, to the bit; and no zeros are left.
    qw, _ = quantize_int4(weight(gen, 100, 896) + 0.03, group_size)
    requantised, _ = quantize_int8(dequantize(qw), group_size=32)
    tiles, x = Int4AsInt8Tiles(qw), torch.randn(9, 896, generator=gen)
    assert (tiles.offset, tiles.zeros) == (128, None)
    assert torch.equal(tiles(x), Int8Tiles(requantised)(x))


def five_bit(qw: Int8Weight) -> Int8Weight:
    """qw with its values rounded into -16 .. 15, as GGUF Q5_0 blocks hold them."""
    data = torch.clamp(torch.round(qw.data.float() / 8), -16, 15).to(torch.int8)
    return Int8Weight(data=data, scales=qw.scales * 8, group_size=qw.group_size)


@needs_native
@pytest.mark.parametrize("five", [False, True])
def test_tiles_store_int8_that_fits_5_bits_as_w_plus_16(gen, five):
    # Where every value is in -16 .. 15 the tiles hold w + 16 (the AVX2 code then multiplies
    # each byte once); the numbers are the same either way.
    qw, _ = quantize_int8(weight(gen, 48, 896), group_size=32)
    qw = five_bit(qw) if five else qw
    tiles, x = Int8Tiles(qw), torch.randn(7, 896, generator=gen)
    assert tiles.offset == (16 if five else 128)
    assert ((tiles(x) - matmul(x, qw)).abs() <= int8_blocks_bound(x, dequantize(qw))).all()


@needs_native
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("group_size", [32, 64, None])  # None: one scale per channel
def test_int5_native_multiplies_what_int8_native_does_in_fewer_bytes(gen, rows, group_size):
    # The same int32 products a block; the -16 of q = w + 16 is taken off with x's sums in
    # float, so equal but for rounding. 0.6875 bytes a weight against 1.0625 (groups of 32).
    qw = five_bit(quantize_int8(weight(gen, 96, 896), group_size=group_size)[0])
    five, eight = Int5Native(qw), Int8Native(qw)
    x = torch.randn(rows, 896, generator=gen)
    y = five(x)
    torch.testing.assert_close(y, eight(x), rtol=1e-5, atol=1e-5 * y.abs().max().item())
    assert ((y - matmul(x, qw)).abs() <= int8_blocks_bound(x, dequantize(qw))).all()
    if group_size == 32:
        assert five.nbytes == 96 * 896 * 0.6875 and eight.nbytes == 96 * 896 * 1.0625


def fp16_scaled(qw: Int8Weight) -> Int8Weight:
    """qw with its scales rounded to float16, as GGUF blocks hold them."""
    return Int8Weight(data=qw.data, scales=qw.scales.half().float(), group_size=qw.group_size)


@needs_native
@pytest.mark.parametrize("group_size", [32, 64, None])
def test_int5_native_rows_are_the_dequantised_rows(gen, group_size):
    # An embedding table in 5 bits: a lookup is the reference's values exactly. 100 ids go to
    # threads, a few are looked up on one.
    qw = fp16_scaled(five_bit(quantize_int8(weight(gen, 96, 896), group_size=group_size)[0]))
    table = Int5Native(qw)
    for ids in (torch.tensor([5, 0, 95, 5]), torch.randint(0, 96, (100,), generator=gen)):
        assert torch.equal(table.rows(ids), dequantize(qw)[ids])
    with pytest.raises(IndexError, match="outside 0 .. 95"):
        table.rows(torch.tensor([3, 96]))


@needs_native
@pytest.mark.parametrize("case", ["q5_0", "int8", "fp32 scales"])
def test_a_compact_embedding_is_held_in_5_bits_only_where_that_is_exact(gen, case):
    # A GGUF Q5_0 table (values in -16 .. 15, float16 scales): 0.6875 bytes a value against
    # int8's 1.0625 + float32 scales; anything else stays as it is, lookups equal either way.
    qw = quantize_int8(weight(gen, 50, 64), group_size=32)[0]
    qw = five_bit(qw) if case != "int8" else qw
    qw = fp16_scaled(qw) if case != "fp32 scales" else qw
    table = QuantizedEmbedding(qw, compact=True)
    ids = torch.tensor([[3, 7, 3], [49, 0, 12]])
    assert torch.equal(table(ids), dequantize(qw)[ids])
    if case == "q5_0":
        assert table.qweight is None and table.nbytes == 50 * 64 * 0.6875
    else:
        assert table.five_bits is None and table.nbytes == qw.nbytes


@needs_native
@pytest.mark.parametrize("element", [0, 5, 15, 16, 29, 31])
def test_int5_native_packs_q_as_nibbles_and_fifth_bits(element):
    # q = w + 16: element j's low 4 bits in byte j % 16 (high nibble from j = 16), its fifth
    # bit in the word after them: at j where the build has AVX-512 BW and VL (a byte mask),
    # else at 8 (j % 4) + j / 4 (one shift per lane lifts it to a byte's sign).
    data = torch.full((1, 32), -16, dtype=torch.int8)
    data[0, element] = 15  # q = 31: 0b11111
    packed = Int5Native(Int8Weight(data=data, scales=torch.ones(1, 1), group_size=32)).data[0]
    nibbles = [0] * 16
    nibbles[element % 16] = 0x0F << (4 * (element // 16))
    assert packed[:16].tolist() == nibbles
    bits = int.from_bytes(bytes(packed[16:].tolist()), "little")
    in_order = {"avx512bw", "avx512vl"} <= read_cpu_info().flags
    assert bits == 1 << (element if in_order else 8 * (element % 4) + element // 4)


@needs_native
def test_int5_native_takes_int8_in_5_bits_alone(gen):
    qw = quantize_int8(weight(gen, 16, 64), group_size=32)[0]
    assert CPU_KERNELS["int5_native"].unavailable(qw) == "not int8 in -16 .. 15"
    assert CPU_KERNELS["int5_native"].unavailable(five_bit(qw)) is None
    with pytest.raises(ValueError, match="outside -16 .. 15"):
        Int5Native(qw)


def _mixed(gen) -> Int8Weight:
    """A fused q / k / v like Qwen2.5-Coder's: Q5_0-range q and k (64 rows), a full int8 v (24
    rows: a tile and a half, the last padded)."""
    qk = five_bit(quantize_int8(weight(gen, 64, 896), group_size=32)[0])
    v = quantize_int8(weight(gen, 24, 896), group_size=32)[0]
    return concat_formats([qk, v])


@needs_native
def test_tiles_of_a_fused_layer_take_each_runs_offset(gen, monkeypatch):
    # The tiles of q and k hold w + 16, v's w + 128; each run is its own call writing its
    # columns of y, with the numbers one offset for all gives.
    qw = _mixed(gen)
    tiles, x = Int8Tiles(qw), torch.randn(70, 896, generator=gen)
    assert tiles.runs == [(0, 4, 16), (4, 6, 128)]
    y = tiles(x)
    assert ((y - matmul(x, qw)).abs() <= int8_blocks_bound(x, dequantize(qw))).all()
    monkeypatch.setattr(cpu, "_MAX_RUNS", 1)
    assert Int8Tiles(qw).runs == [(0, 6, 128)]
    assert torch.equal(y, Int8Tiles(qw)(x))
    assert tiles.silu_and_mul(x) is None  # a gate / up projection of two kinds: not fused


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_tile_bytes_are_the_layout_each_tile_at_its_offset(gen, threads):
    # The layout by definition: tile t, block b, step s, channel c holds the 4 bytes k = 32 b +
    # 4 s .. + 3 of row 16 t + c, plus the tile's offset (mod 256); rows past the last (40 is
    # 2 tiles and a half) are zeros plus it.
    n, k = 40, 96
    rows = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    offsets = torch.tensor([128, 16, 7], dtype=torch.uint8)
    out = torch.full((3, k // 32, 8, 16, 4), 99, dtype=torch.uint8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        cpu._tile_bytes(_LIB, rows, offsets, out)
    finally:
        torch.set_num_threads(before)
    u = torch.zeros(48, k, dtype=torch.uint8)
    u[:n] = rows.view(torch.uint8)
    u += offsets.repeat_interleave(16)[:, None]
    expected = u.view(3, 16, k // 32, 8, 4).permute(0, 2, 3, 1, 4)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="tile layout"):
        cpu._tile_bytes(_LIB, rows, offsets[:2], out[:2])  # 40 rows are 3 tiles


@needs_native
@pytest.mark.parametrize("rows", [5, 100, 203])  # 203: 3 whole spans of rows and 5 more
def test_tiles_outputs_are_the_same_whatever_the_threads(gen, rows):
    # The threads split rows x tile pairs between them, a span cut anywhere along its pairs:
    # each output is computed once, by the same code, so it is equal to the bit however many
    # threads share the work, and y starts as torch.empty: one missed is garbage.
    qw, _ = quantize_int8(weight(gen, 208, 256))  # 13 tiles: 7 pairs, the last of one tile
    tiles, x = Int8Tiles(qw), torch.randn(rows, 256, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = tiles(x)
        shared = []
        for n in (2, 3, 5):
            torch.set_num_threads(n)
            shared.append(tiles(x))
    finally:
        torch.set_num_threads(threads)
    assert ((alone - matmul(x, qw)).abs() <= int8_blocks_bound(x, dequantize(qw))).all()
    for y in shared:
        assert torch.equal(y, alone)


@needs_native
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 7, 70])  # 70: a second span of rows
def test_tiles_swiglu_epilogue_equals_swiglu_of_output(gen, scheme, rows):
    # A fused gate / up projection of 3 tiles of 16 each: silu(gate) * up from the registers is
    # silu_and_mul's function on the same floats, so equal to the bit.
    w = weight(gen, 96, 256)
    qw, _ = quantize_int8(w) if scheme == "int8" else quantize_int4(w, 32)
    tiles = Int8Tiles(qw)
    x = torch.randn(rows, 256, generator=gen) * 3
    out = tiles.silu_and_mul(x)
    assert out.shape == (rows, 48)
    assert torch.equal(out, silu_and_mul(tiles(x), 48))


@needs_native
@pytest.mark.parametrize("n", [80, 72])  # halves of 40 (not whole tiles), or padded to 80
def test_tiles_swiglu_epilogue_declines_halves_that_are_not_whole_tiles(gen, n):
    qw, _ = quantize_int8(weight(gen, n, 256))
    assert Int8Tiles(qw).silu_and_mul(torch.randn(9, 256, generator=gen)) is None


def _sub_scaled(n: int, k: int, qtype: str = "Q6_K") -> SubScaledInt8Weight:
    return repack_gguf(
        SUB_SCALED_BLOCKS[qtype](n, k), qtype, (n, k), scheme="int8", int8_group_size=32
    )


@needs_native
@pytest.mark.parametrize("qtype", sorted(SUB_SCALED_BLOCKS))
@pytest.mark.parametrize("n", [48, 40])  # 40: a tile of padding channels
@pytest.mark.parametrize("rows", [1, 6, 70])  # 70: a second span of rows, a partial group
def test_sub_scaled_tiles_multiply_the_exact_k_quant_values(gen, qtype, n, rows):
    qw = _sub_scaled(n, 768, qtype)
    x = torch.randn(rows, 768, generator=gen)
    x[0, 32:64] = 0.0
    y = SubScaledTiles(qw)(x)
    assert y.shape == (rows, n)
    w = qw.exact()
    assert ((y - x @ w.T).abs() <= int8_blocks_bound(x, w)).all()


@needs_native
@pytest.mark.parametrize("case", ["int8", "int8-5bit", "int4", "int4-as-int8", "Q6_K", "Q5_K"])
def test_the_budget_is_charged_what_a_tiles_copy_holds(gen, case):
    # The dispatcher charges a copy's bytes before building it (prefill_copies = "300MB"
    # once held 270 MB: tiles were counted at 1.25 bytes a weight, int8 ones hold 1.125).
    # 40 channels: the last tile padded.
    if case in SUB_SCALED_BLOCKS:
        name, qw = "sub_scaled_tiles", _sub_scaled(40, 768, case)
    else:
        w = weight(gen, 40, 768)
        qw = quantize_int4(w, 64)[0] if case.startswith("int4") else quantize_int8(w, 32)[0]
        qw = five_bit(qw) if case == "int8-5bit" else qw
        name = "int4_as_int8_tiles" if case == "int4-as-int8" else "int8_tiles"
    spec = CPU_KERNELS[name]
    assert dispatch._dense_bytes(spec, qw) == spec.build(qw).nbytes


@needs_native
def test_sub_scaled_tiles_are_a_candidate_for_sub_scaled_weights_alone(gen):
    spec = CPU_KERNELS["sub_scaled_tiles"]
    assert spec.unavailable(_sub_scaled(16, 256)) is None
    assert spec.unavailable(quantize_int8(weight(gen, 16, 256), 32)[0]) == "not sub-scaled"


@needs_native
def test_native_builds_in_a_temporary_folder_where_the_build_dir_cannot_be_made(
    tmp_path, monkeypatch, caplog
):
    # A read-only cache folder left the daemon without its kernels (decode module by module),
    # said only at INFO.
    _with_real_compiler(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert isinstance(native._load(blocker / "kernels"), ctypes.CDLL)
    assert f"cannot write to {blocker / 'kernels'}" in caplog.text
    assert sorted(tmp_path.iterdir()) == [blocker]


# The 256-bit tile kernels that CPUs without AVX-512 run, built here for subsets of this CPU:
# AVX2 alone (maddubs: int8 as two nibbles, 5-bit int8 and int4 once) and AVX2 with 256-bit VNNI.
AVX2_BUILDS = {
    "avx2": (("-march=haswell",), ("avx2", "fma", "f16c")),
    "avx2-vnni": (
        ("-march=haswell", "-mavx512f", "-mavx512vl", "-mavx512vnni"),
        ("avx2", "avx512vl", "avx512_vnni"),
    ),
}
_AVX2_LIBS: dict[str, ctypes.CDLL | str] = {}


@pytest.fixture(params=sorted(AVX2_BUILDS))
def avx2_build(request, tmp_path_factory, monkeypatch):
    """Kernels built against a 256-bit variant of the native library (a factory: qw, kernel
    class (Int8Tiles unless given) -> kernel)."""
    flags, needs = AVX2_BUILDS[request.param]
    if missing := set(needs) - read_cpu_info().flags:
        pytest.skip(f"this CPU lacks {sorted(missing)}")
    _with_real_compiler(monkeypatch)
    if request.param not in _AVX2_LIBS:
        build_dir = tmp_path_factory.mktemp(request.param)
        _AVX2_LIBS[request.param] = native._load(build_dir, flags)
    lib = _AVX2_LIBS[request.param]
    if isinstance(lib, str):
        pytest.skip(lib)

    def build(qw, kernel=Int8Tiles):
        with monkeypatch.context() as patch:
            patch.setattr(native, "_loaded", lib)
            return kernel(qw)

    return build


@pytest.mark.parametrize("case", ["int8", "int8-g32", "int8-5bit", "int4"])
@pytest.mark.parametrize("rows", [1, 6, 70])  # 70: a second span of rows, a partial group
def test_avx2_tiles_match_reference_and_the_avx512_tiles(avx2_build, gen, case, rows):
    # Exact int32 dot products a block, summed into float in the same order as the AVX-512
    # kernel's: where this machine has that build too, equal but for int4's float sums of x,
    # which an AVX2-only build adds in another order.
    w = weight(gen, 136, 896) + (0.03 if case == "int4" else 0.0)
    qw = (
        quantize_int4(w, 64)[0]
        if case == "int4"
        else quantize_int8(w, None if case == "int8" else 32)[0]
    )
    qw = five_bit(qw) if case == "int8-5bit" else qw
    x = torch.randn(rows, 896, generator=gen)
    x[0, 32:64] = 0.0
    y = avx2_build(qw)(x)
    assert y.shape == (rows, 136)
    bound = int4_blocks_bound(x, qw) if case == "int4" else int8_blocks_bound(x, dequantize(qw))
    assert ((y - matmul(x, qw)).abs() <= bound).all()
    if not isinstance(_LIB, str):  # this machine's own build
        torch.testing.assert_close(y, Int8Tiles(qw)(x), rtol=1e-5, atol=1e-5)


def test_avx2_builds_look_up_5_bit_rows(avx2_build, gen):
    # Their fifth bits in another order than AVX-512's (test_int5_native_packs_q_...).
    qw = fp16_scaled(five_bit(quantize_int8(weight(gen, 40, 256), group_size=32)[0]))
    ids = torch.tensor([0, 39, 17, 17])
    assert torch.equal(avx2_build(qw, kernel=Int5Native).rows(ids), dequantize(qw)[ids])


@pytest.mark.parametrize("qtype", ["Q5_0", "Q8_0"])
def test_avx2_builds_unpack_gguf_blocks_to_gguf_values(avx2_build, qtype):
    # codelm_unpack_gguf_int8 spreads Q5_0's fifth bits with a byte shuffle there (a mask
    # register with AVX-512 BW / VL).
    w = np.random.default_rng(0).standard_normal((10, 256)).astype(np.float32)
    w[3, 40] = 2.5  # an outlier block
    blocks = gguf_quants.quantize(w, GGMLQuantizationType[qtype])
    qw = avx2_build(blocks, kernel=lambda b: repack_gguf(b, qtype, (10, 256)))
    expected = gguf_quants.dequantize(blocks, GGMLQuantizationType[qtype])
    assert np.array_equal(dequantize(qw).numpy(), expected)


@pytest.mark.parametrize(
    "values, offset", [([-128, 127, -128, -127], 128), ([127], 128), ([-16, 15], 16), ([15], 16)]
)
def test_avx2_tiles_take_int8_at_both_ends_without_overflow(avx2_build, values, offset):
    # Weights at the ends of their range against x at +-127 after quantisation: maddubs's
    # 16-bit pair sums hold a block of int8's nibbles (w + 128 <= 255: 8 x 2 x 15 x 127) and 4
    # steps of 5-bit weights (w + 16 <= 31: 4 x 2 x 31 x 127) without saturating.
    data = torch.tensor(values, dtype=torch.int8).repeat(32, 256 // len(values))
    qw = Int8Weight(data=data, scales=torch.full((32, 1), 0.01), group_size=256)
    tiles = avx2_build(qw)
    assert tiles.offset == offset
    for x in (torch.ones(3, 256), torch.tensor([1.0, -1.0]).repeat(3, 128)):
        torch.testing.assert_close(tiles(x), matmul(x, qw), rtol=1e-3, atol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_avx2_tiles_swiglu_epilogue_equals_swiglu_of_output(avx2_build, gen, scheme):
    w = weight(gen, 96, 256)
    qw, _ = quantize_int8(w) if scheme == "int8" else quantize_int4(w, 32)
    tiles = avx2_build(qw)
    x = torch.randn(9, 256, generator=gen) * 3
    assert torch.equal(tiles.silu_and_mul(x), silu_and_mul(tiles(x), 48))


def test_avx2_tiles_of_a_fused_layer_match_this_cpus_build(avx2_build, gen):
    # Nibbles for v's tiles, one vpmaddubsw for q's and k's, in one layer.
    qw = _mixed(gen)
    x = torch.randn(70, 896, generator=gen)
    y = avx2_build(qw)(x)
    assert ((y - matmul(x, qw)).abs() <= int8_blocks_bound(x, dequantize(qw))).all()
    if not isinstance(_LIB, str):
        assert torch.equal(y, Int8Tiles(qw)(x))


@pytest.mark.parametrize("qtype", sorted(SUB_SCALED_BLOCKS))
def test_avx2_sub_scaled_tiles_match_this_cpus_build(avx2_build, gen, qtype):
    # 256-bit code in every build: the native build's numbers, but for Q5_K's zeros times
    # float sums of x, which an AVX2-only build adds in another order.
    qw = _sub_scaled(40, 512, qtype)
    x = torch.randn(70, 512, generator=gen)
    y = avx2_build(qw, SubScaledTiles)(x)
    w = qw.exact()
    assert ((y - x @ w.T).abs() <= int8_blocks_bound(x, w)).all()
    if isinstance(_LIB, str):
        return
    if qw.zeros is None:
        assert torch.equal(y, SubScaledTiles(qw)(x))
    else:
        torch.testing.assert_close(y, SubScaledTiles(qw)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q, scale", [(-32, -128), (-32, 127), (31, -128), (31, 127)])
def test_avx2_sub_scaled_tiles_take_both_ends_without_overflow(avx2_build, q, scale):
    # x at +-127 after quantisation is 255 or 1 as the unsigned side: two steps of pair sums
    # (2 x 2 x 255 x 32) stay within int16 before vpmaddwd widens them times the scale.
    n, k = 16, 256
    qw = SubScaledInt8Weight(
        data=torch.zeros(n, k, dtype=torch.int8),
        scales=torch.ones(n, k // 32),
        group_size=32,
        sub_data=torch.full((n, k), q, dtype=torch.int8),
        sub_scales=torch.full((n, k // 16), scale, dtype=torch.int8),
        super_scales=torch.full((n, 1), 1e-3),
    )
    tiles = avx2_build(qw, SubScaledTiles)
    w = qw.exact()
    for x in (torch.ones(3, k), -torch.ones(3, k), torch.tensor([1.0, -1.0]).repeat(3, k // 2)):
        torch.testing.assert_close(tiles(x), x @ w.T, rtol=1e-5, atol=1e-5)


def _fp16_scales(qw):
    """qw with scales (and zeros) rounded to fp16, as the native kernels hold them, so a copy
    in tiles (float32 scales) holds the same numbers."""
    exact = {"scales": qw.scales.half().float()}
    if qw.scheme == "int4":
        exact["zeros"] = qw.zeros.half().float()
    return dataclasses.replace(qw, **exact)


@needs_native
@pytest.mark.parametrize("case", ["int8", "int8-g64", "int8-5bit", "int5", "int4"])
@pytest.mark.parametrize(("rows", "threads"), [(4, 2), (70, 2), (203, 1), (203, 3)])
def test_native_kernels_run_many_rows_as_the_tiles_would(gen, case, rows, threads):
    # From a few rows of x the native kernels lay their weight out as tiles a part at a time
    # and run the tile kernel: the numbers of a tiles copy of the same weight, to the bit,
    # whatever the threads (each takes whole tiles; y starts as torch.empty, so a tile missed
    # is garbage). 144 channels: 9 tiles, the last pair of one; as a gate / up projection 160.
    w = weight(gen, 160, 896) + (0.03 if case == "int4" else 0.0)
    if case == "int4":
        qw = quantize_int4(w, 32)[0]
    else:
        qw = quantize_int8(w, 64 if case == "int8-g64" else None)[0]
        qw = five_bit(qw) if case in ("int8-5bit", "int5") else qw
    gate_up = _fp16_scales(qw)
    qw = select_rows(gate_up, torch.arange(144))
    native_kernel = {"int4": Int4Native, "int5": Int5Native}.get(case, Int8Native)
    x = torch.randn(rows, 896, generator=gen)
    x[0, 32:64] = 0.0
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y, swiglu = native_kernel(qw)(x), native_kernel(gate_up).silu_and_mul(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, Int8Tiles(qw)(x))
    # A fused gate / up projection (gate rows first): the tiles' SwiGLU epilogue too.
    assert torch.equal(swiglu, Int8Tiles(gate_up).silu_and_mul(x))


def test_avx2_native_kernels_run_many_rows_as_the_avx2_tiles_would(avx2_build, gen):
    for qw in (
        quantize_int8(weight(gen, 96, 512), 32)[0],
        five_bit(quantize_int8(weight(gen, 96, 512), 32)[0]),
        quantize_int4(weight(gen, 96, 512) + 0.03, 32)[0],
    ):
        qw = _fp16_scales(qw)
        rows_kernel = avx2_build(qw, Int4Native if qw.scheme == "int4" else Int8Native)
        tiles, x = avx2_build(qw), torch.randn(40, 512, generator=gen)
        assert torch.equal(rows_kernel(x), tiles(x))
        assert torch.equal(rows_kernel.silu_and_mul(x), tiles.silu_and_mul(x))
        if CPU_KERNELS["int5_native"].unavailable(qw) is None:  # the 5-bit one, as Int5Native
            five = avx2_build(qw, Int5Native)
            assert torch.equal(five(x), tiles(x))
            assert torch.equal(five.silu_and_mul(x), tiles.silu_and_mul(x))
            one = x[:1]
            torch.testing.assert_close(five(one), rows_kernel(one), rtol=1e-5, atol=1e-4)
