"""The loop guard on real answers of the demo model (Gemma 3 270M), through ChatEngine.answer, the
path every front end streams from: it stops the model's real loops and leaves its real lists,
code and plain answers whole.

One child process loads the model once, pinned to one CPU kernel (haswell: every AVX2 machine
computes the same numbers) with greedy decoding, so the answers are the same on every run. Each
question is answered twice, as the raw engine stream and through the guard.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

MAX_TOKENS = 400
QUESTIONS = {  # name -> (question, preset: None for the stick's default, "none" for none)
    "poem": ("Write a poem about the rain.", None),  # one line over and over
    "numbers": ("Write the numbers 1 to 30 as a numbered list, each with a fruit.", None),  # 30 items
    "code": ("Show a bash command to list files, in a code block.", "none"),
    "table": ("Draw a Markdown table:\n| A | B |\n|---|---|", None),
    "fruits": ("Make a Markdown table of five fruits and their colours.", "none"),  # a list of five, nested
    "aid": ("Show a table with columns Item and Quantity for a first aid kit.", "none"),  # similar items, to the limit
    "purify": ("How do I purify water?", None),
    "french": ("Translate 'water' into French.", None),
    "survive": ("How long can a person survive without water?", None),
    "story": ("Write a long story about a river and a village.", None),
    "kit": ("List 30 items for an emergency kit, numbered 1 to 30.", None),
}

CHILD = textwrap.dedent("""
    import json, pathlib, sys
    import llama_cpp
    from kit import engine, ggml, integrity
    from kit.conversation import choose_preset, first_messages
    from kit.manifest import load_profile
    from kit.settings import EngineSettings
    model, profile, questions, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    model = pathlib.Path(model)
    integrity.verify_file(model, integrity.hash_file(model).blake3)
    presets = load_profile(pathlib.Path(profile)).presets
    eng = engine.LlamaEngine.load([model], EngineSettings(n_ctx=2048, threads=2), model_id="m",
                                  chat_format_fallback="alpaca", variant=ggml.lib_dir() / "libggml-cpu-haswell.so")
    out = {}
    for name, (question, preset) in questions.items():
        messages = first_messages(question, choose_preset(presets, preset))
        eng.llm.reset()
        raw = "".join(eng.stream(messages, max_tokens=max_tokens, temperature=0.0))
        raw_tokens = eng.last_stats.completion_tokens
        eng.llm.reset()
        shown = "".join(eng.answer(messages, max_tokens=max_tokens, temperature=0.0))
        out[name] = {"raw": raw, "raw_tokens": raw_tokens, "shown": shown, "looped": eng.last_stats.looped}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def answers(gemma_path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(gemma_path), str(ROOT / "manifests" / "demo.toml"),
                           json.dumps(QUESTIONS), str(MAX_TOKENS)], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_real_loop_is_stopped_after_its_first_copy(answers):
    poem = answers["poem"]
    raw_lines = [line for line in poem["raw"].splitlines() if line.strip()]
    assert poem["raw_tokens"] == MAX_TOKENS and len(raw_lines) - len(set(raw_lines)) >= 10  # it loops
    assert poem["looped"]
    kept = [line for line in poem["shown"].splitlines() if line.strip()]
    assert kept and len(kept) == len(set(kept))
    assert poem["raw"].startswith(poem["shown"])


def test_a_real_numbered_list_of_30_items_is_left_whole(answers):
    numbers = answers["numbers"]
    items = re.findall(r"^(\d+)\. \S", numbers["raw"], re.M)
    assert [int(n) for n in items] == list(range(1, 31)), numbers["raw"]
    assert not numbers["looped"] and numbers["shown"] == numbers["raw"]


def test_a_real_code_block_is_left_whole(answers):
    code = answers["code"]
    assert re.search(r"```bash\n.+\n```", code["raw"]), code["raw"]
    assert not code["looped"] and code["shown"] == code["raw"]


def test_a_real_table_is_left_whole(answers):
    """The demo model writes a table's head and rule at most (none of ~200 tries gave body rows)."""
    table = answers["table"]
    assert re.search(r"^\| A \| B \|\n\|---\|---\|$", table["raw"], re.M), table["raw"]
    assert not table["looped"] and table["shown"] == table["raw"]


def test_similar_but_changing_items_run_on(answers):
    """Items that repeat a pattern but change ("The first aid kit contains...", "The second aid kit
    contains...") are not a loop: the guard lets the model run to the token limit."""
    aid = answers["aid"]
    assert aid["raw_tokens"] == MAX_TOKENS and not aid["looped"] and aid["shown"] == aid["raw"]


def test_answers_that_end_by_themselves_are_never_cut(answers):
    """Every answer the model ended itself (before the token limit) is shown whole; every one the
    guard stopped had run on to the limit: a loop never ends by itself."""
    for name, answer in answers.items():
        if answer["raw_tokens"] < MAX_TOKENS:
            assert not answer["looped"] and answer["shown"] == answer["raw"], name
        if answer["looped"]:
            assert answer["raw_tokens"] == MAX_TOKENS, name
            assert answer["raw"].startswith(answer["shown"]), name
