"""The conversation on screen: questions as plain text, answers as Markdown that streams in."""

from __future__ import annotations

from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Markdown, Static

from kit.history import Conversation


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(Content(text), classes="message")
        self.border_title = "You"


class AnswerMessage(Vertical):
    """One answer; `append` streams fragments in, `finish` says how it ended."""

    def __init__(self, speaker: str, text: str = "", *, note: str = ""):
        super().__init__(classes="message")
        self.speaker = speaker
        self.text = text
        self.border_title = speaker
        self.markdown = Markdown(text)
        self._stream = None
        if note:
            self.border_subtitle = note

    def compose(self):
        yield self.markdown

    async def append(self, fragment: str) -> None:
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)  # batches updates it cannot keep up with
        self.text += fragment
        await self._stream.write(fragment)

    async def finish(self, note: str = "") -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
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
