"""An answer's sources on screen and in the saved conversation: no textual (tested without an app).

The sources are numbered as the model saw them (kit.grounding), so "[2]" in an answer is the
second line of the list under it. A saved conversation keeps what a citation needs to be shown
and opened again (kit.history.SOURCE_KEYS), never the passage's text: the stick has it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kit.grounding import cited, render_sources
from kit.history import SOURCE_KEYS
from kit.history import from_stored as from_stored  # the screens take it from here
from kit.knowledge import CHECKING, FAILED, READY, SourceState
from kit.passages import Passage

CITED_MARK = "* "  # a mark, not a colour: the Linux console and NO_COLOR show it too
OPEN_KEY = "F8"  # the chat's key that opens a source (kit.tui.screens.chat)


def to_stored(sources: Sequence[Passage]) -> list[dict]:
    return [{key: getattr(p, key) for key in SOURCE_KEYS} for p in sources]


def source_lines(sources: Sequence[Passage], answer: str | None) -> list[tuple[str, bool]]:
    """The lines under an answer, each with whether the answer cites it: a heading, then
    '[n] Title — Section (source: path)'. `answer` None: still being written, nothing marked yet."""
    lines = render_sources(sources).split("\n") if sources else []
    used = set(cited(answer, len(sources))) if answer else set()
    if not used:
        return [(f"Sources ({OPEN_KEY} opens one):", False), *((line, False) for line in lines)]
    return [(f"Sources ({CITED_MARK.strip()} = cited in the answer; {OPEN_KEY} opens one):", False),
            *(((CITED_MARK if i in used else " " * len(CITED_MARK)) + line, i in used)
              for i, line in enumerate(lines, 1))]


def knowledge_label(states: Sequence[SourceState], on: bool) -> str:
    """The top bar's word on the stick's knowledge: nothing when it has none; 'knowledge: off';
    the source being checked with its progress; else 'knowledge: on (2 sources)'."""
    if not states:
        return ""
    if not on:
        return "knowledge: off"
    busy = next((s for s in states if s.state == CHECKING), None)
    if busy is not None:
        return busy.line()
    ready = sum(s.state == READY for s in states)
    if ready:
        return f"knowledge: on ({ready} source{'' if ready == 1 else 's'})"
    if all(s.state == FAILED for s in states):
        return "knowledge: none usable"
    return "knowledge: waiting"
