"""Each architecture from a tiny random HF folder, loaded by our loader, against an oracle.

Oracles: transformers (Starcoder2, Qwen2, Llama with aiXcoder's config) and, for CodeShell
(no transformers class), a plain-torch forward written here from the published layout.
One runner checks all: logits at every position, one-token-at-a-time decode == full forward,
and 16 greedy tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_helpers import new_kv, randomise_norms, write_word_tokenizer
from safetensors.torch import save_file

from codelm.daemon.engine import EngineConfig, fused_decode
from codelm.daemon.engine.generate import StopRules, generate
from codelm.daemon.engine.loader import LoadedModel, load_model

transformers = pytest.importorskip("transformers")

VOCAB = 320
LOGIT_ATOL = 1e-3  # fp32 throughout; differences come only from summation order
N_GREEDY = 16


def _load_ours(folder: Path) -> LoadedModel:
    write_word_tokenizer(folder, VOCAB)
    return load_model(EngineConfig(model=str(folder), quant="fp32"), torch.device("cpu"))


def _check_against_oracle(
    loaded: LoadedModel,
    oracle_logits: Callable[[torch.Tensor], torch.Tensor],
    oracle_greedy: Callable[[list[int]], list[int]],
    n_tokens: int = 40,
) -> None:
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (n_tokens,))
    model = loaded.model
    with torch.inference_mode():
        expected = oracle_logits(tokens)
        full = model(tokens, new_kv(loaded.args), n_logits=None)
        kv = new_kv(loaded.args)
        steps = torch.cat([model(tokens[i : i + 1], kv) for i in range(n_tokens)])
        # The last block runs only the rows whose logits are asked for; the cache it leaves
        # must serve the next token as the full forward's does.
        kv = new_kv(loaded.args)
        tail = model(tokens[:-1], kv, n_logits=5)
        after = model(tokens[-1:], kv)
        # Keys and values stored as float16 (the engine's choice for quantised weights on the
        # CPU), read back through each architecture's attention: only their rounding differs.
        half = model(tokens, new_kv(loaded.args, torch.float16), n_logits=None)
        graph_body = _graph_step_eagerly(model, tokens)
    assert full.shape == (n_tokens, VOCAB) and full.dtype == torch.float32
    torch.testing.assert_close(full, expected, atol=LOGIT_ATOL, rtol=1e-4)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([tail, after]), full[-6:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(half, full, atol=1e-2, rtol=1e-3)  # measured: <= 4.7e-3
    torch.testing.assert_close(graph_body, full, atol=1e-4, rtol=1e-4)
    prompt = tokens[:24].tolist()
    ours = generate(model, loaded.tokenizer, new_kv(loaded.args), prompt, StopRules(max_tokens=16))
    assert ours.token_ids == oracle_greedy(prompt)


def _graph_step_eagerly(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of `tokens` run in one-token steps through what a CUDA graph captures
    (fused_decode.decode_blocks: the position as a tensor, attention over the cache's whole
    capacity under a mask), run eagerly on the CPU, into a cache whose rows past each
    position hold the other steps' leftovers (finite: KVCache zeroes what it allocates)."""

    class GraphBody:
        def accepts(self, kv):
            return True

        def __call__(self, x, kv, start, cos, sin):
            position = torch.tensor([start])
            return fused_decode.decode_blocks(list(model.parts()[1]), kv, x, cos, sin, position)

    kv = new_kv(model.args)
    model(tokens.flip(0), kv)  # leftovers past every position the steps below attend from
    kv.trim_to(0)
    model.decode_step = GraphBody()
    try:
        return torch.cat([model(tokens[i : i + 1], kv) for i in range(len(tokens))])
    finally:
        model.decode_step = None


def _transformers_oracle(ref) -> tuple[Callable, Callable]:
    def logits(tokens: torch.Tensor) -> torch.Tensor:
        return ref(tokens[None]).logits[0]

    def greedy(prompt: list[int]) -> list[int]:
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=N_GREEDY,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[0, len(prompt) :].tolist()

    return logits, greedy


@pytest.mark.parametrize(
    ("window", "tie"), [(8, True), (None, False)], ids=["window8-tied", "full-untied"]
)
def test_tiny_starcoder2_matches_transformers(tmp_path, window, tie):
    config = transformers.Starcoder2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=100000.0,
        sliding_window=window,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    ref = transformers.Starcoder2ForCausalLM(config).eval()
    randomise_norms(ref)
    ref.save_pretrained(tmp_path)
    loaded = _load_ours(tmp_path)
    assert loaded.args.arch == "starcoder2" and loaded.args.sliding_window == window
    _check_against_oracle(loaded, *_transformers_oracle(ref))


def test_tiny_qwen2_matches_transformers(tmp_path):
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(config).eval()
    randomise_norms(ref)
    ref.save_pretrained(tmp_path)
    loaded = _load_ours(tmp_path)
    assert loaded.args.arch == "qwen2" and loaded.args.qkv_bias
    _check_against_oracle(loaded, *_transformers_oracle(ref))


def _aixcoder_config(**sizes) -> dict:
    """aiXcoder-7B's released config.json (aiXcoder/aixcoder-7b-base), field for field."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14464,
        "max_position_embeddings": 32768,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 256000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.34.1",
        "use_cache": True,
        "vocab_size": 49152,
        **sizes,
    }


def test_tiny_aixcoder_config_loads_and_matches_transformers_llama(tmp_path):
    published = _aixcoder_config(
        hidden_size=64,
        intermediate_size=112,
        max_position_embeddings=256,
        num_attention_heads=8,
        num_hidden_layers=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**published)).float().eval()
    randomise_norms(ref)
    ref.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(published))  # as released, not as saved
    loaded = _load_ours(tmp_path)
    args = loaded.args
    assert (args.n_kv_heads, args.rope_base, args.norm_eps) == (2, 256000.0, 1e-6)
    assert not args.tie_embeddings
    _check_against_oracle(loaded, *_transformers_oracle(ref))


# --- CodeShell: the released layout, and a plain-torch reference forward -----------------

CODESHELL_SIZES = {"n_embd": 64, "n_head": 8, "num_query_groups": 2, "n_inner": 96, "n_layer": 2}


def _codeshell_config(tie: bool | None) -> dict:
    """CodeShell-7B's config.json (WisdomShell/codeshell model/config.json), tiny sizes."""
    config = {
        "activation_function": "gelu_pytorch_tanh",
        "architectures": ["CodeShellForCausalLM"],
        "attention_softmax_in_fp32": True,
        "attn_pdrop": 0.1,
        "group_query_attention": True,
        "position_embedding_type": "rope",
        "bos_token_id": 2,
        "eos_token_id": 2,
        "vocab_size": VOCAB,
        "embd_pdrop": 0.1,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "kclgpt",
        "n_positions": 256,
        "resid_pdrop": 0.1,
        "rope_scaling": None,
        "scale_attention_softmax_in_fp32": True,
        "scale_attn_weights": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **CODESHELL_SIZES,
    }
    if tie is not None:
        config["tie_word_embeddings"] = tie
    return config


def _codeshell_weights(config: dict, with_wte: bool, with_lm_head: bool) -> dict:
    torch.manual_seed(0)
    d, layers = config["n_embd"], config["n_layer"]
    kv_dim = config["num_query_groups"] * d // config["n_head"]
    inner = config["n_inner"]

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return scale * torch.randn(*shape)

    w = {}
    for i in range(layers):
        p = f"transformer.h.{i}"
        for norm in ("ln_1", "ln_2"):
            w[f"{p}.{norm}.weight"] = 1 + rand(d)
            w[f"{p}.{norm}.bias"] = rand(d)
        w[f"{p}.attn.c_attn.weight"] = rand(d + 2 * kv_dim, d)
        w[f"{p}.attn.c_attn.bias"] = rand(d + 2 * kv_dim)
        w[f"{p}.attn.c_proj.weight"] = rand(d, d)
        w[f"{p}.attn.c_proj.bias"] = rand(d)
        w[f"{p}.mlp.c_fc.weight"] = rand(inner, d)
        w[f"{p}.mlp.c_fc.bias"] = rand(inner)
        w[f"{p}.mlp.c_proj.weight"] = rand(d, inner)
        w[f"{p}.mlp.c_proj.bias"] = rand(d)
    w["transformer.ln_f.weight"] = 1 + rand(d)
    w["transformer.ln_f.bias"] = rand(d)
    if with_wte:
        w["transformer.wte.weight"] = rand(config["vocab_size"], d, scale=1.0)
    if with_lm_head:
        w["lm_head.weight"] = rand(config["vocab_size"], d, scale=1.0)
    return w


def _codeshell_reference(config: dict, w: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """CodeShell's forward, step by step: [T] ids -> [T, vocab] logits, no cache."""
    d, n_heads, n_groups = config["n_embd"], config["n_head"], config["num_query_groups"]
    hd, eps = d // n_heads, config["layer_norm_epsilon"]
    wte = w.get("transformer.wte.weight", w.get("lm_head.weight"))
    lm_head = w.get("lm_head.weight", wte) if config.get("tie_word_embeddings") is False else wte

    def norm(x, name):
        return F.layer_norm(x, (d,), w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def rope(x, n):  # x: [H, T, hd]; rotate-half layout, base 10000
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
        angles = torch.outer(torch.arange(n).float(), inv_freq)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        rotated = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos + rotated * sin

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        x = wte[tokens]  # [T, D]
        causal = torch.ones(n, n).tril().bool()
        for i in range(config["n_layer"]):
            p = f"transformer.h.{i}"
            qkv = linear(norm(x, f"{p}.ln_1"), f"{p}.attn.c_attn")
            q, k, v = qkv.split([d, n_groups * hd, n_groups * hd], -1)
            q = rope(q.view(n, n_heads, hd).transpose(0, 1), n)
            k = rope(k.view(n, n_groups, hd).transpose(0, 1), n)
            v = v.view(n, n_groups, hd).transpose(0, 1)
            k = k.repeat_interleave(n_heads // n_groups, 0)
            v = v.repeat_interleave(n_heads // n_groups, 0)
            scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
            attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # [H, T, hd]
            x = x + linear(attn.transpose(0, 1).reshape(n, d), f"{p}.attn.c_proj")
            h = F.gelu(linear(norm(x, f"{p}.ln_2"), f"{p}.mlp.c_fc"), approximate="tanh")
            x = x + linear(h, f"{p}.mlp.c_proj")
        return norm(x, "transformer.ln_f") @ lm_head.T

    return forward


def _reference_greedy(forward: Callable) -> Callable[[list[int]], list[int]]:
    def greedy(prompt: list[int]) -> list[int]:
        ids = list(prompt)
        for _ in range(N_GREEDY):
            ids.append(int(forward(torch.tensor(ids))[-1].argmax()))
        return ids[len(prompt) :]

    return greedy


@pytest.mark.parametrize(
    ("tie", "with_wte", "with_lm_head"),
    [(None, False, True), (None, True, False), (False, True, True)],
    ids=["released-lm-head-only", "wte-only", "untied"],
)
def test_tiny_codeshell_matches_plain_torch_reference(tmp_path, tie, with_wte, with_lm_head):
    config = _codeshell_config(tie)
    weights = _codeshell_weights(config, with_wte, with_lm_head)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(weights, tmp_path / "model.safetensors")
    loaded = _load_ours(tmp_path)
    args = loaded.args
    assert args.arch == "codeshell"
    assert (args.n_heads, args.n_kv_heads, args.ffn_dim, args.max_len) == (8, 2, 96, 256)
    forward = _codeshell_reference(config, weights)
    _check_against_oracle(loaded, forward, _reference_greedy(forward))


def test_codeshell_7b_config_gives_the_published_shape():
    from codelm.daemon.engine.models import architecture

    config = {**_codeshell_config(None), "vocab_size": 70144, "n_positions": 8192}
    config.update(n_embd=4096, n_head=32, num_query_groups=8, n_inner=16384, n_layer=42)
    args = architecture(config["model_type"]).ModelArgs.from_hf_config(config)
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads) == (42, 4096, 32, 8)
    assert (args.vocab_size, args.max_len, args.head_dim) == (70144, 8192, 128)


# --- GGUF: tensors named by gguf's own HF -> GGUF map (what llama.cpp's converter uses) -------


def _write_gguf(
    path: Path, arch: str, hparams: dict, state: dict[str, torch.Tensor], raw: dict | None = None
) -> None:
    """`raw`: HF names whose tensors are written as given ggml blocks instead, name ->
    (uint8 blocks [rows, bytes], ggml type)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(hparams["context"])
    writer.add_embedding_length(hparams["dim"])
    writer.add_feed_forward_length(hparams["ffn"])
    writer.add_block_count(hparams["layers"])
    writer.add_head_count(hparams["heads"])
    writer.add_head_count_kv(hparams["kv_heads"])
    writer.add_layer_norm_eps(1e-5)
    writer.add_rope_freq_base(hparams["rope_base"])
    writer.add_tokenizer_model("gpt2")
    alphabet = sorted(_byte_alphabet()) + ["ab"]  # byte-level BPE: bytes and one merge
    tokens = alphabet + [f"<extra_{i}>" for i in range(VOCAB - len(alphabet))]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hparams["layers"])
    for name, tensor in state.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if raw and name in raw:
            blocks, kind = raw[name]
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, tensor.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def _load_gguf(path: Path) -> LoadedModel:
    return load_model(EngineConfig(model=str(path), quant="fp32"), torch.device("cpu"))


def test_tiny_starcoder2_gguf_matches_transformers(tmp_path):
    config = transformers.Starcoder2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=100000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    ref = transformers.Starcoder2ForCausalLM(config).eval()
    randomise_norms(ref)
    hparams = {"context": 256, "dim": 64, "ffn": 128, "layers": 2, "heads": 8, "kv_heads": 2}
    path = tmp_path / "tiny-starcoder2.gguf"
    _write_gguf(path, "starcoder2", {**hparams, "rope_base": 100000.0}, ref.state_dict())
    loaded = _load_gguf(path)
    assert loaded.args.arch == "starcoder2" and not loaded.args.tie_embeddings
    _check_against_oracle(loaded, *_transformers_oracle(ref))


def _k_quant_blocks(kind, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Valid Q4_K / Q6_K blocks for an [n, k] weight (gguf.quants cannot make them): random
    bytes, with fp16 scales of a weight's size."""
    import gguf

    count = n * k // 256
    if kind == gguf.GGMLQuantizationType.Q4_K:  # d, dmin, 6-bit scales and mins, nibbles
        d = rng.uniform(5e-5, 1.5e-4, (count, 2)).astype("<f2").view(np.uint8)
        blocks = np.concatenate([d, rng.integers(0, 256, (count, 140), dtype=np.uint8)], axis=1)
    else:  # Q6_K: nibbles, high bit pairs, int8 scales, d
        body = rng.integers(0, 256, (count, 192), dtype=np.uint8)
        scales = rng.integers(-64, 64, (count, 16)).astype(np.int8).view(np.uint8)
        d = rng.uniform(1e-5, 3e-5, (count, 1)).astype("<f2").view(np.uint8)
        blocks = np.concatenate([body, scales, d], axis=1)
    return blocks.reshape(n, -1)


def test_tiny_llama_gguf_in_k_quants_keeps_their_values(tmp_path, monkeypatch):
    """A Q4_K_M-like file (q / k / o / gate / up Q4_K, v and down Q6_K; widths of whole
    256-value super-blocks) in `auto`: the fused q / k / v and the downs keep the file's own
    values beside their int8 blocks (SubScaledInt8Weight), the rest is int4, and the logits
    are those of the same file dequantised to fp32, within int8's rounding."""
    import gguf

    from codelm.quant import Dispatcher, SubScaledInt8Weight, native
    from codelm.quant.cpu import SubScaledTiles

    monkeypatch.setenv("CODELM_HOME", str(tmp_path / "home"))
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(config).state_dict()
    q4k, q6k = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K
    kinds = {"q_proj": q4k, "k_proj": q4k, "v_proj": q6k, "o_proj": q4k}
    kinds |= {"gate_proj": q4k, "up_proj": q4k, "down_proj": q6k}
    rng = np.random.default_rng(0)
    raw = {
        name: (_k_quant_blocks(kinds[part], *tensor.shape, rng), kinds[part])
        for name, tensor in state.items()
        if (part := name.split(".")[-2]) in kinds
    }
    hparams = {"context": 256, "dim": 256, "ffn": 512, "layers": 2, "heads": 4, "kv_heads": 2}
    path = tmp_path / "tiny-k-quants.gguf"
    _write_gguf(path, "llama", {**hparams, "rope_base": 10000.0}, state, raw)

    planned = {}
    plan = Dispatcher.plan

    def spy(self, qw, *, name="linear", prefill_rows=None):
        planned[name] = qw
        return plan(self, qw, name=name, prefill_rows=prefill_rows)

    monkeypatch.setattr(Dispatcher, "plan", spy)
    auto = load_model(EngineConfig(model=str(path), quant="auto"), torch.device("cpu"))
    qkv, down, o, gate_up = (
        planned[f"model.layers.1.{name}"]
        for name in ("self_attn.qkv_proj", "mlp.down_proj", "self_attn.o_proj", "mlp.gate_up_proj")
    )
    assert isinstance(qkv, SubScaledInt8Weight) and qkv.zeros is not None  # Q4_K with Q6_K
    assert isinstance(down, SubScaledInt8Weight) and down.zeros is None
    assert o.scheme == gate_up.scheme == "int4"
    exact = _load_gguf(path)
    ours, theirs = dict(auto.model.named_modules()), dict(exact.model.named_modules())
    generator = torch.Generator().manual_seed(1)
    for name in ("self_attn.qkv_proj", "mlp.down_proj", "self_attn.o_proj", "mlp.gate_up_proj"):
        layer, w = ours[f"model.layers.1.{name}"], theirs[f"model.layers.1.{name}"].weight
        x = torch.randn(20, w.shape[1], generator=generator)  # 20 rows: the prefill kernel
        # x is rounded per block of 32 (half a step of the block's largest) in the kernels,
        # the weights are the file's values.
        half_step = x.abs().view(20, -1, 32).amax(-1).repeat_interleave(32, dim=1) / 254
        bound = half_step @ w.abs().T + 1e-5 * (x.abs() @ w.abs().T) + 1e-6
        assert ((layer(x) - x @ w.T).abs() <= bound).all(), name
        qw = planned[f"model.layers.1.{name}"]
        if isinstance(qw, SubScaledInt8Weight):  # its own values, in the rows' order
            assert torch.equal(qw.exact(), w)
            if not isinstance(native.library(), str):
                assert ((SubScaledTiles(qw)(x) - x @ w.T).abs() <= bound).all(), name
    tokens = torch.randint(0, VOCAB, (40,), generator=generator)
    with torch.inference_mode():
        logits = auto.model(tokens, new_kv(auto.args), n_logits=None)
        expected = exact.model(tokens, new_kv(exact.args), n_logits=None)
    # Two random blocks amplify x's rounding; measured 0.975 of the positions' top-1 agree.
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_tiny_codeshell_gguf_without_token_embd_matches_reference(tmp_path):
    # llama.cpp's converter stores CodeShell's output.weight only (its embedding is tied to it).
    config = _codeshell_config(None)
    weights = _codeshell_weights(config, with_wte=False, with_lm_head=True)
    hparams = {"context": 256, "dim": 64, "ffn": 96, "layers": 2, "heads": 8, "kv_heads": 2}
    path = tmp_path / "tiny-codeshell.gguf"
    _write_gguf(path, "codeshell", {**hparams, "rope_base": 10000.0}, weights)
    loaded = _load_gguf(path)
    assert loaded.args.arch == "codeshell" and loaded.args.n_kv_heads == 2
    forward = _codeshell_reference(config, weights)
    _check_against_oracle(loaded, forward, _reference_greedy(forward))
