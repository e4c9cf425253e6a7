"""Keystroke latency, codelm against llama.cpp's llama-server, in one run on the same GGUF.

Replays editing real source files (Python stdlib modules of 2.6k-3.3k tokens) and asks for a
16-token suggestion after each edit, the same requests in the same order to each system:

- cold:        the first request on a file (nothing cached for it): 4 files;
- keystroke:   a region near the middle of json/decoder.py typed character by character (60
               keys over 3 lines; the document at each key is the file with the region typed so
               far and the rest of the region removed), a request at every key;
- edit_above:  a line inserted near the top of that file (~2k tokens above the cursor), then a
               request at the cursor; repeated;
- pause:       after each edit_above, a pause of PAUSE_S (the daemon's idle refresh of the K/V
               it moved is then under way) and a space typed at the cursor, a request;
- jump:        the cursor moved to the end of a line above it in that file (12, 30, 6 and 45
               lines up, in turn), a request at each: the text after the cursor changes;
- switch:      3 other files round-robin, one character typed in each before its request.

codelm is an isolated daemon (`CODELM_HOME` in a temporary folder) asked through
`/v1/complete` with `stream: true`. llama-server gets the exact prompt text codelm's prompt
builder makes (the daemon's own `Engine._build`, window anchors included, with the token it
heals put back, so both continue from the cursor) on `/completion` with `cache_prompt: true`,
`n_predict` 16, temperature 0, streamed. Four rows: codelm with exact reuse only
(`CODELM_CACHE_REUSE_MIN_TOKENS=0`), codelm with position-shifted KV reuse after an edit
(`=256`, the daemon's default), llama-server as started by default (4 slots) and llama-server
with `--cache-reuse 256`. Latency is
measured on the client, to the first streamed piece of text and to the end of the suggestion.
Warm-up requests (a small unrelated document) are excluded.

    .venv/bin/python benchmarks/keystrokes.py [--keys 60] [--edits 3] [--rounds 4]
        [--model default] [--cache-reuse 256 (0: no reuse rows)] [--no-peers]
        [--budget-s 150] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from common import median, percentile, print_table, write_json  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
N_PREDICT = 16
REQUEST_TIMEOUT_S = 120.0

# (file, regex of the text where typing starts). The cursor sits 7.3k-7.4k characters into
# each file, inside the daemon's 8000-character prefix window, so every prompt is the file
# from its top: about 2k tokens, and an edit near the top changes nearly all of it.
KEYSTROKE_FILE = ("json/decoder.py", r"_append = values\.append")
SWITCH_FILES = (
    ("string.py", r"used_args = set\(\)"),
    ("shlex.py", r"if nextchar == self\.state:"),
    ("queue.py", r"def get_nowait"),
)
WARMUP_FILE = "bisect.py"
EDIT_AFTER_LINE = 3  # the inserted lines go after this many lines of the file
JUMP_LINES = (12, 30, 6, 45)  # how many lines above the typed region each jump lands
PAUSE_S = 0.8  # longer than the daemon waits before it refreshes moved K/V (0.5 s)


@dataclass
class Step:
    scenario: str  # warmup | cold | keystroke | edit_above | pause | jump | switch
    file: str
    uri: str
    text: str
    cursor: int  # str offset
    line: int  # 0-based
    character: int  # UTF-16 units
    pause_s: float = 0.0  # the user's pause before this request
    prompt: str = ""  # what llama-server gets
    prompt_tokens: int = 0  # codelm's prompt length in tokens (healed tokens included)
    healed: str = ""  # the text of the token codelm heals (its suggestion retypes it)


@dataclass
class Sample:
    scenario: str
    file: str
    first_ms: float
    total_ms: float
    cached: int
    prefilled: int
    generated: int
    text: str
    server: dict[str, float] = field(default_factory=dict)  # server-side timings, ms

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "file": self.file,
            "first_ms": round(self.first_ms, 2),
            "total_ms": round(self.total_ms, 2),
            "cached": self.cached,
            "prefilled": self.prefilled,
            "generated": self.generated,
            "text": self.text,
            "server": {k: round(v, 2) for k, v in self.server.items()},
        }


# -- the replay plan (the same for every system) --


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset)
    start = text.rfind("\n", 0, offset) + 1
    return line, len(text[start:offset].encode("utf-16-le")) // 2


def _step(scenario: str, name: str, text: str, cursor: int, pause_s: float = 0.0) -> Step:
    line, character = _position(text, cursor)
    uri = (STDLIB / name).as_uri()
    return Step(scenario, name, uri, text, cursor, line, character, pause_s=pause_s)


def _region_start(truth: str, pattern: str) -> int:
    found = re.search(pattern, truth)
    if found is None:
        raise SystemExit(f"{pattern!r} not found: this Python's stdlib differs")
    return found.start()


def _typed(truth: str, start: int, n_keys: int, k: int) -> tuple[str, int]:
    """The document after k of the region's n_keys characters were typed, and the cursor."""
    return truth[: start + k] + truth[start + n_keys :], start + k


def build_plan(keys: int, edits: int, rounds: int) -> list[Step]:
    steps: list[Step] = []
    warm = (STDLIB / WARMUP_FILE).read_text()
    warm_cursor = warm.rfind("\n", 0, 1500) + 1
    steps.append(_step("warmup", WARMUP_FILE, warm, warm_cursor))
    # (d) cold and (a) typing: the file opened with the region removed, then typed key by key.
    name, pattern = KEYSTROKE_FILE
    truth = (STDLIB / name).read_text()
    start = _region_start(truth, pattern)
    for k in range(keys + 1):
        text, cursor = _typed(truth, start, keys, k)
        steps.append(_step("cold" if k == 0 else "keystroke", name, text, cursor))
    # (b) a line inserted near the top, a request at the cursor; again with another line.
    text, cursor = truth, start + keys
    at = [m.end() for m in re.finditer("\n", text)][EDIT_AFTER_LINE - 1]
    for r in range(edits):
        line = f"_EDIT_{r + 1} = {r + 1}  # an edit far above the cursor\n"
        text, cursor = text[:at] + line + text[at:], cursor + len(line)
        steps.append(_step("edit_above", name, text, cursor))
        text, cursor = text[:cursor] + " " + text[cursor:], cursor + 1
        steps.append(_step("pause", name, text, cursor, pause_s=PAUSE_S))
    # (e) the cursor moved to the end of lines above it, the text unchanged.
    line_ends = [m.start() for m in re.finditer("\n", text)]
    here = text.count("\n", 0, cursor)
    for back in JUMP_LINES:
        steps.append(_step("jump", name, text, line_ends[here - back]))
    # (c) three files round-robin: each opened (cold), then one key typed in each per round.
    regions = []
    for name, pattern in SWITCH_FILES:
        truth = (STDLIB / name).read_text()
        regions.append((name, truth, _region_start(truth, pattern)))
        text, cursor = _typed(truth, regions[-1][2], rounds, 0)
        steps.append(_step("cold", name, text, cursor))
    for r in range(rounds):
        for name, truth, start in regions:
            text, cursor = _typed(truth, start, rounds, r + 1)
            steps.append(_step("switch", name, text, cursor))
    return steps


class PromptMirror:
    """The daemon's prompt builder without its model: the same tokenizer, settings and
    per-document window anchors, fed the same requests in the same order as the daemon."""

    def __init__(self, model_path: Path, engine_config: Any) -> None:
        from codelm.daemon.engine.models import architecture
        from codelm.daemon.engine.prompt import detect_fim
        from codelm.daemon.engine.tokenizer import tokenizer_from_gguf
        from codelm.daemon.engine.weights import read_gguf

        weights = read_gguf(model_path, lambda arch: architecture(arch).GGUF_NAMES)
        self.tokenizer = tokenizer_from_gguf(weights.meta)
        module = architecture(weights.meta["general.architecture"])  # (its context length)
        self.args = module.ModelArgs.from_gguf(weights.meta, "lm_head.weight" in weights.tensors)
        self.config = engine_config
        self.fim = detect_fim(self.tokenizer, engine_config.fim)
        self.anchors: dict[str, str] = {}

    def suffix_chars(self, trigger: str) -> int:
        from codelm.daemon.engine.engine import Engine

        return Engine.suffix_chars(self, trigger)  # type: ignore[arg-type]

    def fill(self, step: Step) -> None:
        from codelm.daemon.engine.engine import Engine

        prompt = Engine._build(self, _request(step), step.cursor)  # type: ignore[arg-type]
        step.healed = prompt.heal.decode("utf-8", errors="replace")
        step.prompt, step.prompt_tokens = peers.prompt_for_peer(self.tokenizer, prompt)


def _request(step: Step):
    from codelm.daemon.protocol import CompleteRequest

    return CompleteRequest(
        uri=step.uri,
        text=step.text,
        line=step.line,
        character=step.character,
        trigger="automatic",
        max_tokens=N_PREDICT,
        stream=True,
    )


# -- the systems --


class Codelm:
    """An isolated codelm daemon (its own CODELM_HOME), asked through the Python client."""

    def __init__(self, model_path: Path, quant: str, cache_reuse: int = 0) -> None:
        self.model_path = model_path
        self.quant = quant
        self.home = Path(tempfile.mkdtemp(prefix="codelm-bench-"))
        # Always set: the daemon's default (256) would otherwise make the first row reuse too.
        self.env = {
            **os.environ,
            "CODELM_HOME": str(self.home),
            "CODELM_CACHE_REUSE_MIN_TOKENS": str(cache_reuse),
        }
        self.cli = str(Path(sys.executable).with_name("codelm-daemon"))
        self.loop = asyncio.new_event_loop()
        self.client = None
        self.name = f"codelm ({quant})" + (f" reuse {cache_reuse}" if cache_reuse else "")
        self.start_s = float("nan")

    def engine_config(self) -> Any:
        from codelm.daemon.config import resolve_config

        overrides = {"model": str(self.model_path), "quant": self.quant}
        return resolve_config(overrides, environ=self.env).engine

    def start(self) -> None:
        from codelm.daemon.client import DaemonClient

        t0 = time.perf_counter()
        done = subprocess.run(
            [self.cli, "start", "--model", str(self.model_path), "--quant", self.quant],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"codelm-daemon start failed:\n{done.stdout}{done.stderr}")
        self.start_s = time.perf_counter() - t0
        run = self.home / "run"
        url = (run / "daemon.url").read_text().strip()
        token = (run / "daemon.token").read_text().strip()
        self.client = DaemonClient(url, token, timeout_s=REQUEST_TIMEOUT_S)

    def status(self) -> dict[str, Any]:
        status = self.loop.run_until_complete(self.client.status()) if self.client else {}
        status["decode_kernels"] = self.decode_kernels()
        return status

    def decode_kernels(self) -> dict[str, str]:
        """Layer shape -> the decode kernel the daemon's dispatcher picked, and how the shape
        was ranked (calibrated or cached), from the daemon log's `quant kernels for` (the
        ranking) and `quant plan for` (the pick) lines; "head" says whether the head decodes
        through its shortlist (`lm_head: ... shortlist taken`)."""
        log = self.home / "log" / "daemon.log"
        if not log.exists():
            return {}
        sources, chosen = {}, {}
        for line in log.read_text(errors="replace").splitlines():
            head = re.search(r"lm_head: a decode row .*: (shortlist taken|\S+ kept)", line)
            if head:
                chosen["head"] = head.group(1)
            ranked = re.search(r"quant kernels for (.*?) \((.*?)\): decode:", line)
            if ranked:
                sources[ranked.group(1)] = ranked.group(2)
            picked = re.search(r"quant plan for (.*?): decode (\S+),", line)
            if picked:
                key, kernel = picked.groups()
                fields = key.split("|")  # ...|scheme group|NxK|... (Dispatcher._key)
                shape = next((f for f in fields if re.fullmatch(r"\d+x\d+", f)), "?")
                chosen[f"{fields[3]} {shape}"] = f"{kernel} ({sources.get(key, '?')})"
        return chosen

    def complete(self, step: Step) -> Sample:
        return self.loop.run_until_complete(self._complete(step))

    async def _complete(self, step: Step) -> Sample:
        first = None
        pieces: list[str] = []
        t0 = time.perf_counter()
        async for event in self.client.stream(_request(step)):
            if isinstance(event, str):
                if first is None and event:
                    first = time.perf_counter()
                pieces.append(event)
                continue
            end = time.perf_counter()
            t = event.timings
            total_ms = (end - t0) * 1000
            return Sample(
                scenario=step.scenario,
                file=step.file,
                first_ms=(first - t0) * 1000 if first else total_ms,
                total_ms=total_ms,
                cached=t.cached_tokens,
                prefilled=t.prefilled_tokens,
                generated=t.generated_tokens,
                text="".join(pieces),
                server={
                    "queue_ms": t.queue_ms,
                    "prefill_ms": t.prefill_ms,
                    "decode_ms": t.decode_ms,
                },
            )
        raise RuntimeError("the daemon's stream ended without a final answer")

    def stop(self) -> None:
        if self.client is not None:
            self.loop.run_until_complete(self.client.close())
            self.client = None
        subprocess.run([self.cli, "stop"], env=self.env, capture_output=True, text=True, timeout=60)
        pid_file = self.home / "run" / "daemon.pid"
        if pid_file.exists():  # `stop` failed: end the daemon we started, by its pid
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        self.loop.close()
        shutil.rmtree(self.home, ignore_errors=True)


class Peer:
    def __init__(self, model_path: Path, cache_reuse: int) -> None:
        self.server = peers.LlamaServer(model_path, cache_reuse=cache_reuse)
        self.name = "llama-server" + (f" --cache-reuse {cache_reuse}" if cache_reuse else "")
        self.start_s = float("nan")

    def start(self) -> None:
        self.server.start()
        self.start_s = self.server.start_s

    def status(self) -> dict[str, Any]:
        lines = self.server.log_lines("n_slots") + self.server.log_lines("n_ctx")
        return {"command": self.server.describe(), "log": lines[:6]}

    def complete(self, step: Step) -> Sample:
        r = self.server.complete(step.prompt, n_predict=N_PREDICT, timeout_s=REQUEST_TIMEOUT_S)
        return Sample(
            scenario=step.scenario,
            file=step.file,
            first_ms=r.first_token_ms,
            total_ms=r.total_ms,
            cached=r.cached,
            prefilled=r.prefilled,
            generated=r.generated,
            text=r.text,
            server={
                "prefill_ms": float(r.timings.get("prompt_ms", 0.0)),
                "decode_ms": float(r.timings.get("predicted_ms", 0.0)),
                "slot": float(r.slot),
            },
        )

    def stop(self) -> None:
        self.server.stop()


def run_system(system, plan: list[Step], budget_s: float) -> dict[str, Any]:
    """The plan against one system, started and always stopped here; the warm-up excluded."""
    samples: list[Sample] = []
    skipped = 0
    status: dict[str, Any] = {}
    print(f"{system.name}: starting", flush=True)
    try:
        system.start()
        deadline = time.monotonic() + budget_s
        for step in plan:
            if time.monotonic() > deadline:
                skipped += 1
                continue
            time.sleep(step.pause_s)
            sample = system.complete(step)
            if step.scenario != "warmup":
                samples.append(sample)
        status = system.status()
    finally:
        system.stop()
    print(f"{system.name}: {len(samples)} requests, {skipped} skipped (budget)", flush=True)
    return {
        "system": system.name,
        "start_s": round(system.start_s, 2),
        "skipped": skipped,
        "status": status,
        "samples": [s.to_json() for s in samples],
    }


# -- summary --

SCENARIOS = ("keystroke", "switch", "edit_above", "pause", "jump", "cold")


def summarize(run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for scenario in SCENARIOS:
        got = [s for s in run["samples"] if s["scenario"] == scenario]
        if not got:
            continue
        first = [s["first_ms"] for s in got]
        total = [s["total_ms"] for s in got]
        server = [s["server"] for s in got]
        rows.append(
            {
                "system": run["system"],
                "scenario": scenario,
                "n": len(got),
                "first_p50": median(first),
                "first_p90": percentile(first, 90),
                "full_p50": median(total),
                "full_p90": percentile(total, 90),
                "cached_p50": median([s["cached"] for s in got]),
                "prefilled_p50": median([s["prefilled"] for s in got]),
                "gen_p50": median([s["generated"] for s in got]),
                "queue_p50": median([x.get("queue_ms", float("nan")) for x in server]),
                "prefill_ms_p50": median([x["prefill_ms"] for x in server]),
                "decode_ms_p50": median([x["decode_ms"] for x in server]),
            }
        )
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """codelm p50 / llama-server p50 per scenario (< 1: codelm is faster), pairing the rows
    with KV reuse after edits off (codelm, llama-server) and on (both "reuse" rows)."""
    out = []

    def reuse(row: dict[str, Any]) -> bool:
        return "reuse" in row["system"]

    for theirs in rows:
        if theirs["system"].startswith("codelm") or "n" not in theirs:
            continue
        for mine in rows:
            if not mine["system"].startswith("codelm") or mine["scenario"] != theirs["scenario"]:
                continue
            if reuse(mine) != reuse(theirs):
                continue
            out.append(
                {
                    "scenario": theirs["scenario"],
                    "codelm": mine["system"],
                    "vs": theirs["system"],
                    "first_p50_x": mine["first_p50"] / theirs["first_p50"],
                    "full_p50_x": mine["full_p50"] / theirs["full_p50"],
                    "full_p90_x": mine["full_p90"] / theirs["full_p90"],
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="catalogue name or .gguf path")
    parser.add_argument("--quant", default="auto", help="codelm's --quant")
    parser.add_argument("--keys", type=int, default=60, help="keystrokes typed in scenario a")
    parser.add_argument("--edits", type=int, default=3, help="edits far above the cursor")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the 3 files")
    parser.add_argument("--no-peers", action="store_true", help="codelm only")
    parser.add_argument(
        "--cache-reuse",
        type=int,
        default=256,
        help="second row of each system: llama-server --cache-reuse N, codelm "
        "CODELM_CACHE_REUSE_MIN_TOKENS=N (0: no second rows)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="per system; later requests are skipped"
    )
    parser.add_argument("--json", default=None, help="where to write the results JSON")
    args = parser.parse_args(argv)

    from codelm.daemon.catalog import resolve_model_path

    model_path = resolve_model_path(args.model).resolve()
    if model_path.suffix != ".gguf":
        raise SystemExit("llama-server needs a .gguf model; pass --model FILE.gguf")
    plan = build_plan(args.keys, args.edits, args.rounds)
    codelm = Codelm(model_path, args.quant)
    mirror = PromptMirror(model_path, codelm.engine_config())
    for step in plan:
        mirror.fill(step)
    tokens = {
        s.file: s.prompt_tokens for s in plan if s.scenario in ("cold", "warmup")
    }  # the first prompt of each file
    print(f"model: {model_path.name}; prompt tokens at first request: {tokens}", flush=True)

    systems: list[Any] = [codelm]
    if args.cache_reuse:
        systems.append(Codelm(model_path, args.quant, args.cache_reuse))
    peer_note = ""
    if args.no_peers:
        peer_note = "skipped (--no-peers)"
    elif not peers.available():
        peer_note = peers.NOT_BUILT
    else:
        systems.append(Peer(model_path, 0))
        if args.cache_reuse:
            systems.append(Peer(model_path, args.cache_reuse))
    runs = [run_system(s, plan, args.budget_s) for s in systems]
    rows = [row for run in runs for row in summarize(run)]
    if peer_note:
        rows.append({"system": "llama-server", "scenario": peer_note})

    print(f"\nlatency in ms (client side, loopback), {N_PREDICT}-token suggestions")
    columns = [
        "system",
        "scenario",
        "n",
        "first_p50",
        "first_p90",
        "full_p50",
        "full_p90",
        "cached_p50",
        "prefilled_p50",
        "gen_p50",
        "queue_p50",
        "prefill_ms_p50",
        "decode_ms_p50",
    ]
    print_table(rows, columns)
    compared = ratios(rows)
    if compared:
        print("\ncodelm p50 / llama-server p50 (< 1: codelm faster)")
        columns = ["scenario", "codelm", "vs", "first_p50_x", "full_p50_x", "full_p90_x"]
        print_table(compared, columns)
    for run in runs:
        kernels = run["status"].get("decode_kernels")
        if kernels:
            print(f"{run['system']}: decode kernels by layer shape: {kernels}")
        if run["skipped"]:
            print(f"{run['system']}: {run['skipped']} requests skipped, over --budget-s")
    payload = {
        "model": str(model_path),
        "quant": args.quant,
        "settings": vars(args),
        "peer": peers.version() if len(runs) > 1 else peer_note,
        "prompt_tokens": tokens,
        "rows": rows,
        "ratios": compared,
        "runs": runs,
    }
    out = write_json("keystrokes", payload, args.json)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
