"""Every key, read from the bindings it is handed, so the list cannot drift from what works.

The screen that opens help hands it (title, bindings) sections — its own, the app's and those of
the screens it opens — as posting's help screen is handed the widget; this module imports no
other screen."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from kit.tui.text import key_label

# Keys the widgets themselves handle (TextArea, lists); not in any screen's BINDINGS.
TEXT_BOX_KEYS = [
    ("Tab / Shift+Tab", "Move between the question and the conversation (then Up, Down, PgUp, PgDn scroll)"),
    ("Shift+arrows", "Select text; Ctrl+C copies it, Ctrl+X cuts, Ctrl+V pastes, Ctrl+Z undoes"),
    ("Up / Down, Enter", "In every list: move, then choose"),
]


def binding_rows(bindings) -> list[tuple[str, str]]:
    return [(key_label(b.key), b.tooltip or b.description) for b in bindings
            if isinstance(b, Binding) and b.description]


Section = tuple[str, list]  # (title, bindings)


def help_sections(sections: list[Section]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(keys, what they do)]) per section, plus the keys the text box handles itself."""
    return [(title, binding_rows(bindings)) for title, bindings in sections] + [("Typing", TEXT_BOX_KEYS)]


def help_table(sections: list[Section]) -> Table:
    """Keys in one column, what they do wrapped in the other (readable at 80 columns)."""
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column()
    for i, (title, rows) in enumerate(help_sections(sections)):
        if i:
            table.add_row("", "")
        table.add_row(Text(title, style="bold underline"), "")
        for keys, what in rows:
            table.add_row(Text("  " + keys), Text(what))
    return table


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,f1,ctrl+g", "close", "Back")]

    def __init__(self, sections: list[Section]):
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="help-box"):
            yield Static(Content("Keys"), classes="dialog-title")
            yield Static(help_table(self.sections), id="help-text")
            yield Static(Content("Esc closes any window. The mouse works too, but is never needed."),
                         id="help-footnote")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#help-box").focus()

    def action_close(self) -> None:
        self.dismiss(None)
