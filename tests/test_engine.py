"""The engine with the real model: verified loads only, one libggml, streaming, stop, chat format,
the loop guard on a real loop; and its stop-string scanner, which needs no model."""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import ROOT, FakeEngine

from kit import integrity
from kit.engine import SAMPLE_CONVERSATION, GenStats, StopStrings, check_chat_template
from kit.errors import EngineError, NotVerifiedError

# Run in a child: a kernel is loaded into the process for good, and a crash must not take pytest.
CHILD = textwrap.dedent("""
    import json, pathlib, sys, threading
    from kit import engine, ggml, integrity
    from kit.settings import EngineSettings
    model = pathlib.Path(sys.argv[1])
    out = {}
    try:
        engine.LlamaEngine.load([model], EngineSettings(n_ctx=512, threads=2), model_id="m")
    except Exception as err:
        out["unverified"] = type(err).__name__ + ": " + str(err)
    assert integrity.verify_file(model, integrity.hash_file(model).blake3)
    eng = engine.LlamaEngine.load([model], EngineSettings(n_ctx=1024, threads=2), model_id="m",
                                  chat_format_fallback="alpaca", variant=ggml.lib_dir() / "libggml-cpu-haswell.so")
    msgs = [{"role": "user", "content": "How do I purify water?"}]
    out["answer"] = "".join(eng.stream(msgs, max_tokens=24, temperature=0.0))
    out["stats"] = eng.last_stats.__dict__
    stop = threading.Event()
    pieces = []
    for piece in eng.stream(msgs, max_tokens=200, stop=stop, temperature=0.0):
        pieces.append(piece)
        if len(pieces) == 5:
            stop.set()
    out["stopped_after"] = len(pieces)
    out["stopped"] = eng.last_stats.stopped
    out["chat_format"] = eng.llm.chat_format
    # the prompt the alpaca format renders, and how many tokens each detokenize call decodes
    prompts, detokenized = [], []
    create, detokenize = eng.llm.create_completion, eng.llm.detokenize
    eng.llm.create_completion = lambda prompt, **kw: prompts.append(prompt) or create(prompt, **kw)
    eng.llm.detokenize = lambda tokens, *a, **kw: detokenized.append(len(tokens)) or detokenize(tokens, *a, **kw)
    long = [{"role": "user", "content": "Show a table with columns Item and Quantity for a first aid kit."}]
    out["long_pieces"] = len(list(eng.stream(long, max_tokens=400, temperature=0.0)))
    out["detokenized_max"] = max(detokenized)
    out["prompt_end"] = eng.llm.detokenize(prompts[-1][-8:]).decode()
    eng.llm.create_completion, eng.llm.detokenize = create, detokenize
    # a real loop, through the one streaming path every front end uses
    from kit.conversation import choose_preset, first_messages
    from kit.manifest import load_profile
    presets = load_profile(pathlib.Path(sys.argv[2])).presets
    poem = first_messages("Write a poem about the rain.", choose_preset(presets))  # the demo stick's default
    out["poem_raw"] = "".join(eng.stream(poem, max_tokens=300, temperature=0.0))
    out["poem_shown"] = "".join(eng.answer(poem, max_tokens=300, temperature=0.0))
    out["poem_stats"] = eng.last_stats.__dict__
    maps = pathlib.Path("/proc/self/maps").read_text().splitlines()
    out["ggml"] = sorted({l.split()[-1] for l in maps if "/libggml.so" in l})
    out["cpu"] = sorted({l.split()[-1].rsplit("/", 1)[-1] for l in maps if "libggml-cpu-" in l})
    # ggml's threadpool lives as long as the model: its worker is there between tokens, not remade for each
    import os
    tasks = lambda: len(os.listdir("/proc/self/task"))
    out["threads_open"] = tasks()
    out["threads_between_tokens"] = sorted({tasks() for _ in eng.stream(msgs, max_tokens=8, temperature=0.0)})
    eng.close()
    out["threads_closed"] = tasks()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def child_result(gemma_path):
    """Every real-model check in one child (loading the model once)."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(gemma_path), str(ROOT / "manifests" / "demo.toml")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_refuses_a_file_not_verified_in_this_process(child_result):
    assert child_result["unverified"].startswith("NotVerifiedError:")


@pytest.mark.slow
def test_answers_with_the_fallback_chat_format(child_result):
    assert child_result["chat_format"] == "alpaca"
    assert child_result["prompt_end"].endswith("### Response:\n")  # the model is told its turn has come
    answer = child_result["answer"]
    assert len(answer.split()) >= 8, answer
    assert "water" in answer.lower()
    stats = child_result["stats"]
    assert stats["completion_tokens"] > 0 and stats["first_token_s"] < stats["seconds"]
    assert stats["context_used"] > stats["completion_tokens"]


@pytest.mark.slow
def test_stop_event_ends_the_answer(child_result):
    assert child_result["stopped"] is True
    assert child_result["stopped_after"] == 5


@pytest.mark.slow
def test_streaming_decodes_each_token_once(child_result):
    """llama-cpp-python's own stream detokenizes the whole answer for every token; ours one token
    (the work per token is the same at token 10 and at token 2,000)."""
    assert child_result["long_pieces"] >= 50
    assert child_result["detokenized_max"] == 1


@pytest.mark.slow
def test_a_real_loop_is_stopped_and_the_start_kept(child_result):
    """Gemma 3 270M, asked for a poem, greedy: one line over and over until the token limit."""
    raw, shown, stats = child_result["poem_raw"], child_result["poem_shown"], child_result["poem_stats"]
    lines = [line for line in raw.splitlines() if line.strip()]
    assert len(lines) - len(set(lines)) >= 10, raw  # the model really loops
    assert stats["looped"] and not stats["stopped"]
    assert raw.startswith(shown) and 10 < len(shown.strip()) < len(raw) / 3
    kept = [line for line in shown.splitlines() if line.strip()]
    assert len(kept) == len(set(kept))  # each line once: the first copy kept, the repeats cut
    assert stats["completion_tokens"] < 150  # stopped after a few copies, not at the limit (300)


@pytest.mark.slow
def test_one_libggml_instance_and_the_chosen_kernel(child_result):
    assert len(child_result["ggml"]) == 1 and child_result["ggml"][0].endswith("libggml.so.0")
    assert child_result["cpu"] == ["libggml-cpu-haswell.so"]


@pytest.mark.slow
def test_one_threadpool_for_the_model_s_life(child_result):
    """2 threads: ggml's pool keeps one worker beside the caller from load to close, and close ends
    it (without a pool, ggml makes and joins a thread for every token, and close ends none)."""
    assert child_result["threads_between_tokens"] == [child_result["threads_open"]]
    assert child_result["threads_closed"] == child_result["threads_open"] - 1


def test_threadpool_params_match_the_pinned_ggml_header():
    sys.path.insert(0, str(ROOT / "build"))
    import base

    from kit import ggml

    header = (base.llama_sources() / "ggml" / "include" / "ggml.h").read_text()
    struct = re.search(r"struct ggml_threadpool_params \{(.*?)\};", header, re.S).group(1)
    fields = re.findall(r"^\s*(?:enum\s+)?(\w+)\s+(\w+)(?:\[(\w+)\])?;", struct, re.M)
    assert [name for _, name, _ in fields] == [name for name, _ in ggml._ThreadpoolParams._fields_]
    assert fields[0][2] == "GGML_MAX_N_THREADS"
    assert int(re.search(r"#define GGML_MAX_N_THREADS\s+(\d+)", header).group(1)) == 512
    assert [t for t, _, _ in fields] == ["bool", "int", "ggml_sched_priority", "uint32_t", "bool", "bool"]
    assert [ctype for _, ctype in ggml._ThreadpoolParams._fields_] == [
        ctypes.c_bool * 512, ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_bool, ctypes.c_bool]
    assert ctypes.sizeof(ggml._ThreadpoolParams) == 528  # 512 + 4 + 4 + 4 + 1 + 1, padded to 4


@pytest.mark.slow
def test_require_verified_in_parent(gemma_path):
    integrity.forget_verified()
    with pytest.raises(NotVerifiedError):
        integrity.require_verified(gemma_path)


def test_fake_engine_is_scriptable():
    fake = FakeEngine()
    fake.enqueue("one two three", RuntimeError("boom"))
    assert "".join(fake.stream([{"role": "user", "content": "hi"}])) == "one two three"
    assert isinstance(fake.last_stats, GenStats) and fake.last_stats.completion_tokens == 3
    with pytest.raises(RuntimeError):
        list(fake.stream([{"role": "user", "content": "again"}]))
    stop = threading.Event()
    stop.set()
    fake.enqueue("never shown")
    assert list(fake.stream([], stop=stop)) == [] and fake.last_stats.stopped


def test_stop_strings_hold_back_only_what_could_start_one():
    stops = StopStrings(["###", "</s>"])
    assert stops.feed("Boil it") == ("Boil it", False)
    assert stops.feed(" for a minute. #") == (" for a minute. ", False)  # "#" may begin "###"
    assert stops.feed("1 is the rule") == ("#1 is the rule", False)  # it did not
    assert stops.feed(" <") == (" ", False)
    assert stops.feed("/s") == ("", False)
    assert stops.feed("> more") == ("", True) and stops.found  # nothing after a stop string
    assert StopStrings([]).feed("a#") == ("a#", False)


def test_stop_string_split_across_pieces_and_flush():
    stops = StopStrings(["### Instruction"])
    shown = "".join(stops.feed(p)[0] for p in ["Answer.\n\n#", "##", " Instr"])
    assert shown == "Answer.\n\n" and stops.flush() == "### Instr"  # the answer ended: held text shown


# ---------------------------------------------------------------- chat templates from model files

HOSTILE_TEMPLATE = "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}"


def test_a_hostile_chat_template_is_a_one_line_refusal(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(EngineError) as info:
        check_chat_template(HOSTILE_TEMPLATE.replace("{marker}", str(marker)), bos="<s>", eos="</s>",
                            model_id="evil-1b")
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and "evil-1b" in message and "SecurityError" in message, message
    assert str(marker) not in message  # the reason, not the template
    with pytest.raises(EngineError, match="TemplateSyntaxError"):  # one that does not even compile
        check_chat_template("{% for m in messages %}", bos="<s>", eos="</s>")


def test_a_benign_chat_template_renders_as_at_chat_time():
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
    prompt = check_chat_template(template, bos="<s>", eos="</s>")
    assert prompt == "<s>" + "".join(f"<{m['role']}>{m['content']}</s>" for m in SAMPLE_CONVERSATION)


LOAD_HOSTILE = textwrap.dedent("""
    import json, pathlib, sys
    from kit import engine, ggml, integrity
    from kit.errors import EngineError
    from kit.settings import EngineSettings
    model = pathlib.Path(sys.argv[1])
    integrity.verify_file(model, integrity.hash_file(model).blake3)
    try:
        engine.LlamaEngine.load([model], EngineSettings(n_ctx=256, threads=2), model_id="evil-270m",
                                variant=ggml.lib_dir() / "libggml-cpu-haswell.so")
        print(json.dumps({"loaded": True}))
    except EngineError as err:
        print(json.dumps({"error": str(err), "hint": err.hint}))
""")


@pytest.mark.slow
def test_a_model_with_a_hostile_chat_template_is_refused_at_load(gemma_path, tmp_path):
    """The real model with the template in its GGUF metadata: LlamaEngine.load renders it once
    and refuses the model (kit.launch's ladder then tries the next one); no code ran."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.gguf"
    made = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gemma_path), str(evil),
                           "--chat-template", HOSTILE_TEMPLATE.replace("{marker}", str(marker)), "--force"],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    done = subprocess.run([sys.executable, "-c", LOAD_HOSTILE, str(evil)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not marker.exists()
    assert "evil-270m" in out["error"] and "SecurityError" in out["error"] and "\n" not in out["error"], out
