"""The conversation on screen: questions as plain text, answers as Markdown that streams in."""

from __future__ import annotations

from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Static

from kit.history import Conversation
from kit.tui.widgets.markdown_lines import MarkdownLines


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(Content(text), classes="message")
        self.border_title = "You"


class AnswerMessage(Vertical):
    """One answer; `append` streams fragments in, `finish` says how it ended."""

    def __init__(self, speaker: str, text: str = "", *, note: str = ""):
        super().__init__(classes="message")
        self.speaker = speaker
        self.border_title = speaker
        self.markdown = MarkdownLines(text)
        if note:
            self.border_subtitle = note

    @property
    def text(self) -> str:
        return self.markdown.text

    def compose(self):
        yield self.markdown

    def append(self, fragment: str) -> None:
        self.markdown.append(fragment)

    def finish(self, note: str = "") -> None:
        self.markdown.finish()
        self.border_subtitle = note


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
                self.mount(AnswerMessage(speaker, m["content"], note="stopped" if m.get("stopped") else ""))
        self.anchor()
