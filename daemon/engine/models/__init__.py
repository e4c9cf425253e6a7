"""Architecture registry: GGUF/HF architecture name -> the module that implements it."""

from __future__ import annotations

from types import ModuleType

from ...errors import ModelLoadError
from . import codeshell, llama, starcoder2

# GGUF `general.architecture` / HF `model_type` -> implementation. qwen2 is the llama block with
# q/k/v biases (ModelArgs.qkv_bias) and un-permuted GGUF q/k. The released CodeShell-7B
# config.json says model_type "kclgpt".
ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
    "starcoder2": starcoder2,
    "codeshell": codeshell,
    "kclgpt": codeshell,
}
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Starcoder2ForCausalLM": "starcoder2",
    "CodeShellForCausalLM": "codeshell",
}


def architecture(name: str) -> ModuleType:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ModelLoadError(
            f"architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
