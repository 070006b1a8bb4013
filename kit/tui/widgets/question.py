"""The question box: Enter sends, as in every chat app and `ollama run`; other keys make a new line.

Which key can make a new line depends on the terminal: Ctrl+J arrives as its own key everywhere
(it is a line feed, Enter a carriage return); Shift+Enter and Alt+Enter only where the terminal
reports modifiers on Enter (kitty's keyboard protocol as "shift+enter", xterm's modifyOtherKeys
as "shift+\\r"); elsewhere they arrive as a plain Enter and send. A pasted text keeps its lines:
bracketed paste reaches the box as one paste, not as keys.
"""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

SEND_KEY = "enter"
NEWLINE_KEYS = "ctrl+j,shift+enter,alt+enter"
XTERM_SHIFT_ENTER = "shift+\r"  # a key name Textual's bindings cannot hold (they strip "\r")


class QuestionBox(TextArea):
    # Priority: seen before TextArea's own key handler, which would insert a new line on Enter.
    BINDINGS = [
        Binding(SEND_KEY, "send", "Send", priority=True, tooltip="Send the question"),
        Binding(NEWLINE_KEYS, "newline", "New line", priority=True, show=False,
                tooltip="A new line in the question (Shift+Enter or Alt+Enter too, where the terminal "
                        "reports them)"),
    ]

    class Send(Message):
        """The user asked to send what is in the box."""

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == XTERM_SHIFT_ENTER:
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        await super()._on_key(event)

    def action_send(self) -> None:
        self.post_message(self.Send())

    def action_newline(self) -> None:
        self._replace_via_keyboard("\n", *self.selection)  # as TextArea types Enter: over a selection
