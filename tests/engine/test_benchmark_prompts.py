"""The benchmarks that give llama-server codelm's prompts build them as the engine does."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import keystrokes  # noqa: E402
import peers  # noqa: E402

from codelm.daemon.protocol import CompleteRequest  # noqa: E402

TEXT = "import os\n\n\ndef read_file(path):\n    with open(path) as f:\n        return f.re"


def test_the_keystrokes_mirror_builds_the_daemons_prompt(default_engine, default_model_path):
    """keystrokes.py builds llama-server's prompts without loading the model (PromptMirror,
    which runs Engine._build on itself); what it builds must be what the engine runs."""
    mirror = keystrokes.PromptMirror(default_model_path, default_engine.config)
    line, character = TEXT.count("\n"), len(TEXT) - TEXT.rfind("\n") - 1
    step = keystrokes.Step(
        scenario="cold",
        file="read.py",
        uri="file:///bench/read.py",
        text=TEXT,
        cursor=len(TEXT),
        line=line,
        character=character,
    )
    mirror.fill(step)
    request = CompleteRequest(
        uri=step.uri,
        text=TEXT,
        line=line,
        character=character,
        trigger="automatic",
        max_tokens=keystrokes.N_PREDICT,
    )
    prompt = default_engine.prompt(request)
    assert (step.prompt, step.prompt_tokens) == peers.prompt_for_peer(
        default_engine.tokenizer, prompt
    )
    assert step.healed == prompt.heal.decode("utf-8")
