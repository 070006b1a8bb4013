"""The engine's sampler (kit.engine._CandidateSampler): llama-cpp-python's own chain on the tokens
that can still be picked. Users get what plain llama-cpp-python gives them: the same text at
temperature 0, and at temperature > 0 the same token as the full chain at every step, from the
same random state."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from kit.engine import candidates_needed

CHILD = textwrap.dedent("""
    import json, pathlib, sys
    import llama_cpp
    from kit import engine, ggml, integrity
    from kit.settings import EngineSettings
    model = pathlib.Path(sys.argv[1])
    integrity.verify_file(model, integrity.hash_file(model).blake3)
    settings = EngineSettings(n_ctx=1024, threads=2)
    kit = engine.LlamaEngine.load([model], settings, model_id="m", chat_format_fallback="alpaca",
                                  variant=ggml.lib_dir() / "libggml-cpu-haswell.so")
    plain = llama_cpp.Llama(model_path=str(model), **engine.context_params(settings), verbose=False)
    plain.chat_handler = kit.llm.chat_handler  # the same prompt: the kit's alpaca format with its cue
    out = {"same": [], "steps": 0, "differ": []}
    questions = ["How do I purify water?", "What should a first aid kit contain?",
                 "Write a poem about the rain.", "How do I signal for help at night?",
                 "List ten things to pack for a flood, one per line."]
    for q in questions:
        msgs = [{"role": "user", "content": q}]
        mine = "".join(kit.stream(msgs, max_tokens=64, temperature=0.0))
        theirs = plain.create_chat_completion(messages=msgs, max_tokens=64, temperature=0.0, repeat_penalty=1.1,
                                              stop=kit.stop_strings)["choices"][0]["message"]["content"]
        out["same"].append([q, mine, theirs])
    # every step of a sampled answer: the candidates' token vs the full chain's (a clone: same
    # penalty history, same random state) on the same logits
    llm = kit.llm
    for temp, top_k in ((0.3, 40), (1.0, 40), (0.8, 100), (0.0, 40)):
        tokens = llm.tokenize(b"### Instruction:\\nTell me a story about a storm.\\n\\n### Response:\\n")
        llm.reset()
        llm.set_seed(7)
        mine = llm._init_sampler(temp=temp, top_k=top_k, repeat_penalty=1.1)
        assert type(mine).__name__ == "_CandidateSampler", type(mine)
        llm.eval(tokens)
        for _ in range(120):
            full = mine.chain.clone()
            theirs = full.sample(llm._ctx, -1)
            token = mine.sample(llm._ctx, -1)
            out["steps"] += 1
            if token != theirs:
                out["differ"].append([temp, token, theirs])
            llm.eval([token])
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def child_result(gemma_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(gemma_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_temperature_zero_answers_match_plain_llama_cpp_python(child_result):
    for question, mine, theirs in child_result["same"]:
        assert mine.strip(), question
        assert mine == theirs, question


@pytest.mark.slow
def test_every_sampled_token_matches_the_full_chain(child_result):
    assert child_result["steps"] == 480
    assert child_result["differ"] == []


def defaults(**overrides) -> dict:
    params = {"top_k": 40, "temp": 0.3, "repeat_penalty": 1.1, "frequency_penalty": 0.0, "presence_penalty": 0.0,
              "mirostat_mode": 0, "logits_processor": None, "grammar": None}
    return params | overrides


def test_candidates_cover_top_k_plus_every_penalised_token():
    assert candidates_needed(defaults(), 64) == 40 + 64  # the chat's settings
    assert candidates_needed(defaults(temp=0.0), 64) == 1 + 64  # greedy: the top one
    assert candidates_needed(defaults(temp=0.0, repeat_penalty=1.0), 64) == 1  # kit.engine.benchmark
    assert candidates_needed(defaults(), 0) == 40  # no history: no penalty
    assert candidates_needed(defaults(presence_penalty=0.5), 64) == 104


@pytest.mark.parametrize("override", [{"top_k": 0}, {"temp": -1.0}, {"mirostat_mode": 2},
                                      {"logits_processor": [print]}, {"grammar": object()},
                                      {"repeat_penalty": 0.9}, {"frequency_penalty": -0.1}])
def test_settings_that_need_the_whole_vocabulary(override):
    assert candidates_needed(defaults(**override), 64) is None
