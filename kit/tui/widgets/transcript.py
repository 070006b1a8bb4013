"""The conversation on screen: questions as plain text, answers as Markdown that streams in, each
with the sources it was given under it (and, when the search found none, the sentence that says so)."""

from __future__ import annotations

from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Static

from kit.grounding import NOTHING_FOUND, cited
from kit.history import Conversation
from kit.passages import Passage
from kit.tui.citations import from_stored, source_lines
from kit.tui.widgets.markdown_lines import MarkdownLines


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(Content(text), classes="message")
        self.border_title = "You"


class AnswerMessage(Vertical):
    """One answer; `append` streams fragments in, `finish` says how it ended. `set_sources` shows
    what it was given to cite (before the first word: the search runs first); the ones the answer
    cites are marked once it is finished. Passages are shown as plain text, never as markup."""

    def __init__(self, speaker: str, text: str = "", *, note: str = "", sources: tuple[Passage, ...] = (),
                 nothing_found: bool = False):
        super().__init__(classes="message")
        self.speaker = speaker
        self.border_title = speaker
        self.markdown = MarkdownLines(text)
        self.sources = tuple(sources)
        self.nothing_found = nothing_found
        self.done = bool(text)  # an answer from the history is whole
        self.nothing_found_line = Static(Content(NOTHING_FOUND), classes="nothing-found")
        self.sources_list = Static(classes="sources")
        if note:
            self.border_subtitle = note

    @property
    def text(self) -> str:
        return self.markdown.text

    @property
    def cited(self) -> set[int]:
        """The source numbers the finished answer refers to."""
        return set(cited(self.text, len(self.sources))) if self.done else set()

    def compose(self):
        yield self.nothing_found_line
        yield self.markdown
        yield self.sources_list

    def on_mount(self) -> None:
        self._show_sources()

    def set_sources(self, sources: tuple[Passage, ...], *, nothing_found: bool, unchecked: tuple[str, ...] = ()
                    ) -> None:
        """`unchecked`: sources not searched because their check has not ended; said when the answer
        has no source."""
        self.sources, self.nothing_found = tuple(sources), nothing_found
        if unchecked and not sources:
            waiting = f"Not searched yet, still being checked: {', '.join(unchecked)}."
            self.nothing_found = True
            self.nothing_found_line.update(Content(
                f"{NOTHING_FOUND} {waiting}" if nothing_found else
                f"{waiting} The answer below is the model's alone and can be wrong."))
        self._show_sources()

    def _show_sources(self) -> None:
        self.nothing_found_line.display = self.nothing_found
        self.sources_list.display = bool(self.sources)
        if self.sources:
            lines = source_lines(self.sources, self.text if self.done else None)
            self.sources_list.update(Content("\n").join(
                Content(line).stylize("bold") if used else Content(line) for line, used in lines))

    def append(self, fragment: str) -> None:
        self.markdown.append(fragment)

    def finish(self, note: str = "") -> None:
        self.markdown.finish()
        self.border_subtitle = note
        self.done = True
        if self.is_mounted:
            self._show_sources()


class Transcript(VerticalScroll):
    """Scrolls with the answer as it grows (anchor), unless the reader scrolled up."""

    def __init__(self, welcome: str, **kwargs):
        super().__init__(**kwargs)
        self.welcome = welcome

    def on_mount(self) -> None:
        self.anchor()
        self.reset()

    def reset(self) -> None:
        self.remove_children()
        self.mount(Static(Content(self.welcome), classes="welcome"))

    def add_user(self, text: str) -> UserMessage:
        view = UserMessage(text)
        self.mount(view)
        self.anchor()
        return view

    def add_answer(self, speaker: str) -> AnswerMessage:
        view = AnswerMessage(speaker, note="answering...")
        self.mount(view)
        self.anchor()
        return view

    def show(self, conv: Conversation, speaker: str) -> None:
        self.reset()
        for m in conv.messages:
            if m["role"] == "user":
                self.mount(UserMessage(m["content"]))
            else:
                stored = m.get("sources")  # absent: no search was made; empty: it found nothing
                self.mount(AnswerMessage(speaker, m["content"], note="stopped" if m.get("stopped") else "",
                                         sources=from_stored(stored or ()), nothing_found=stored == []))
        self.anchor()
