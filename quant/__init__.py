"""codelm.quant: weight-only int8 / int4 formats, their oracle, GGUF repacking and fast kernels.

Never imports codelm.daemon: the engine depends on this package, not the reverse.
"""

from __future__ import annotations

from codelm.quant.dispatch import (
    CpuInfo,
    DispatchConfig,
    Dispatcher,
    KernelPlan,
    physical_cores,
    read_cpu_info,
)
from codelm.quant.formats import (
    INT4_GROUP,
    INT4_GROUP_SIZES,
    LAYOUT_INT4_NK_HI_FIRST,
    LAYOUT_INT8_NK,
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    SubScaledInt8Weight,
    concat_formats,
    from_tensors,
    is_grouped_int8,
    pack_int4,
    select_rows,
    to_tensors,
    unpack_int4,
)
from codelm.quant.gguf_repack import dequantize_gguf, repack_gguf, repack_reader_tensor
from codelm.quant.linear import (
    QuantizedEmbedding,
    QuantizedLinear,
    kernel_summary,
    quantize_model,
)
from codelm.quant.reference import (
    dequantize,
    matmul,
    quantize_int4,
    quantize_int8,
    quantize_rows,
    requantize_int8_per_channel,
)

__all__ = [
    "INT4_GROUP",
    "INT4_GROUP_SIZES",
    "LAYOUT_INT4_NK_HI_FIRST",
    "LAYOUT_INT8_NK",
    "CpuInfo",
    "DispatchConfig",
    "Dispatcher",
    "Int4Weight",
    "Int8Weight",
    "SubScaledInt8Weight",
    "KernelPlan",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "kernel_summary",
    "QuantizedWeight",
    "concat_formats",
    "dequantize",
    "dequantize_gguf",
    "from_tensors",
    "is_grouped_int8",
    "matmul",
    "pack_int4",
    "physical_cores",
    "quantize_int4",
    "quantize_int8",
    "quantize_rows",
    "quantize_model",
    "read_cpu_info",
    "repack_gguf",
    "repack_reader_tensor",
    "requantize_int8_per_channel",
    "select_rows",
    "to_tensors",
    "unpack_int4",
]
