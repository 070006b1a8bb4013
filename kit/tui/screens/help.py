"""Every key, read from the screens' own bindings so the list cannot drift from what works."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from kit.tui.text import key_label

# Keys the widgets themselves handle (TextArea, lists); not in any screen's BINDINGS.
TEXT_BOX_KEYS = [
    ("Enter", "new line in the question"),
    ("Tab / Shift+Tab", "move between the question and the conversation (then Up/Down/PgUp/PgDn scroll)"),
    ("Shift+arrows", "select text; Ctrl+C copies it, Ctrl+X cuts, Ctrl+V pastes, Ctrl+Z undoes"),
    ("Up / Down, Enter", "in every list: move, then choose"),
]


def binding_lines(bindings) -> list[str]:
    lines = []
    for b in bindings:
        if not isinstance(b, Binding) or not b.description:
            continue
        lines.append(f"  {key_label(b.key):<22} {b.tooltip or b.description}")
    return lines


def help_text() -> str:
    from kit.tui.app import KitApp
    from kit.tui.screens.chat import ChatScreen
    from kit.tui.screens.history import HistoryScreen
    from kit.tui.screens.integrity import IntegrityScreen
    from kit.tui.screens.textview import TextViewScreen

    sections = [
        ("In the chat", [*ChatScreen.BINDINGS, *KitApp.BINDINGS]),
        ("Conversations (F4)", HistoryScreen.BINDINGS),
        ("Checking the stick (F6)", IntegrityScreen.BINDINGS),
        ("Copied answer and exports", TextViewScreen.BINDINGS),
    ]
    out = []
    for title, bindings in sections:
        out += [title, *binding_lines(bindings), ""]
    out += ["Typing", *[f"  {k:<22} {what}" for k, what in TEXT_BOX_KEYS], "",
            "Esc closes any window. The mouse works too, but is never needed."]
    return "\n".join(out)


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,f1,ctrl+g", "close", "Back")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="help-box"):
            yield Static(Content("Keys"), classes="dialog-title")
            yield Static(Content(help_text()), id="help-text")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#help-box").focus()

    def action_close(self) -> None:
        self.dismiss(None)
