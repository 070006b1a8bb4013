"""This computer and the plan: what `kit doctor` shows, from the running session (nothing re-probed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from kit.report import render_doctor

if TYPE_CHECKING:  # the type only: the screens are handed a started session
    from kit.launch import Session


def hardware_text(session: Session) -> str:
    """`kit doctor`'s text for the running session (kit.report's one renderer), with what only
    the chat knows: the fallbacks taken while starting and where state goes."""
    report = session.report()
    text = render_doctor(report)  # its first line names the stick
    if report.fallback_steps:
        text += "\n\nFallbacks taken while starting:\n" + "\n".join(f"  {s}" for s in report.fallback_steps)
    state = session.state if session.state is not None else "none: the stick is read-only, nothing is saved"
    return text + f"\n\nState folder: {state}"


class HardwareScreen(ModalScreen):
    BINDINGS = [Binding("escape,q", "close", "Back")]

    def __init__(self, session: Session):
        super().__init__()
        self.session = session

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="hardware-box"):
            yield Static(Content("This computer and the kit's choices"), classes="dialog-title")
            yield Static(Content(hardware_text(self.session)), id="hardware-text")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#hardware-box").focus()

    def action_close(self) -> None:
        self.dismiss(None)
