"""Earlier conversations: reopen, delete (after a yes), export to Markdown.

The stick may be slow, so listing, exporting and deleting run in worker threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from kit.errors import KitError
from kit.history import Conversation, HistoryStore, Listing, to_markdown
from kit.tui.screens.textview import TextViewScreen


@dataclass
class HistoryResult:
    open: Conversation | None = None
    deleted: set[str] = field(default_factory=set)


def local_time(stamp: str) -> str:
    """'2025-03-01T12:00:00Z' as this computer's local time, to the minute."""
    try:
        moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return stamp
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog confirm"):
            yield Static(Content(self.question + "\n\nY = yes, N or Esc = no"))
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HistoryScreen(ModalScreen[HistoryResult]):
    BINDINGS = [
        Binding("enter", "open", "Open", tooltip="Reopen the conversation to read or continue it"),
        Binding("d,delete", "delete", "Delete", tooltip="Delete the conversation (asks first)"),
        Binding("e", "export", "Export",
                tooltip="Write it as Markdown to KIT/state/exports/ (read-only stick: show it)"),
        Binding("escape", "close", "Back", tooltip="Back to the chat"),
    ]

    class Listed(Message):
        def __init__(self, listing: Listing):
            super().__init__()
            self.listing = listing

    class Exported(Message):
        def __init__(self, title: str, path=None, markdown: str = "", error: str = ""):
            super().__init__()
            self.title, self.path, self.markdown, self.error = title, path, markdown, error

    def __init__(self, store: HistoryStore, current: Conversation, speaker: str,
                 preset_name: Callable[[str | None], str]):
        super().__init__()
        self.store = store
        self.current = current
        self.speaker = speaker
        self.preset_name = preset_name
        self.listing = Listing(())
        self.result = HistoryResult()

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="history-box"):
            where = "saved on the stick" if self.store.persistent else "kept until you quit (read-only stick)"
            yield Static(Content(f"Conversations, {where}."), classes="dialog-title")
            yield Static(Content("Reading..."), id="history-note")
            yield OptionList(id="history-list")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()
        self.load_listing()

    @work(thread=True, exclusive=True, group="history-list")
    def load_listing(self) -> None:
        self.post_message(self.Listed(self.store.list()))

    def on_history_screen_listed(self, message: Listed) -> None:
        self.listing = message.listing
        option_list = self.query_one(OptionList)
        option_list.clear_options()
        for s in self.listing.conversations:
            mark = "* " if s.id == self.current.id else "  "
            option_list.add_option(Option(Content(f"{mark}{local_time(s.updated)}  {s.title}  "
                                                  f"({s.messages} messages)"), s.id))
        notes = []
        if not self.listing.conversations:
            notes.append("No conversations yet: they appear here after the first answer.")
        else:
            notes.append("Enter opens · D deletes · E exports · Esc goes back.")
        if self.listing.unreadable:
            notes.append(f"{len(self.listing.unreadable)} file(s) could not be read and are not shown: "
                         + "; ".join(self.listing.unreadable[:3]))
        self.query_one("#history-note", Static).update(Content("\n".join(notes)))
        ids = [c.id for c in self.listing.conversations]
        if ids:  # start on the open conversation when it is saved, else on the newest
            option_list.highlighted = ids.index(self.current.id) if self.current.id in ids else 0

    def selected_id(self) -> str | None:
        option_list = self.query_one(OptionList)
        if option_list.highlighted is None or not self.listing.conversations:
            return None
        return option_list.get_option_at_index(option_list.highlighted).id

    def selected_title(self) -> str:
        conv_id = self.selected_id()
        return next((s.title for s in self.listing.conversations if s.id == conv_id), "")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        conv_id = self.selected_id()
        if conv_id is None:
            return
        try:
            self.result.open = self.store.load(conv_id)
        except KitError as err:
            self.notify(f"{err}: {err.hint}", severity="error")
            return
        self.dismiss(self.result)

    def action_delete(self) -> None:
        conv_id = self.selected_id()
        if conv_id is None:
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.delete_worker(conv_id)

        self.app.push_screen(ConfirmScreen(f'Delete "{self.selected_title()}"? This cannot be undone.'),
                             confirmed)

    @work(thread=True, group="history-write")
    def delete_worker(self, conv_id: str) -> None:
        try:
            self.store.delete(conv_id)
        except OSError as err:
            self.post_message(self.Exported("", error=f"Could not delete it: {err.strerror or err}"))
            return
        self.result.deleted.add(conv_id)
        self.post_message(self.Listed(self.store.list()))

    def action_export(self) -> None:
        conv_id = self.selected_id()
        if conv_id is not None:
            self.export_worker(conv_id)

    @work(thread=True, group="history-write")
    def export_worker(self, conv_id: str) -> None:
        try:
            conv = self.store.load(conv_id)
            markdown = to_markdown(conv, assistant=self.speaker, preset=self.preset_name(conv.preset_id))
            path = self.store.export(conv, markdown)
        except KitError as err:
            self.post_message(self.Exported("", error=f"{err}: {err.hint}"))
        except OSError as err:
            self.post_message(self.Exported("", error=f"Could not write the export: {err.strerror or err}"))
        else:
            self.post_message(self.Exported(conv.title, path, markdown))

    def on_history_screen_exported(self, message: Exported) -> None:
        if message.error:
            self.notify(message.error, severity="error", timeout=10)
        elif message.path is not None:
            self.notify(f"Saved to {message.path}", timeout=10)
        else:
            self.app.push_screen(TextViewScreen(
                message.title, message.markdown, self.store,
                note="This stick is read-only, so the export is shown here: select it with Shift+arrows "
                     "and copy with Ctrl+C."))

    def action_close(self) -> None:
        self.dismiss(self.result)
