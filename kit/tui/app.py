"""The one app factory: `kit chat` (through run), the frozen runtime and the tests all use make_app.

Screens: start (check and load, in a worker) → chat, or → failure. Over the chat: presets, models,
history, hardware, integrity, sources, help. A model switch goes back through start with new overrides.

The app owns the session: it closes the engine and the knowledge library when the session ends.
The library is checked in its own thread (session.knowledge.start_checking), whose news arrive as
KnowledgeChanged messages; a library survives a model switch on the same stick, so a large archive
is not hashed again.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from textual.app import App
from textual.binding import Binding
from textual.message import Message

from kit.conversation import AnswerSettings
from kit.history import Conversation, HistoryStore
from kit.knowledge import FAILED, SourceState
from kit.plan import Overrides
from kit.tui.screens.chat import ChatScreen
from kit.tui.screens.failure import FailureScreen
from kit.tui.screens.start import StartScreen

if TYPE_CHECKING:  # the type only: the screens are handed a started session
    from kit.knowledge import Library
    from kit.launch import Session

# starter(overrides, *, on_progress, on_status) -> kit.launch.Session; kit.launch.start bound to a stick.
Starter = Callable[..., "Session"]


def default_starter(stick: str | Path | None) -> Starter:
    from kit import launch

    return functools.partial(launch.start, stick)


def pick_theme(environ: Mapping[str, str]) -> str | None:
    """The terminal's own 16 colours where it may not have more (Linux console, plain xterm, screen)."""
    term = environ.get("TERM", "")
    if environ.get("COLORTERM", "").lower() in ("truecolor", "24bit") or "256color" in term:
        return None
    return "ansi-dark"


class KitApp(App[int]):
    CSS_PATH = "kit.tcss"
    TITLE = "Survival Kit"
    ENABLE_COMMAND_PALETTE = False  # ctrl+p picks a preset instead
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True, tooltip="Quit the kit")]

    class KnowledgeChanged(Message):
        """A knowledge source's check moved on (posted from the library's thread)."""

        def __init__(self, state: SourceState):
            super().__init__()
            self.state = state

    def __init__(self, starter: Starter, overrides: Overrides | None = None, *, theme: str | None = None,
                 settings: AnswerSettings | None = None, alone_starter: Starter | None = None,
                 use_knowledge: bool = True):
        super().__init__()
        self.starter = starter
        self.alone_starter = alone_starter  # with --pool: how to go on without it when a worker is lost
        self.overrides = overrides or Overrides()
        self.settings = settings or AnswerSettings()
        self.use_knowledge = use_knowledge  # the chat's toggle (kit chat --no-knowledge: off), kept over a switch
        self.session: Session | None = None
        self.history: HistoryStore | None = None
        self._carry: Conversation | None = None  # the conversation that survives a model switch
        self._library: Library | None = None  # the knowledge that survives a model switch
        self._reported: set[str] = set()  # damaged sources already notified
        if theme:
            self.theme = theme

    def on_mount(self) -> None:
        self.push_screen(StartScreen(self.overrides))

    async def action_quit(self) -> None:
        """Quit; after a failed start the exit code says why (as the CLI's would)."""
        self.exit(return_code=getattr(self.screen, "exit_code", 0))

    def on_unmount(self) -> None:
        self.close_knowledge()

    def close_knowledge(self) -> None:
        """The session's end: stop the check and close every source (run() closes the engine)."""
        for library in (self.session.knowledge if self.session else None, self._library):
            if library is not None:
                library.close()
        self._library = None

    # ------------------------------------------------------------------ knowledge

    def check_knowledge(self) -> None:
        """Start checking the session's knowledge in the background (once; the chat asks when it
        uses it, so `--no-knowledge` hashes nothing until the toggle turns it on)."""
        if self.session is not None:
            self.session.knowledge.start_checking(self._knowledge_changed)

    def _knowledge_changed(self, state: SourceState) -> None:  # the library's thread
        with contextlib.suppress(RuntimeError):  # the app has already ended
            self.post_message(self.KnowledgeChanged(state))

    def on_kit_app_knowledge_changed(self, message: KnowledgeChanged) -> None:
        state = message.state
        if state.state == FAILED and state.id not in self._reported:
            self._reported.add(state.id)
            self.notify(f"{state.name} is not used: {state.detail}", title="Knowledge", severity="error",
                        timeout=15, markup=False)
        for screen in self.screen_stack:
            if isinstance(screen, ChatScreen) and screen.is_mounted:
                screen.refresh_topbar()

    def _replace_top(self, screen) -> None:
        while len(self.screen_stack) > 2:  # close pickers and dialogs over the chat
            self.pop_screen()
        self.switch_screen(screen)

    def begin_chat(self, session: Session) -> None:
        self.session = session
        if self.history is None or self.history.state != session.state:  # kept across model switches
            self.history = HistoryStore(session.state)
        kept, self._library = self._library, None
        if kept is not None and kept is not session.knowledge:
            if kept.bundle.root == session.bundle.root and kept.manifest == session.manifest:
                session.knowledge.close()  # never started: the one already checked (or checking) goes on
                session.knowledge = kept
            else:
                kept.close()
        conversation, self._carry = self._carry, None
        self._replace_top(ChatScreen(session, self.history, conversation, self.settings,
                                     use_knowledge=self.use_knowledge))

    def show_failure(self, error: BaseException, overrides: Overrides) -> None:
        self._replace_top(FailureScreen(error, overrides))

    def restart(self, overrides: Overrides, *, reason: str = "") -> None:
        """Start again (another model, or after a failure); the old engine is closed first, its
        knowledge kept for the next session on the same stick."""
        if self.session is not None:
            self.session.engine.close()
            if self._library is not None and self._library is not self.session.knowledge:
                self._library.close()
            self._library = self.session.knowledge
            self.session: Session | None = None
        self.overrides = overrides
        self._replace_top(StartScreen(overrides, reason=reason))

    def go_on_alone(self, conversation: Conversation) -> None:
        """A pool worker was lost: start again without the pool (the largest model this computer
        holds alone), the conversation carried over."""
        if self.alone_starter is None:
            return
        self.starter, self.alone_starter = self.alone_starter, None
        self._carry = conversation
        self.restart(replace(self.overrides, model=None, gpu_layers=None),
                     reason="A pool worker stopped answering: going on with what this computer holds alone.")

    def switch_model(self, model_id: str, conversation: Conversation) -> None:
        self._carry = conversation
        self.restart(replace(self.overrides, model=model_id),
                     reason=f"Switching to {model_id}: checking and loading it.")


def make_app(stick: str | Path | None = None, overrides: Overrides | None = None, *,
             starter: Starter | None = None, theme: str | None = None,
             settings: AnswerSettings | None = None, alone_starter: Starter | None = None,
             use_knowledge: bool = True) -> KitApp:
    return KitApp(starter or default_starter(stick), overrides, theme=theme, settings=settings,
                  alone_starter=alone_starter, use_knowledge=use_knowledge)


def run(stick: str | Path | None, overrides: Overrides, settings: AnswerSettings | None = None, *,
        starter: Starter | None = None, use_knowledge: bool = True) -> int:
    """`kit chat`: the app in this terminal; the exit code says how it ended. `starter`: another
    way to start (kit chat --pool), with this stick's own as the way on when it is lost.
    `use_knowledge` False (kit chat --no-knowledge): the chat starts with the toggle off."""
    app = make_app(stick, overrides, starter=starter, theme=pick_theme(os.environ), settings=settings,
                   alone_starter=default_starter(stick) if starter else None, use_knowledge=use_knowledge)
    try:
        app.run()
    finally:
        app.close_knowledge()
        if app.session is not None:
            app.session.engine.close()
    return app.return_code or 0
