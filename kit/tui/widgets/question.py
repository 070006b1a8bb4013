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
    # The keys act in the box's own key handler, in the order they were typed: a priority binding
    # would run in the app's task before the box has inserted the letters typed just before it
    # (fast typing, a slow host), so the new line or the send came ahead of them. The bindings stay
    # for the footer and the help screen.
    BINDINGS = [
        Binding(SEND_KEY, "send", "Send", tooltip="Send the question"),
        Binding(NEWLINE_KEYS, "newline", "New line", show=False,
                tooltip="A new line in the question (Shift+Enter or Alt+Enter too, where the terminal "
                        "reports them)"),
    ]

    class Send(Message):
        """The user asked to send what is in the box."""

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        action = _ACTIONS.get(event.key)
        if action is None:
            await super()._on_key(event)
            return
        event.stop()
        event.prevent_default()
        action(self)

    def action_send(self) -> None:
        self.post_message(self.Send())

    def action_newline(self) -> None:
        self._replace_via_keyboard("\n", *self.selection)  # as TextArea types Enter: over a selection


_ACTIONS = {
    SEND_KEY: QuestionBox.action_send,
    XTERM_SHIFT_ENTER: QuestionBox.action_newline,
    **{key: QuestionBox.action_newline for key in NEWLINE_KEYS.split(",")},
}
