"""Cut a streaming Markdown answer into blocks that are finished and the one still being written.

Pure (no textual): the answer view renders each finished block once and re-renders only the
live one, so a token costs the same at the end of a long answer as at its start. A block is a
paragraph, a heading, one list item with what is indented under it, a table, or up to
CODE_PIECE_LINES lines of a fenced code block. Blocks are cut only where rendering them apart
looks like rendering them together: never inside a table, a nested code fence or a setext heading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CODE_PIECE_LINES = 16  # a long code block is frozen in pieces of this many lines

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
_ITEM = re.compile(r"^ ?([-*+]|\d{1,9}[.)])(\s|$)")
_FIRST_ITEM = re.compile(r"^ ?([-*+]|1[.)])(\s|$)")  # what may interrupt a paragraph (CommonMark)
_HEADING = re.compile(r"^ {0,3}#{1,6}(\s|$)")


@dataclass(frozen=True)
class Block:
    """A piece of the answer that renders on its own: Markdown, or lines of one code block."""

    source: str  # Markdown; for code, the code itself
    gap_before: bool = False  # a blank line separates it from the block before, as in the answer
    lexer: str | None = None  # set for a piece of a fenced code block ("" when the fence names none)
    continued: bool = False  # code: the piece above belongs to the same code block
    continues: bool = False  # code: more of the same code block follows

    @property
    def is_code(self) -> bool:
        return self.lexer is not None


@dataclass
class _Live:
    kind: str  # "para", "item", "table", "heading", "code"
    lines: list[str] = field(default_factory=list)
    gap_before: bool = False
    fence: str = ""  # code: the fence that closes it; item: an open nested fence
    lexer: str = ""
    continued: bool = False
    blanks: int = 0  # blank lines after the last line, held until the next line says whose they are


class BlockSplitter:
    """Feed the answer as it streams in; `feed` returns the blocks that just finished."""

    def __init__(self) -> None:
        self._partial = ""  # text after the last newline
        self._live: _Live | None = None
        self._blanks = 0  # blank lines since the last finished block (when no block is live)
        self._started = False

    def feed(self, text: str) -> list[Block]:
        done: list[Block] = []
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._line(line, done)
        return done

    def close(self) -> list[Block]:
        """The answer ended: everything still open is finished."""
        done: list[Block] = []
        if self._partial:
            self._line(self._partial, done)
            self._partial = ""
        self._finish(done, continues=False)
        return done

    def pending(self) -> list[Block]:
        """What is not finished yet: the live block with the line being typed (or that line on its
        own when it starts a block of its own)."""
        live, partial = self._live, self._partial
        blocks: list[Block] = []
        if live is not None:
            lines = live.lines
            if partial and (live.kind == "code" or (partial.strip() and self._continues(live, partial))):
                lines = lines + [""] * (0 if live.kind == "code" else live.blanks) + [partial]
                partial = ""
            if lines or live.kind == "code":
                blocks.append(self._block(live, lines, continues=False))
        if partial.strip():
            gap = (live.blanks if live else self._blanks) > 0 and self._started
            blocks.append(_new_block(partial, gap=gap))
        return blocks

    # ------------------------------------------------------------------ one line at a time

    def _line(self, line: str, done: list[Block]) -> None:
        live = self._live
        if live is not None and live.kind == "code":
            self._code_line(live, line, done)
            return
        if not line.strip():
            if live is None:
                self._blanks += 1
            elif live.kind == "item" and live.fence:
                live.lines.append(line)  # a blank line inside a code fence nested in a list item
            else:
                live.blanks += 1
            return
        if live is not None and self._continues(live, line):
            live.lines.extend([""] * live.blanks)
            live.blanks = 0
            live.lines.append(line)
            if live.kind == "item":
                _track_nested_fence(live, line)
            return
        gap = (live.blanks if live else self._blanks) > 0
        self._finish(done, continues=False)
        self._start(line, gap=gap and self._started)

    def _continues(self, live: _Live, line: str) -> bool:
        """Does this (non-blank) line belong to the live block?"""
        if live.kind == "heading":
            return False
        indented = line.startswith(("  ", "\t"))
        if live.kind == "item" and live.fence:
            return True  # inside a fenced block nested in the item: nothing ends here
        if live.blanks:
            return live.kind == "item" and indented  # a loose item's next paragraph
        if _FENCE.match(line) or _HEADING.match(line):
            return live.kind == "item" and indented
        if live.kind == "table":
            return "|" in line
        if live.kind == "item":
            return indented or not _ITEM.match(line)
        return not _FIRST_ITEM.match(line)  # a paragraph, until a list interrupts it

    def _start(self, line: str, *, gap: bool) -> None:
        self._started = True
        self._blanks = 0
        fence = _FENCE.match(line)
        if fence:
            self._live = _Live("code", gap_before=gap, fence=fence.group(1), lexer=fence.group(2))
            return
        kind = ("heading" if _HEADING.match(line) else "item" if _ITEM.match(line)
                else "table" if line.lstrip().startswith("|") else "para")
        self._live = _Live(kind, [line], gap_before=gap)
        if kind == "item":
            _track_nested_fence(self._live, line)

    def _code_line(self, live: _Live, line: str, done: list[Block]) -> None:
        stripped = line.strip()
        if stripped.startswith(live.fence[0] * len(live.fence)) and not stripped.strip(live.fence[0]):
            self._finish(done, continues=False)  # the closing fence
            return
        live.lines.append(line)
        if len(live.lines) >= CODE_PIECE_LINES:
            self._finish(done, continues=True)
            self._live = _Live("code", fence=live.fence, lexer=live.lexer, continued=True)

    def _finish(self, done: list[Block], *, continues: bool) -> None:
        live, self._live = self._live, None
        if live is None:
            return
        self._blanks = live.blanks
        if live.lines or live.kind == "code":
            done.append(self._block(live, live.lines, continues=continues))

    @staticmethod
    def _block(live: _Live, lines: list[str], *, continues: bool) -> Block:
        if live.kind == "code":
            return Block("\n".join(lines), live.gap_before, lexer=live.lexer, continued=live.continued,
                         continues=continues)
        return Block("\n".join(lines), live.gap_before)


def _new_block(line: str, *, gap: bool) -> Block:
    fence = _FENCE.match(line)
    if fence:
        return Block("", gap, lexer=fence.group(2))
    return Block(line, gap)


def _track_nested_fence(live: _Live, line: str) -> None:
    """Open or close a code fence inside a list item: blank lines there do not end the item."""
    fence = _FENCE.match(line.strip())
    if fence is None:
        return
    if not live.fence:
        live.fence = fence.group(1)
    elif fence.group(1).startswith(live.fence):
        live.fence = ""


def split_all(text: str) -> list[Block]:
    """Every block of a finished text (a saved answer)."""
    splitter = BlockSplitter()
    return splitter.feed(text) + splitter.close()
