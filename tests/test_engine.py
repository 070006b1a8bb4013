"""The engine with the real model: verified loads only, one libggml, streaming, stop, chat format."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import FakeEngine

from kit import integrity
from kit.engine import GenStats
from kit.errors import NotVerifiedError

pytestmark = pytest.mark.slow

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
    maps = pathlib.Path("/proc/self/maps").read_text().splitlines()
    out["ggml"] = sorted({l.split()[-1] for l in maps if "/libggml.so" in l})
    out["cpu"] = sorted({l.split()[-1].rsplit("/", 1)[-1] for l in maps if "libggml-cpu-" in l})
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def child_result(gemma_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(gemma_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_refuses_a_file_not_verified_in_this_process(child_result):
    assert child_result["unverified"].startswith("NotVerifiedError:")


def test_answers_with_the_fallback_chat_format(child_result):
    assert child_result["chat_format"] == "alpaca"
    answer = child_result["answer"]
    assert len(answer.split()) >= 8, answer
    assert "water" in answer.lower()
    stats = child_result["stats"]
    assert stats["completion_tokens"] > 0 and stats["first_token_s"] < stats["seconds"]
    assert stats["context_used"] > stats["completion_tokens"]


def test_stop_event_ends_the_answer(child_result):
    assert child_result["stopped"] is True
    assert child_result["stopped_after"] == 5


def test_one_libggml_instance_and_the_chosen_kernel(child_result):
    assert len(child_result["ggml"]) == 1 and child_result["ggml"][0].endswith("libggml.so.0")
    assert child_result["cpu"] == ["libggml-cpu-haswell.so"]


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
