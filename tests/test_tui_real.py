"""The chat with the real Gemma 3 270M: through Pilot with the real kit.launch.start, and as
`kit chat` in a real terminal (tmux). Both use one demo stick built per test session.

Slow: the first start on a machine probes the CPU kernels (30-90 s, minutes on a loaded box);
the probe verdict is then cached in the stick's state/ folder.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import LOOPING_QUESTIONS
from test_tui import answers, ask, screen_text, wait_for
from tmuxdrv import KIT, Tmux, ask_and_stop, shared_demo_stick

from kit.conversation import LOOP_NOTE, AnswerSettings, EmptyAnswerError
from kit.history import HistoryStore
from kit.plan import Overrides
from kit.tui.app import make_app
from kit.tui.screens.chat import ChatScreen

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 900  # kernel probe on a busy 2-core machine


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def demo_stick(tmp_path_factory) -> Path:
    return shared_demo_stick(tmp_path_factory)


@pytest.mark.anyio
async def test_real_model_answers_through_the_ui(demo_stick, monkeypatch):
    monkeypatch.delenv("KIT_STATE_DIR", raising=False)
    app = make_app(demo_stick, Overrides())  # the default starter: kit.launch.start on this stick
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), timeout=START_TIMEOUT_S,
                       what="the model to load")
        chat = app.screen
        assert chat.session.plan.model_id == "gemma-3-270m"
        await wait_for(pilot, lambda: "Gemma 3 270M" in screen_text(app), what="the chat to draw")
        await ask(pilot, "How do I purify water?")
        await wait_for(pilot, lambda: chat.generation is None or len(answers(chat)[0].split()) >= 12,
                       timeout=300, what="the answer to stream")
        if chat.generation is not None:
            await pilot.press("escape")  # enough shown: the rest would only cost time
        await wait_for(pilot, lambda: chat.generation is None, timeout=60, what="the answer to end")
        answer = chat.conversation.messages[-1]
        assert answer["role"] == "assistant" and answer["content"].strip()
        stats = chat.session.engine.last_stats
        assert stats.completion_tokens > 0 and stats.tokens_per_s > 0
        assert 0 < stats.context_used <= chat.session.engine.n_ctx
        assert re.search(r"tok/s · context \d+ of \d+ tokens", screen_text(app))
        state = chat.session.state
        await wait_for(pilot, lambda: any(s.id == chat.conversation.id
                                          for s in HistoryStore(state).list().conversations), what="save")


@pytest.mark.anyio
async def test_the_chat_stops_a_real_loop_and_keeps_its_start(demo_stick, monkeypatch):
    """Gemma 3 270M, greedy, asked for a poem or a story, writes one line over and over until the token limit."""
    monkeypatch.delenv("KIT_STATE_DIR", raising=False)
    app = make_app(demo_stick, Overrides(), settings=AnswerSettings(max_tokens=400, temperature=0.0),
                   use_knowledge=False)  # the model alone: sources in the prompt change what it writes
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), timeout=START_TIMEOUT_S,
                       what="the model to load")
        chat = app.screen
        for question in LOOPING_QUESTIONS:
            await pilot.press("ctrl+n")  # each question alone: the history would change the answer
            await ask(pilot, question)
            await wait_for(pilot, lambda: chat.generation is None and answers(chat), timeout=300,
                           what="the answer")
            stats = chat.session.engine.last_stats
            if stats.looped:
                break
        assert stats.looped and stats.completion_tokens < 400, f"none of {LOOPING_QUESTIONS} looped: {answers(chat)}"
        await wait_for(pilot, lambda: LOOP_NOTE in screen_text(app), what="the note")
        kept = [line for line in chat.conversation.messages[-1]["content"].splitlines() if line.strip()]
        assert kept and len(kept) == len(set(kept))  # what came before the loop, the repeated line once


@pytest.mark.anyio
async def test_the_chat_says_so_when_the_real_model_gives_no_answer(demo_stick, monkeypatch):
    """Gemma 3 270M, greedy, with no preset, ends this answer before its first word (as `kit ask
    --preset none` does: tests/test_conversation.py)."""
    monkeypatch.delenv("KIT_STATE_DIR", raising=False)
    app = make_app(demo_stick, Overrides(), settings=AnswerSettings(temperature=0.0),
                   use_knowledge=False)  # the model alone: sources in the prompt change what it writes
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), timeout=START_TIMEOUT_S,
                       what="the model to load")
        chat = app.screen
        await pilot.press("f2")
        await pilot.pause()
        await pilot.press("end", "enter")  # the last choice: No preset
        await wait_for(pilot, lambda: chat.conversation.preset_id is None, what="no preset")
        await ask(pilot, "Translate 'water' into French.")
        await wait_for(pilot, lambda: chat.generation is None and answers(chat), timeout=300, what="the answer")
        assert EmptyAnswerError().sentence() in answers(chat)[0]
        await wait_for(pilot, lambda: "The model gave no answer: rephrase the question" in screen_text(app),
                       what="the sentence on screen")
        assert chat.query_one("#question").text == "Translate 'water' into French."  # to rephrase it


def test_kit_chat_in_a_real_terminal(demo_stick):
    with Tmux(width=100, height=30) as term:
        term.start([KIT, "chat", "--stick", demo_stick], env={"NO_COLOR": "1", "KIT_BUNDLE": ""})
        term.wait_for("Enter sends", timeout=START_TIMEOUT_S)
        assert "Gemma 3 270M" in term.screen()

        term.type("How do I purify water?")
        term.keys("C-j")  # a new line, not sent
        term.type("Answer briefly.")
        screen = term.wait_for(lambda s: "Answer briefly." in s, timeout=30)
        assert "Ready" in screen and "Answering" not in screen
        term.keys("Enter")  # sends both lines: the transcript shows them one under the other, the box empties
        term.wait_for(lambda s: re.search(r"How do I purify water\?\s*│?\s*\n.*Answer briefly\.", s) is not None
                      and "Type your question, then press Enter" in s, timeout=60)
        first = term.wait_for(lambda s: re.search(r"[\d.]+ tok/s · context \d+ of \d+ tokens", s) is not None,
                              timeout=180)  # streamed in and ended: speed and context use show
        assert "Answering" not in first

        term.keys("C-n")
        term.wait_for(lambda s: "tok/s ·" not in s, timeout=30)
        screen = ask_and_stop(term)  # Esc stops an answer, not the chat
        assert re.search(r"Stopped · [\d.]+ tok/s · context \d+ of \d+ tokens", screen)
        assert "stopped ─" in screen and "Enter sends" in screen

        # quitting in the middle of the next answer (or just after it) ends at once, with exit code 0
        term.keys("C-n")
        term.wait_for(lambda s: "Stopped ·" not in s, timeout=30)
        term.type("Tell me a long story about mountains.")
        term.keys("Enter")
        term.wait_for(lambda s: re.search(r"Answering\.\.\. \d+ tokens|tok/s ·", s) is not None, timeout=180)
        term.keys("C-q")
        assert term.wait_exit(timeout=60) == 0

    saved = [json.loads(p.read_text()) for p in (demo_stick / "KIT" / "state" / "history").glob("*.json")]
    conv = next((c for c in saved if c["messages"]
                 and c["messages"][0]["content"] == "How do I purify water?\nAnswer briefly."), None)
    if conv is None:  # the tiny model wrote nothing (it samples): the chat said so and kept no turn
        assert "The model gave no answer" in first
    else:
        assert [m["role"] for m in conv["messages"][:2]] == ["user", "assistant"]
    stopped = [c for c in saved if len(c["messages"]) > 1 and c["messages"][1].get("stopped") is True]
    assert stopped and stopped[0]["messages"][1]["content"].strip()


def test_kit_chat_with_a_pool_in_a_real_terminal(demo_stick):
    """`kit chat --pool` in tmux: the chat's start runs in a worker thread that returns at once;
    the pooled llama-server it started must live on (kit.child's spawner thread), answer, and go
    with the chat."""
    from poolkit import read_facts, workers

    with workers(demo_stick, ["127.0.0.2"]) as (worker,), Tmux(width=100, height=30) as term:
        term.start([KIT, "chat", "--stick", demo_stick, "--pool", worker.endpoint],
                   env={"NO_COLOR": "1", "KIT_BUNDLE": ""})
        term.wait_for("Enter sends", timeout=START_TIMEOUT_S)
        time.sleep(1.0)  # the start thread has ended by now
        term.type("How do I purify water?")
        term.keys("Enter")
        screen = term.wait_for(lambda s: re.search(r"[\d.]+ tok/s · context \d+ of \d+ tokens", s) is not None
                               or "stopped with an error" in s, timeout=180)
        assert "stopped with an error" not in screen, screen
        assert read_facts(worker)["busy"]  # the chat's llama-server holds the worker: the layers are there
        term.keys("C-q")
        assert term.wait_exit(timeout=60) == 0


DEMO_PACK = Path(__file__).resolve().parents[1] / "manifests" / "knowledge" / "demo"


def test_kit_chat_cites_the_demo_pack_and_opens_a_source(demo_stick):
    """The demo stick carries a knowledge pack: the answer's sources show under it, and the
    Sources key opens the first one's document, whose text is then on screen."""
    from kit.passages import cut_markdown

    with Tmux(width=100, height=30) as term:
        term.start([KIT, "chat", "--stick", demo_stick], env={"NO_COLOR": "1", "KIT_BUNDLE": ""})
        term.wait_for("Enter sends", timeout=START_TIMEOUT_S)
        term.wait_for("knowledge: on (1 source)", timeout=120)
        term.type("How do I purify water?")
        term.keys("Enter")
        screen = term.wait_for(lambda s: (re.search(r"[\d.]+ tok/s · context \d+", s) is not None
                                          and "Answering" not in s) or "stopped with an error" in s, timeout=300)
        assert "stopped with an error" not in screen, screen  # ended (the stats line may be cut at 80 columns)
        first = re.search(r"^\W*(?:\* )?\[1\] (.+?) \(survival-demo: ([^)\s]+)\)", screen, re.M)
        heading = re.search(r"Sources \((\* = cited in the answer; )?F8 opens one\):", screen)
        assert first is not None and heading is not None, screen
        path = first.group(2)
        assert (DEMO_PACK / path).is_file()  # a document of the demo pack
        document = cut_markdown((DEMO_PACK / path).read_text(encoding="utf-8"), path, "survival-demo")
        term.keys("F8")
        term.wait_for("The last answer's sources", timeout=30)
        term.keys("Home", "Enter")  # the first source
        opened = term.wait_for("From survival-demo: " + path, timeout=30)
        assert document[0].title in opened
        assert document[0].text.split("\n")[0][:40] in opened  # the document's own text, from its start
        term.keys("Escape")
        term.wait_for(lambda s: "From survival-demo" not in s and "Enter sends" in s, timeout=30)
        term.keys("C-q")
        assert term.wait_exit(timeout=60) == 0
