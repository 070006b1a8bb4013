"""Answers grounded in the stick's knowledge: numbered sources in the prompt, cited as [1], [2].

Part of the pure core. Every front end (kit ask, the chat) builds its messages here, so one
question gets the same sources and the same instructions everywhere. The sources go into the
question's own message (the conversation history keeps the plain questions, so earlier sources
do not eat the context); how much of the context they may take comes from the plan's context
size, less the answer's room and what the conversation already holds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kit.passages import Passage

CHARS_PER_TOKEN = 3  # a cautious average: real text is nearer 4, so the budget is never overrun
MAX_SOURCES = 3  # each passage is prompt to read before the first token: ~1 s each on a 2-core laptop
FOLLOW_UP_TURNS = 2  # earlier questions that join a follow-up's search
NOTHING_FOUND = "No source on this stick covers this question; the answer below is the model's alone and can be wrong."
_INSTRUCTION = ("Answer the question using the sources above. Cite the sources you use by their number "
                "in brackets, like [1]. If the sources do not answer it, say so.")
_NO_SOURCE_INSTRUCTION = ("No source on this stick covers this question. Say that first, then answer only "
                          "what you are sure of.")


@dataclass(frozen=True)
class Grounded:
    """The messages to send and the passages they cite, numbered from 1 in this order."""

    messages: list[dict]
    sources: tuple[Passage, ...]
    searched: bool  # False: knowledge was off or the stick has none

    @property
    def nothing_found(self) -> bool:
        return self.searched and not self.sources


def search_text(question: str, history: Sequence[dict] = ()) -> str:
    """What to search for: the question, and for a follow-up the last questions before it
    ("and for a child?" alone finds nothing)."""
    earlier = [m["content"] for m in history if m.get("role") == "user"][-FOLLOW_UP_TURNS:]
    return " ".join([*earlier, question])


def source_budget(n_ctx: int, max_tokens: int, messages: Sequence[dict]) -> int:
    """Characters of sources that fit: at most half the context, after the answer's room and the
    messages already there (each counted at CHARS_PER_TOKEN)."""
    used = sum(len(m.get("content", "")) for m in messages) // CHARS_PER_TOKEN + 64
    tokens = min(n_ctx // 2, n_ctx - max_tokens - used)
    return max(0, tokens * CHARS_PER_TOKEN)


def ground(messages: list[dict], passages: Sequence[Passage], budget: int, *, searched: bool = True) -> Grounded:
    """`messages` (ending with the user's question) with the passages that fit `budget` put in
    front of the question as numbered sources; with none found, the instruction to say so."""
    if not searched:
        return Grounded(messages, (), False)
    chosen: list[Passage] = []
    blocks: list[str] = []
    used = 0
    for passage in passages[:MAX_SOURCES]:
        block = f"[{len(chosen) + 1}] {passage.title}" + (f" — {passage.section}" if passage.section else "") \
            + f"\n{passage.text}"
        if used + len(block) > budget:
            remaining = budget - used - len(block.split("\n", 1)[0]) - 1
            if remaining < 200:  # a stub of a passage helps nobody
                break
            block = block[: budget - used].rsplit(" ", 1)[0] + " …"
        chosen.append(passage)
        blocks.append(block)
        used += len(block) + 2
    question = messages[-1]["content"]
    if chosen:
        content = "Sources:\n\n" + "\n\n".join(blocks) + f"\n\n{_INSTRUCTION}\n\nQuestion: {question}"
    else:
        content = f"{_NO_SOURCE_INSTRUCTION}\n\nQuestion: {question}"
    return Grounded([*messages[:-1], {**messages[-1], "content": content}], tuple(chosen), True)


def render_sources(sources: Sequence[Passage], cited_numbers: Sequence[int] = ()) -> str:
    """The list shown under an answer: '[1] Title — Section (source: path)', ' · cited' after
    the ones the answer refers to."""
    return "\n".join(f"[{i}] {p.citation()}" + (" · cited" if i in cited_numbers else "")
                     for i, p in enumerate(sources, 1))


def cited(answer: str, count: int) -> list[int]:
    """The source numbers (1..count) the answer refers to, in order of first mention."""
    seen: dict[int, None] = {}
    for group in re.findall(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]", answer):
        for number in re.split(r"\s*[,;]\s*", group):
            n = int(number)
            if 1 <= n <= count:
                seen.setdefault(n, None)
    return list(seen)
