"""A text to read, select and copy by hand: the copy fallback, exports on a read-only stick, and
a source an answer cites. The text is plain (a TextArea): nothing in it is read as markup.

The clipboard escape (OSC 52) works in most terminals but not in a bare Linux console, so the
text is always also shown where it can be selected, and saved on the stick when asked.
"""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Static, TextArea

from kit.history import HistoryStore


class TextViewScreen(ModalScreen):
    BINDINGS = [
        Binding("ctrl+s", "save", "Save to stick", tooltip="Save the text into KIT/state/exports/"),
        Binding("escape", "close", "Back", tooltip="Close"),
    ]

    class Saved(Message):
        def __init__(self, text: str, error: bool = False):
            super().__init__()
            self.text, self.error = text, error

    def __init__(self, title: str, text: str, store: HistoryStore, *, note: str = "", save_name: str = "answer"):
        super().__init__()
        self.title_text = title
        self.text = text
        self.store = store
        self.note = note
        self.save_name = save_name  # the saved file's name ends -<save_name>.md

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="textview-box"):
            yield Static(Content(self.title_text), classes="dialog-title")
            if self.note:
                yield Static(Content(self.note), id="textview-note")
            yield TextArea(self.text, read_only=True, soft_wrap=True, id="textview-text")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "save":
            return self.store.persistent
        return True

    def action_save(self) -> None:
        self.save_worker()

    @work(thread=True, exclusive=True, group="textview-save")
    def save_worker(self) -> None:
        try:
            path = self.store.save_text(self.save_name, self.text)
        except OSError as err:
            self.post_message(self.Saved(f"Could not save: {err.strerror or err}", error=True))
            return
        if path is not None:
            self.post_message(self.Saved(f"Saved to {path}"))

    def on_text_view_screen_saved(self, message: Saved) -> None:
        self.notify(message.text, severity="error" if message.error else "information", timeout=10)

    def action_close(self) -> None:
        self.dismiss(None)
