"""Architecture registry: GGUF/HF architecture name -> the module that implements it."""

from __future__ import annotations

from types import ModuleType

from ...errors import ModelLoadError
from . import llama

# qwen2 is the llama block with q/k/v biases (ModelArgs.qkv_bias) and un-permuted GGUF q/k.
ARCHITECTURES: dict[str, ModuleType] = {"llama": llama, "mistral": llama, "qwen2": llama}
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


def architecture(name: str) -> ModuleType:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ModelLoadError(
            f"architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
