"""The model engine: load a model (GGUF or HF folder) and complete code with it, or ask an
inference server (remote.py) where the model is its URL.

`load_engine(EngineConfig) -> Engine`. Everything torch lives below this package and quant/.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANT_MODES = ("auto", "int4", "int8", "bf16", "fp32")
PREFILL_COPIES = "auto, none or a size in MB such as 300MB"


def copies_budget(prefill_copies: str) -> int | None:
    """The bytes `prefill_copies` lets copies beside the quantised weights hold: None for
    "auto" (the loader's share of free memory), 0 for "none", else the size given in MB
    ("300" or "300MB"). ValueError, naming the choices, for anything else."""
    value = prefill_copies.strip().lower()
    if value in ("auto", "none"):
        return None if value == "auto" else 0
    number = value.removesuffix("mb").strip()
    if not number.isdigit():
        raise ValueError(f"must be {PREFILL_COPIES}, got {prefill_copies!r}")
    return int(number) * 1_000_000


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineConfig:
    # "default", a catalogue name, a .gguf path, an HF folder, or an inference server's URL
    model: str = "default"
    device: str = "auto"  # auto | cpu | cuda
    quant: str = "auto"  # one of QUANT_MODES
    threads: int = 0  # 0: per request, the physical cores other processes leave free
    fim: str = "auto"  # auto | none | a FIM format name (prompt.FIM_FORMATS)
    prefill_chunk: int = 512  # tokens per forward of a prompt (a cancel stops between blocks)
    # Copies of the quantised weights that prompts run faster on (int8 tiles, dense), and the
    # head's shortlist: "auto" within an eighth of available memory (at most 1.5 GiB), "none" for
    # the smallest footprint, or at most a size in MB ("300MB"; the blocks' layers first).
    prefill_copies: str = "auto"  # PREFILL_COPIES, read by copies_budget
    prefix_chars: int = 8000  # the prefix window: about 2.3k tokens of code before the cursor
    suffix_chars: int = 1000  # text after the cursor in invoked mode (a third of it when automatic)
    # Of the other files' snippets a request brings (`context`), the characters the prompt
    # reads before the document (FIM formats that name files only); 0: none.
    context_chars: int = 3000
    cache_budget_bytes: int = 0  # per-file KV cache budget; 0: from available memory
    # After an edit, reuse a run of at least this many cached tokens that follows it, moved to
    # its new positions (like llama.cpp's --cache-reuse; approximate: that run's K/V saw the
    # old text before it; no loss measured, docs/engine.md). 0: off, every token after an
    # edit is recomputed exactly.
    cache_reuse_min_tokens: int = 256
    # On CUDA, replay a decode step as one captured graph (fused_decode.GraphedDecode); False
    # launches the step's kernels one by one from Python.
    cuda_graphs: bool = True
    # With `model` an inference server's URL: the model to ask it for ("": the first it lists)
    # and the bearer token it wants ("": none).
    server_model: str = ""
    server_api_key: str = ""


def is_server_url(model: str) -> bool:
    """Whether `model` names an inference server (http:// or https://) rather than a file."""
    return model[:8].lower().startswith(("http://", "https://"))


def load_engine(config: EngineConfig, progress=None):  # -> Engine
    """Load the model named by `config`; `progress(fraction, message)` is called while loading.

    Raises ModelLoadError with a message that says how to fix it.
    """
    if is_server_url(config.model):
        from .remote import RemoteEngine

        return RemoteEngine.load(config, progress=progress)
    from .engine import Engine

    return Engine.load(config, progress=progress)
