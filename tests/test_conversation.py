"""One starting point for every front end (kit.conversation), and what `kit ask` and the chat say
when an answer ends badly: the same first messages for the same question, one sentence for an
empty answer (ask exits non-zero), the loop note.

`kit ask` runs here through kit.cli.main with kit.launch.start handing it a session over the
tests' tiny stick and FakeEngine, the chat through Pilot with the same engine: both record the
messages they send. The last test asks the real demo model through `kit ask`.
"""

from __future__ import annotations

import pytest
from conftest import LOOPING_QUESTIONS, FakeEngine, run_kit
from test_tui import PRESETS, FakeStarter, answered, ask, make_session, started, write_stick

from kit import cli, launch
from kit.conversation import LOOP_NOTE, NO_PRESET, EmptyAnswerError, choose_preset, first_messages
from kit.errors import PlanError
from kit.tui.app import make_app

QUESTION = "How do I purify water?"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def stick(tmp_path):
    return write_stick(tmp_path / "stick")


@pytest.fixture
def state(tmp_path):
    path = tmp_path / "state"
    path.mkdir()
    return path


def test_the_default_preset_is_the_sticks_first_and_none_means_none():
    assert choose_preset(PRESETS) is PRESETS[0]
    assert choose_preset(PRESETS, "first-aid") is PRESETS[1]
    assert choose_preset(PRESETS, NO_PRESET) is None
    assert choose_preset((), None) is None  # a stick without presets
    with pytest.raises(PlanError, match="no preset 'nope'") as err:
        choose_preset(PRESETS, "nope")
    assert "general, first-aid, or 'none'" in err.value.hint


def test_first_messages_are_system_history_question():
    history = [{"role": "user", "content": "a", "stopped": False}, {"role": "assistant", "content": "b"}]
    msgs = first_messages("Hi", PRESETS[0], history)
    assert msgs == [{"role": "system", "content": PRESETS[0].system}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "Hi"}]
    assert first_messages("Hi", None) == [{"role": "user", "content": "Hi"}]


def test_the_empty_answer_sentence_says_what_to_try():
    err = EmptyAnswerError()
    assert err.sentence() == "The model gave no answer: rephrase the question, or try another preset or another model."
    assert err.exit_code != 0


def ask_in_process(monkeypatch, stick, state, engine: FakeEngine, *args: str) -> int:
    """`kit ask QUESTION ARGS` with the session kit.launch.start would give, over the fake engine."""
    monkeypatch.setattr(launch, "start", lambda *a, **kw: make_session(stick, state=state, engine=engine))
    return cli.main(["ask", QUESTION, "--stick", str(stick), *args])


async def chat_prompt(stick, state, keys: tuple[str, ...]) -> list[dict]:
    """The messages the chat sends for QUESTION after pressing `keys` (e.g. to pick a preset)."""
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("Boil it.")
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot)
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        await ask(pilot, QUESTION)
        await answered(pilot)
    return starter.engine.prompts[0]


@pytest.mark.anyio
@pytest.mark.parametrize(("ask_args", "chat_keys", "system"), [
    ((), (), PRESETS[0].system),  # nothing chosen: the stick's default preset, in both
    (("--preset", "first-aid"), ("f2", "down", "enter"), PRESETS[1].system),
    (("--preset", "none"), ("f2", "down", "down", "enter"), None),
], ids=["default", "another", "none"])
async def test_ask_and_the_chat_send_the_same_first_messages(stick, state, monkeypatch, capsys, ask_args,
                                                             chat_keys, system):
    engine = FakeEngine()
    engine.enqueue("Boil it.")
    assert ask_in_process(monkeypatch, stick, state, engine, *ask_args) == 0
    sent_by_ask = engine.prompts[0]
    sent_by_chat = await chat_prompt(stick, state, chat_keys)
    assert sent_by_ask == sent_by_chat
    assert sent_by_ask[-1] == {"role": "user", "content": QUESTION}
    assert (sent_by_ask[0]["content"] if sent_by_ask[0]["role"] == "system" else None) == system


def test_ask_says_so_when_the_answer_is_empty_and_exits_non_zero(stick, state, monkeypatch, capsys):
    engine = FakeEngine()
    engine.enqueue([])
    code = ask_in_process(monkeypatch, stick, state, engine)
    err = capsys.readouterr().err
    assert code == EmptyAnswerError.exit_code != 0
    assert "kit: the model gave no answer" in err
    assert "rephrase the question, or try another preset or another model" in err


def test_ask_stops_a_loop_and_says_why(stick, state, monkeypatch, capsys):
    engine = FakeEngine()
    engine.enqueue(["Stay calm.\n\n"] + ["I will not let you down.\n\n"] * 200)
    assert ask_in_process(monkeypatch, stick, state, engine) == 0
    out, err = capsys.readouterr()
    assert out == "Stay calm.\n\n I will not let you down.\n\n\n"  # what came before the loop, one copy
    assert LOOP_NOTE in err
    assert engine.last_stats.completion_tokens < 10


@pytest.mark.slow
def test_ask_with_the_real_model_stops_its_loop(demo_stick):
    """Gemma 3 270M, greedy, asked for a poem or a story: a line over and over (the stick's default preset;
    the model alone: sources in the prompt change what it writes)."""
    for question in LOOPING_QUESTIONS:
        done = run_kit("ask", question, "--stick", str(demo_stick), "--temperature", "0", "--no-knowledge",
                       "--max-tokens", "300", "-q", env={"KIT_BUNDLE": ""})
        assert done.returncode == 0, done.stderr[-2000:]
        if LOOP_NOTE in done.stderr:
            break
    assert LOOP_NOTE in done.stderr, f"none of {LOOPING_QUESTIONS} looped on this kernel"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines and len(lines) == len(set(lines)), done.stdout  # each line once


@pytest.mark.slow
def test_ask_with_the_real_model_says_so_when_it_gives_no_answer(demo_stick):
    """Gemma 3 270M, greedy, with no system prompt, ends this answer before its first word."""
    done = run_kit("ask", "Translate 'water' into French.", "--preset", "none", "--stick", str(demo_stick),
                   "--temperature", "0", "--no-knowledge", env={"KIT_BUNDLE": ""})
    assert done.returncode == EmptyAnswerError.exit_code != 0, done.stdout + done.stderr[-2000:]
    assert "kit: the model gave no answer" in done.stderr
    assert "rephrase the question, or try another preset or another model" in done.stderr
    assert "Traceback" not in done.stderr
