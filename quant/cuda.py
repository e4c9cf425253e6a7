"""CUDA kernels: torch int4 tinygemm (sm80+), torch int8 weight-only, a Triton int8 kernel,
bitsandbytes int8 / nf4.

bitsandbytes is optional and imported only when one of its kernels is built. Nothing here
runs at import time, so CPU-only installs import this module freely.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from codelm.quant.cpu import Dense, KernelSpec
from codelm.quant.formats import Int4Weight, Int8Weight, QuantizedWeight, unpack_int4
from codelm.quant.reference import dequantize

_BNB_HINT = "pip install bitsandbytes  (or: pip install 'codelm[cuda]')"


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, or an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(f"the bitsandbytes CUDA kernels need bitsandbytes: {_BNB_HINT}") from exc
    return bitsandbytes


class TinyGemmInt4:
    """torch._weight_int4pack_mm (tinygemm): bf16 activations, scales_and_zeros [K/g, N, 2]."""

    name = "int4_tinygemm"

    def __init__(self, qw: Int4Weight) -> None:
        self.group_size = qw.group_size
        # Our int4 layout (k even in the high nibble) is exactly this op's uint8 [N, K/2] input.
        self.packed = torch._convert_weight_to_int4pack(
            qw.data.contiguous(), _inner_k_tiles(qw.shape[1])
        )
        sz = torch.stack([qw.scales.t(), qw.zeros.t()], dim=-1)
        self.scales_and_zeros = sz.to(torch.bfloat16).contiguous()
        self.nbytes = _nbytes(self.packed, self.scales_and_zeros)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous()
        return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)


class Int8PackCuda:
    """torch._weight_int8pack_mm on CUDA (per-channel int8, bf16 activations)."""

    name = "int8pack_cuda"

    def __init__(self, qw: Int8Weight) -> None:
        self.data = qw.data.contiguous()
        self.scales = qw.scales[:, 0].to(torch.bfloat16).contiguous()
        self.nbytes = _nbytes(self.data, self.scales)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.data, self.scales)


class TritonInt8:
    """int8 with per-channel or grouped scales, read once per call (triton_kernels.int8_rows)."""

    name = "int8_triton"

    def __init__(self, qw: Int8Weight) -> None:
        from codelm.quant import triton_kernels

        self._rows = triton_kernels.int8_rows
        self.data = qw.data.contiguous()
        self.scales = qw.scales.float().contiguous()
        self.group_size = qw.group_size
        self.nbytes = _nbytes(self.data, self.scales)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(x.contiguous(), self.data, self.scales, self.group_size)


class DequantBf16Cuda:
    """Dequantise to bf16 on every call, then cuBLAS: exact format numerics, no extra memory."""

    name = "dequant_bf16"

    def __init__(self, qw: QuantizedWeight) -> None:
        self.qw = qw
        self.nbytes = qw.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        qw = self.qw
        if isinstance(qw, Int8Weight) and qw.is_per_channel:
            # x @ (q * s).T == (x @ q.T) * s, and int8 -> bf16 is exact.
            return F.linear(x, qw.data.to(torch.bfloat16)) * qw.scales[:, 0].to(torch.bfloat16)
        if isinstance(qw, Int8Weight):  # GGUF Q8_0 / Q5_0's groups of 32
            n, k = qw.shape
            q = qw.data.view(n, -1, qw.group_size).to(torch.bfloat16)
            return F.linear(x, (q * qw.scales[..., None].to(torch.bfloat16)).view(n, k))
        n, k = qw.shape
        q = unpack_int4(qw.data).view(n, -1, qw.group_size).to(torch.bfloat16)
        w = (q - 8) * qw.scales[..., None].to(torch.bfloat16) + qw.zeros[..., None].to(
            torch.bfloat16
        )
        return F.linear(x, w.view(n, k))


class BnbInt8:
    """bitsandbytes LLM.int8 without outlier split (threshold 0): row-wise absmax like ours."""

    name = "bnb_int8"

    def __init__(self, qw: Int8Weight) -> None:
        bnb = import_bitsandbytes()
        n, k = qw.shape
        device = qw.data.device
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
        weight = dequantize(qw).to(torch.float16).cpu()
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        self.layer = layer.to(device)  # bitsandbytes quantises on the move to the GPU
        self.nbytes = n * k + 4 * n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(torch.float16))


class BnbNf4:
    """bitsandbytes nf4 (requantised from our int4 values): int4 for GPUs older than sm80."""

    name = "bnb_nf4"

    def __init__(self, qw: Int4Weight) -> None:
        bnb = import_bitsandbytes()
        n, k = qw.shape
        device = qw.data.device
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        weight = dequantize(qw).to(torch.bfloat16).cpu()
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        self.layer = layer.to(device)
        self.nbytes = n * k // 2 + 4 * n * k // 64

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(torch.bfloat16))


def _tinygemm_unavailable(qw: QuantizedWeight) -> str | None:
    if not _has_cuda_kernel("aten::_weight_int4pack_mm"):
        return "this torch build has no CUDA _weight_int4pack_mm"
    major, minor = torch.cuda.get_device_capability(qw.data.device)
    if major < 8:
        return f"tinygemm needs compute capability 8.0+, this GPU is {major}.{minor}"
    n, k = qw.shape
    if n % 8 or k % 32:
        return f"tinygemm needs N % 8 == 0 and K % 32 == 0, shape is {qw.shape}"
    return None


def _int8pack_unavailable(qw: QuantizedWeight) -> str | None:
    if not _has_cuda_kernel("aten::_weight_int8pack_mm"):
        return "this torch build has no CUDA _weight_int8pack_mm"
    return None


def _triton_unavailable(qw: QuantizedWeight) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (it comes with PyTorch's CUDA wheels on Linux)"
    return None


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def _inner_k_tiles(k: int) -> int:
    # The packer wants K % (inner_k_tiles * 16) == 0; more tiles = wider loads (gpt-fast uses 8).
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


CUDA_KERNELS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec("int4_tinygemm", ("int4",), TinyGemmInt4, unavailable=_tinygemm_unavailable),
        KernelSpec(
            "int8pack_cuda",
            ("int8",),
            Int8PackCuda,
            unavailable=_int8pack_unavailable,
            per_channel_int8=True,
        ),
        KernelSpec("int8_triton", ("int8",), TritonInt8, unavailable=_triton_unavailable),
        KernelSpec("dequant_bf16", ("int4", "int8"), DequantBf16Cuda),
        KernelSpec("dense_bf16", ("int4", "int8"), lambda qw: Dense(qw, torch.bfloat16), 2),
        KernelSpec("bnb_int8", ("int8",), BnbInt8, opt_in="use_bitsandbytes"),
        KernelSpec("bnb_nf4", ("int4",), BnbNf4, opt_in="use_bitsandbytes"),
    )
}

# Used when calibration is off: tinygemm / int8pack for decode, cuBLAS for prefill (dense
# copies serve prefill only, as on CPU: decode is memory-bound).
HEURISTIC_ORDER = {
    "decode": (
        "int4_tinygemm",
        "int8_triton",
        "int8pack_cuda",
        "bnb_nf4",
        "bnb_int8",
        "dequant_bf16",
    ),
    "prefill": (
        "dense_bf16",
        "int4_tinygemm",
        "dequant_bf16",
        "int8_triton",
        "int8pack_cuda",
        "bnb_nf4",
        "bnb_int8",
    ),
}
