"""Why the kit could not start, in three parts: what happened, what it means, what to do."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Static

from kit.paths import debug_enabled
from kit.plan import Overrides
from kit.tui.text import failure_parts, traceback_text


class FailureScreen(Screen):
    BINDINGS = [
        Binding("r", "retry", "Try again"),
        Binding("a", "automatic", "Let the kit choose"),
        Binding("q,escape", "app.quit", "Quit", show=False),
    ]

    def __init__(self, error: BaseException, overrides: Overrides):
        super().__init__()
        self.error = error
        self.overrides = overrides
        self.what, self.meaning, self.fix, self.exit_code = failure_parts(error)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="failure-box"):
            yield Static(Content("Survival Kit could not start"), id="failure-title")
            for heading, text, name in (("What happened", self.what, "what"),
                                        ("What it means", self.meaning, "meaning"),
                                        ("What to do", self.fix, "fix")):
                yield Static(Content(heading), classes="failure-heading")
                yield Static(Content(text), id=f"failure-{name}", classes="failure-text")
            if debug_enabled():  # KIT_DEBUG=1: the traceback, for whoever fixes the kit
                yield Static(Content(traceback_text(self.error)), id="failure-traceback")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "automatic":  # only useful when the user had chosen something by hand
            return self.overrides != Overrides()
        return True

    def action_retry(self) -> None:
        self.app.restart(self.overrides, reason="Trying again.")

    def action_automatic(self) -> None:
        self.app.restart(Overrides(), reason="Starting with the kit's own choice of model and settings.")
