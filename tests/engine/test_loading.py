"""Loading: a missing, corrupt or truncated model gives a clear ModelLoadError, not a traceback."""

from __future__ import annotations

import struct

import pytest
import torch

from codelm.daemon.engine import EngineConfig, load_engine
from codelm.daemon.engine.loader import LinearFactory
from codelm.daemon.engine.weights import TensorSource
from codelm.daemon.errors import ModelLoadError


def test_missing_model_path_names_the_known_models(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a known name"):
        load_engine(EngineConfig(model=str(tmp_path / "nope.gguf")))


def test_corrupt_gguf_says_to_fetch_it_again(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file.*fetch it again"):
        load_engine(EngineConfig(model=str(bad)))


def test_gguf_with_an_impossible_length_is_reported(tmp_path):
    bad = tmp_path / "huge.gguf"
    # version 3, no tensors, one key whose name claims 2**63 bytes
    bad.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**63 + 5) + b"x" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file.*fetch it again"):
        load_engine(EngineConfig(model=str(bad)))


def test_truncated_gguf_is_reported(tmp_path, default_model_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path.read_bytes()[: 8 << 20])
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_engine(EngineConfig(model=str(cut)))


def test_a_corrupt_layer_count_is_reported_at_once(tmp_path, default_model_path):
    # llama.block_count of 6291458 (one flipped byte): naming each block's tensors, then
    # building the blocks, took minutes and gigabytes before the first one was missing.
    data = bytearray(default_model_path.read_bytes())
    key = data.index(b"llama.block_count") + len(b"llama.block_count")
    assert struct.unpack_from("<II", data, key) == (4, 30)  # a uint32: SmolLM2's 30 blocks
    struct.pack_into("<I", data, key + 4, 6_291_458)
    bad = tmp_path / "many-blocks.gguf"
    bad.write_bytes(data)
    with pytest.raises(ModelLoadError, match="states 6291458 layers but holds the weights of 30"):
        load_engine(EngineConfig(model=str(bad)))


def test_unknown_quantisation_is_refused(default_model_path):
    with pytest.raises(ModelLoadError, match="unknown quantisation"):
        load_engine(EngineConfig(model=str(default_model_path), quant="int3"))


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_engine(EngineConfig(model=str(tmp_path)))


@pytest.mark.parametrize(
    ("mode", "types", "attention_input", "scheme"),
    [
        ("int4", ["Q5_0", "Q5_0", "Q8_0"], True, "int8"),  # Qwen2.5-Coder's q/k/v
        ("int4", ["Q5_0"], False, "int4"),
        ("int4", ["Q4_1", "Q4_1", "Q4_1"], True, "int4"),  # 4 bits already: nothing to keep
        ("auto", ["Q4_K", "Q4_K", "Q6_K"], True, "int8"),  # Q4_K_M widens attn_v
        ("auto", ["Q4_K"], False, "int4"),
        ("auto", ["Q5_0"], True, "int8"),
        ("int8", ["Q4_0"], True, "int8"),
        ("fp32", ["Q4_0"], True, None),
    ],
)
def test_int4_keeps_attention_inputs_wider_than_4_bits_at_int8(
    mode, types, attention_input, scheme
):
    factory = LinearFactory(mode, torch.float32, torch.device("cpu"))
    sources = [TensorSource(f"t{i}", (64, 64), kind) for i, kind in enumerate(types)]
    assert factory.scheme_for(sources, attention_input) == scheme


@pytest.mark.parametrize(
    ("device", "chunk", "rows"), [("cpu", 512, 128), ("cuda", 512, 512), ("cuda", 256, 256)]
)
def test_prefill_is_calibrated_at_a_whole_chunk_on_a_gpu(
    monkeypatch, tmp_path, device, chunk, rows
):
    # Building the dispatcher touches no GPU; its prefill timings' row count is in their key.
    monkeypatch.setenv("CODELM_HOME", str(tmp_path))
    factory = LinearFactory("int4", torch.bfloat16, torch.device(device), prefill_chunk=chunk)
    dispatcher = factory._dispatcher()
    assert dispatcher.config.calibration_rows == (1, rows)
    assert dispatcher.config.chunk_rows == chunk  # where int5 / int8 prefill are compared


def test_the_head_is_planned_at_the_rows_it_checks_drafts_with(default_model_path, monkeypatch):
    from codelm.daemon.engine.loader import HEAD_PREFILL_ROWS
    from codelm.quant import Dispatcher

    seen: dict[str, int | None] = {}
    plan = Dispatcher.plan

    def spy(self, qw, *, name="linear", prefill_rows=None):
        seen[name] = prefill_rows
        return plan(self, qw, name=name, prefill_rows=prefill_rows)

    monkeypatch.setattr(Dispatcher, "plan", spy)
    load_engine(EngineConfig(model=str(default_model_path), quant="int8"))
    assert seen.pop("lm_head") == HEAD_PREFILL_ROWS
    assert seen and all(rows is None for rows in seen.values())  # prompt chunks' rows


def test_prefill_copies_none_holds_the_quantised_weights_alone(default_model_path):
    from codelm.daemon.engine import EngineConfig, load_engine
    from codelm.quant.linear import QuantizedLinear

    engine = load_engine(EngineConfig(model=str(default_model_path), prefill_copies="none"))
    linears = [m for m in engine.model.modules() if isinstance(m, QuantizedLinear)]
    # Nothing beside what decode reads: prompts run on the decode formats (per-call tiles).
    assert linears and all(m.nbytes == m.plan.decode.nbytes for m in linears)
    assert engine.model.head_shortlist is None
    ids = engine.tokenizer.encode("def add(a, b):\n    return")
    from codelm.daemon.engine.generate import StopRules, generate

    result = generate(engine.model, engine.tokenizer, engine.new_kv(), ids, StopRules(max_tokens=4))
    assert len(result.token_ids) == 4


@pytest.mark.parametrize("size", ["3MB", "12"])
def test_prefill_copies_of_a_size_hold_no_more(default_model_path, size):
    from codelm.daemon.engine import EngineConfig, copies_budget, load_engine
    from codelm.daemon.engine.loader import copies_bytes
    from codelm.quant.linear import QuantizedLinear

    engine = load_engine(EngineConfig(model=str(default_model_path), prefill_copies=size))
    linears = [m for m in engine.model.modules() if isinstance(m, QuantizedLinear)]
    copies = copies_bytes(engine.model)
    assert 0 < copies <= copies_budget(size)  # the first layers got copies, the rest none
    assert engine.info["copies_MB"] == round(copies / 1e6, 1)
    assert any(m.nbytes == m.plan.decode.nbytes for m in linears)


def test_an_unknown_prefill_copies_value_is_refused(default_model_path):
    from codelm.daemon.engine import EngineConfig, load_engine
    from codelm.daemon.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="must be auto, none or a size in MB"):
        load_engine(EngineConfig(model=str(default_model_path), prefill_copies="some"))


def test_gguf_whose_tokenizer_is_damaged_says_so(tmp_path, default_model_path):
    # The header reads, but a key the tokenizer needs is renamed: no KeyError traceback.
    data = default_model_path.read_bytes()
    at = data.index(b"tokenizer.ggml.tokens")
    bad = tmp_path / "renamed.gguf"
    bad.write_bytes(data[:at] + b"tokenizer.ggml.tokenz" + data[at + 21 :])
    with pytest.raises(ModelLoadError, match="could not be loaded \\(KeyError.*models fetch"):
        load_engine(EngineConfig(model=str(bad)))


@pytest.mark.parametrize(
    "config", ["[1, 2]", '{"model_type": "llama"}', '{"model_type": "llama", "hidden_size": "64"}']
)
def test_folder_with_a_config_that_describes_no_model_says_so(tmp_path, config):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(config)
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_engine(EngineConfig(model=str(tmp_path)))


def test_available_memory_counts_the_page_cache_the_kernel_gives_back(tmp_path):
    # Free memory alone (sysconf's) was 2.1 GiB of 24 after a 20 GB file was read here, with
    # 23 GiB available: the prefill copies' budget fell from 1.5 GiB to 287 MB and the KV
    # cache's from 4 GiB to its 256 MiB floor.
    from codelm.daemon.engine.loader import available_memory_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       24683784 kB\nMemFree:         2245396 kB\n"
        "MemAvailable:   24193280 kB\nCached:         21755808 kB\n"
    )
    assert available_memory_bytes(str(meminfo)) == 24193280 * 1024
    free = available_memory_bytes(str(tmp_path / "absent"))  # not Linux: free memory
    assert free is None or free > 0


GIB = 1 << 30
_V1_NO_LIMIT = "9223372036854771712"


@pytest.mark.parametrize(
    ("cgroup", "files", "expected"),
    [
        # A container (Docker, a dev container) on cgroup v2 sees its cgroup at the root: a
        # 2 GiB limit, 1.5 GiB used of which 0.5 GiB page cache (0.1 GiB of it shared memory).
        (
            "0::/\n",
            {
                "memory.max": str(2 * GIB),
                "memory.current": str(3 * GIB // 2),
                "memory.stat": f"anon {GIB}\nfile {GIB // 2}\nshmem {GIB // 10}\n",
            },
            2 * GIB - 3 * GIB // 2 + GIB // 2 - GIB // 10,
        ),
        ("0::/user.slice\n", {"user.slice/memory.max": "max\n"}, 20 * GIB),  # no limit
        (  # cgroup v1, a process of the host: its own group's limit
            "12:cpu:/\n4:memory,hugetlb:/build/job\n0::/\n",
            {
                "memory/build/job/memory.limit_in_bytes": str(8 * GIB),
                "memory/build/job/memory.usage_in_bytes": str(7 * GIB),
                "memory/build/job/memory.stat": f"cache {GIB}\ntotal_cache {GIB}\n",
            },
            2 * GIB,
        ),
        (  # cgroup v2, a host process: a parent's limit (a user slice's) bounds it too
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            {
                "user.slice/user-1000.slice/session-2.scope/memory.max": "max\n",
                "user.slice/user-1000.slice/session-2.scope/memory.current": str(GIB),
                "user.slice/user-1000.slice/session-2.scope/memory.stat": "file 0\n",
                "user.slice/user-1000.slice/memory.max": str(6 * GIB),
                "user.slice/user-1000.slice/memory.current": str(5 * GIB),
                "user.slice/user-1000.slice/memory.stat": f"file {GIB // 2}\nshmem 0\n",
                "user.slice/memory.max": str(16 * GIB),
                "user.slice/memory.current": str(5 * GIB),
                "user.slice/memory.stat": "file 0\n",
            },
            6 * GIB - 5 * GIB + GIB // 2,
        ),
        (
            "4:memory:/\n",
            {"memory/memory.limit_in_bytes": _V1_NO_LIMIT, "memory/memory.usage_in_bytes": "1"},
            20 * GIB,
        ),
        ("", {}, 20 * GIB),  # no cgroups at all
    ],
    ids=["v2-container", "v2-max", "v1-host-group", "v2-parent-limit", "v1-unlimited", "none"],
)
def test_available_memory_is_bounded_by_the_cgroup_limit(tmp_path, cgroup, files, expected):
    """In a container MemAvailable is the host's: a KV cache sized from it, or a load let past
    it, would have the container's OOM killer end the daemon without a word."""
    from codelm.daemon.engine.loader import available_memory_bytes

    meminfo, cgroups, root = tmp_path / "meminfo", tmp_path / "cgroup", tmp_path / "fs"
    meminfo.write_text(f"MemTotal: {32 << 20} kB\nMemAvailable: {20 << 20} kB\n")
    cgroups.write_text(cgroup)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert available_memory_bytes(str(meminfo), str(cgroups), str(root)) == expected


@pytest.mark.parametrize("quant", ["auto", "fp32"])
def test_a_load_that_would_not_fit_in_memory_stops_early_and_says_so(
    default_model_path, monkeypatch, quant
):
    """Past the memory there is swap (a frozen machine) or the OOM killer (a daemon gone
    without a word): the load stops at the first check, well before the end."""
    from codelm.daemon.engine import loader

    monkeypatch.setattr(loader, "available_memory_bytes", lambda *args: loader.LOAD_RESERVE_BYTES)
    fractions = []
    with pytest.raises(ModelLoadError, match="not enough memory: .* GiB is available") as error:
        load_engine(
            EngineConfig(model=str(default_model_path), quant=quant),
            progress=lambda fraction, message: fractions.append(fraction),
        )
    assert int(str(error.value).split("% of the way")[0].rsplit(" ", 1)[1]) <= 30
    assert max(fractions) < 0.5
    monkeypatch.setattr(loader, "available_memory_bytes", lambda *args: 2 * GIB)
    rooms = []  # what each check leaves the prefill copies (quant.Dispatcher.limit_copies)
    monkeypatch.setattr(loader.LinearFactory, "limit_copies", lambda self, room: rooms.append(room))
    load_engine(EngineConfig(model=str(default_model_path), quant=quant))  # enough: it loads
    assert rooms and all(0 < room < 2 * GIB - loader.LOAD_RESERVE_BYTES for room in rooms)


@pytest.mark.parametrize(
    ("device", "error", "says"),
    [
        (
            "cuda",
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has"),
            r"the GPU's memory ran out .*\(CUDA out of memory. Tried .*`--device cpu`, a smaller",
        ),
        (
            "cpu",
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 4294967296 bytes. Error code 12"
            ),
            r"^memory ran out while loading .*can't allocate memory.*or choose a smaller model",
        ),
        ("cpu", MemoryError(), r"^memory ran out while loading \S+ \(MemoryError\)"),
    ],
    ids=["cuda", "cpu-allocator", "python"],
)
def test_running_out_of_memory_while_loading_says_so(
    default_model_path, monkeypatch, device, error, says
):
    """Not "could not be loaded ...; may be damaged: fetch it again", which sent the user to
    download a good file again."""
    from codelm.daemon.engine import loader

    def fail(*args):
        raise error

    monkeypatch.setattr(loader, "_load_model", fail)
    config = EngineConfig(model=str(default_model_path))
    with pytest.raises(ModelLoadError, match=says) as raised:
        loader.load_model(config, torch.device(device))
    assert "damaged" not in str(raised.value)
