"""Snapshots of every screen as plain text, at 80x24 (the smallest terminal we promise) and 120x40.

Plain text, not SVG: a diff shows what a person would see change, and colours cannot make it flaky.
Timings are pinned (SteadyEngine), times are UTC, temp paths are masked.
Regenerate after an intended change with:  TUI_SNAPSHOT_UPDATE=1 pytest tests/test_tui_snapshots.py
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FakeEngine
from test_tui import KNOWLEDGE_DOCS, FakeStarter, screen_text, started, wait_for, write_stick

from kit.errors import IntegrityError
from kit.history import Conversation, HistoryStore
from kit.tui.app import make_app
from kit.tui.screens.chat import ChatScreen
from kit.tui.screens.failure import FailureScreen
from kit.tui.screens.start import StartScreen

SNAPSHOTS = Path(__file__).parent / "snapshots" / "tui"
SIZES = [(80, 24), (120, 40)]
UPDATE = os.environ.get("TUI_SNAPSHOT_UPDATE", "") not in ("", "0")

KNOWLEDGE_ANSWER = "Bring it to a rolling boil for one minute [1], then let it cool, covered."
ANSWER = ("To make water safe:\n\n1. **Boil** it for one full minute.\n2. Let it cool, covered.\n\n"
          "If you cannot boil it, use `purification tablets` as the pack says.")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@dataclass
class SteadyEngine(FakeEngine):
    """FakeEngine whose clock says 25 tokens a second, whatever the machine's load."""

    def stream(self, messages, **kwargs):
        for token in super().stream(messages, **kwargs):
            self.last_stats.seconds = self.last_stats.completion_tokens / 25
            yield token


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def compare(name: str, text: str, tmp: Path) -> None:
    text = re.sub(re.escape(str(tmp)) + r"\S*", "<TMP>", text) + "\n"
    path = SNAPSHOTS / f"{name}.txt"
    if UPDATE or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"new snapshot {path.name} written: check it, then run again")
        return
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{name} changed; if intended, rerun with TUI_SNAPSHOT_UPDATE=1\n{text}"


def saved_conversations(state: Path) -> None:
    store = HistoryStore(state)
    for i, (q, a) in enumerate([("How do I treat a burn?", "Cool it under running water for 20 minutes."),
                                ("Morse code for SOS?", "Three short, three long, three short.")]):
        conv = Conversation(f"2025060{i + 1}-120000-0000000{i}", f"2025-06-0{i + 1}T12:00:00Z",
                            f"2025-06-0{i + 1}T12:30:00Z", [], "tiny", "general")
        conv.messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        store.save(conv)


@pytest.fixture
def tmp_path():
    """A temp folder whose path always has the same length (pytest's grows with its run counter):
    the stick's path is on screen, and a longer one would wrap the snapshot differently."""
    path = Path(tempfile.mkdtemp(prefix="kit-snap-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stick_and_state(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    saved_conversations(state)
    return write_stick(tmp_path / "stick"), state


async def keys_shown(pilot, app) -> None:
    """The footer shows the question box's keys once the box has focus (a frame after the chat)."""
    await wait_for(pilot, lambda: "⏎ Send" in screen_text(app), what="the question box's keys in the footer")


@pytest.mark.anyio
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_start_and_failure_snapshots(size, tmp_path, stick_and_state, monkeypatch):
    monkeypatch.setattr(StartScreen, "SHOW_ELAPSED_AFTER_S", 3600)
    stick, state = stick_and_state
    gate = threading.Event()
    error = IntegrityError("model tiny is damaged: models/tiny/tiny.gguf is corrupt: contents differ from "
                           "the manifest (BLAKE3 mismatch)")
    app = make_app(starter=FakeStarter(stick, state, gate=gate, error=error))
    tag = f"{size[0]}x{size[1]}"
    async with app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: "MiB/s" in screen_text(app) and "probed" in screen_text(app),
                       what="progress")
        compare(f"start-{tag}", screen_text(app), tmp_path)
        gate.set()
        await wait_for(pilot, lambda: isinstance(app.screen, FailureScreen), what="the failure screen")
        await pilot.pause()
        compare(f"failure-{tag}", screen_text(app), tmp_path)


@pytest.mark.anyio
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_chat_and_window_snapshots(size, tmp_path, stick_and_state):
    stick, state = stick_and_state
    starter = FakeStarter(stick, state, engine=SteadyEngine())
    starter.engine.enqueue(ANSWER)
    app = make_app(starter=starter)
    tag = f"{size[0]}x{size[1]}"
    async with app.run_test(size=size) as pilot:
        chat = await started(pilot)
        await keys_shown(pilot, app)
        compare(f"chat-empty-{tag}", screen_text(app), tmp_path)
        # windows first, over the saved conversations only
        for key, name, ready in [("f2", "presets", "No preset"), ("f3", "models", "does not fit"),
                                 ("f4", "history", "Morse code"), ("f1", "help", "In the chat"),
                                 ("f5", "hardware", "Plan: model tiny")]:
            await pilot.press(key)
            await wait_for(pilot, lambda ready=ready: ready in screen_text(app), what=name)
            await pilot.pause(0.1)
            compare(f"{name}-{tag}", screen_text(app), tmp_path)
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat")
        # the answer last: saving it adds a conversation stamped now to the history list
        chat.query_one("#question").text = "How do I make water safe to drink?"
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.generation is None and "tablets" in screen_text(app), what="answer")
        await pilot.pause(0.2)
        compare(f"chat-answer-{tag}", screen_text(app), tmp_path)


@pytest.mark.anyio
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_read_only_snapshot(size, tmp_path):
    stick = write_stick(tmp_path / "stick")
    app = make_app(starter=FakeStarter(stick, None, engine=SteadyEngine()))
    async with app.run_test(size=size) as pilot:
        await started(pilot)
        await keys_shown(pilot, app)
        compare(f"chat-read-only-{size[0]}x{size[1]}", screen_text(app), tmp_path)


@pytest.mark.anyio
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_sources_snapshots(size, tmp_path):
    """A stick with knowledge: its state in the top bar, an answer's sources under it, the picker."""
    state = tmp_path / "state"
    state.mkdir()
    starter = FakeStarter(write_stick(tmp_path / "stick", knowledge=KNOWLEDGE_DOCS), state, engine=SteadyEngine())
    starter.engine.enqueue(KNOWLEDGE_ANSWER)
    app = make_app(starter=starter)
    tag = f"{size[0]}x{size[1]}"
    async with app.run_test(size=size) as pilot:
        chat = await started(pilot)
        await keys_shown(pilot, app)
        await wait_for(pilot, lambda: "knowledge: on (1 source)" in screen_text(app), what="the check")
        chat.query_one("#question").text = "How do I purify water by boiling?"
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.generation is None and "cited in the answer" in screen_text(app),
                       what="the answer and its sources")
        await pilot.pause(0.2)
        compare(f"chat-sources-{tag}", screen_text(app), tmp_path)
        await pilot.press("f8")
        await wait_for(pilot, lambda: "The last answer's sources" in screen_text(app), what="the picker")
        await pilot.pause(0.1)
        compare(f"sources-{tag}", screen_text(app), tmp_path)
