"""The last answer's sources, to open one: the whole passage or article then shows in TextViewScreen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from kit.passages import Passage
from kit.tui.citations import CITED_MARK


class SourcesPicker(ModalScreen):
    """Each source as the answer numbers it, the cited ones marked. Dismisses with the chosen
    source's index (0-based), or None when closed."""

    BINDINGS = [Binding("escape", "close", "Back")]

    def __init__(self, sources: tuple[Passage, ...], cited: set[int]):
        super().__init__()
        self.sources = sources
        self.cited = cited

    def compose(self) -> ComposeResult:
        options = []
        for i, passage in enumerate(self.sources, 1):
            mark = CITED_MARK if i in self.cited else " " * len(CITED_MARK)
            options.append(Option(Content(f"{mark}[{i}] {passage.citation()}"), str(i - 1)))
        cited = f" ({CITED_MARK.strip()} = cited)" if self.cited else ""
        title = f"The last answer's sources{cited}.  Enter opens one, Esc goes back."
        with Vertical(classes="dialog"):
            yield Static(Content(title), classes="dialog-title")
            yield OptionList(*options, id="sources-list")
        yield Footer()

    def on_mount(self) -> None:
        option_list = self.query_one(OptionList)
        option_list.highlighted = min(self.cited, default=1) - 1
        option_list.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))

    def action_close(self) -> None:
        self.dismiss(None)
