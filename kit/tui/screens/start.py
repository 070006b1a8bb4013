"""Starting: check the model's bytes, choose the CPU kernel, load — in a worker thread.

The starter is injected (make_app(starter=...)): kit.launch.start in real use, a fake in tests.
Its callbacks run in the worker thread and reach this screen only as messages.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static

from kit.integrity import Progress
from kit.plan import Overrides
from kit.tui.widgets.progress import ByteProgress, throttled_progress

if TYPE_CHECKING:  # the type only: the screens are handed a started session
    from kit.launch import Session

STATUS_LINES = 8


class StartCancelled(Exception):
    """Raised inside the starter's callbacks when the user quits: ends a long start early."""


class StartScreen(Screen):
    BINDINGS = [Binding("ctrl+q", "app.quit", "Quit", priority=True)]
    SHOW_ELAPSED_AFTER_S = 5.0  # a long kernel probe shows a ticking clock: the kit is alive

    class StatusLine(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    class ProgressUpdate(Message):
        def __init__(self, progress: Progress):
            super().__init__()
            self.progress = progress

    class Started(Message):
        def __init__(self, session: Session):
            super().__init__()
            self.session = session

    class Failed(Message):
        def __init__(self, error: BaseException):
            super().__init__()
            self.error = error

    def __init__(self, overrides: Overrides, *, reason: str = ""):
        super().__init__()
        self.overrides = overrides
        self.reason = reason
        self.lines: list[str] = []
        self.cancel = threading.Event()
        self.began = time.monotonic()

    def compose(self) -> ComposeResult:
        with Vertical(id="start-box"):
            yield Static(Content("Survival Kit is starting"), id="start-title")
            yield Static(Content(self.reason or "Checking the model on the stick, then loading it. "
                                 "This takes a minute the first time on a new computer."), id="start-intro")
            yield ByteProgress(id="start-progress")
            yield Static(id="start-status")
            yield Static(id="start-elapsed")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1.0, self.tick)
        self.run_starter()

    def on_unmount(self) -> None:
        self.cancel.set()

    def tick(self) -> None:
        elapsed = time.monotonic() - self.began
        if elapsed >= self.SHOW_ELAPSED_AFTER_S:
            self.query_one("#start-elapsed", Static).update(Content(
                f"Working... {int(elapsed)} s. On a new computer the kit tests which CPU programs run "
                "fastest here; this can take a few minutes once, then it is remembered."))

    @work(thread=True, exclusive=True, group="start")
    def run_starter(self) -> None:
        on_progress = throttled_progress(lambda p: self.post_message(self.ProgressUpdate(p)), self.cancel,
                                         StartCancelled)

        def on_status(text: str) -> None:
            if self.cancel.is_set():
                raise StartCancelled
            self.post_message(self.StatusLine(text))

        try:
            session = self.app.starter(self.overrides, on_progress=on_progress, on_status=on_status)
        except StartCancelled:
            return
        except Exception as err:  # every failure becomes the failure screen, never a traceback
            self.post_message(self.Failed(err))
            return
        if self.cancel.is_set():  # quit while loading: free the model now
            session.engine.close()
            return
        self.post_message(self.Started(session))

    def on_start_screen_status_line(self, message: StatusLine) -> None:
        self.lines = (self.lines + [message.text])[-STATUS_LINES:]
        self.query_one("#start-status", Static).update(Content("\n".join(self.lines)))

    def on_start_screen_progress_update(self, message: ProgressUpdate) -> None:
        self.query_one(ByteProgress).show(message.progress)

    def on_start_screen_started(self, message: Started) -> None:
        self.app.begin_chat(message.session)

    def on_start_screen_failed(self, message: Failed) -> None:
        self.app.show_failure(message.error, self.overrides)
