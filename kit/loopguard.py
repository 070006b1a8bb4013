"""Stop an answer that repeats itself, keeping what came before the loop.

Part of the pure core (no textual, no llama_cpp): kit.engine.ChatEngine.answer runs every answer
through a LoopGuard, so `kit ask`, the chat and any later front end stop the same loops.

A small model's commonest failure is to repeat a line, a group of lines or a phrase until the
token limit. Two rules, each needing several exact copies in a row, so that normal answers are
never cut (a numbered list, a table and a code block have lines that differ from their
neighbours):

- lines: the last lines are COPIES_LONG (3) copies of a group of 1 to MAX_GROUP_LINES lines, or
  COPIES_SHORT (4) when a copy has fewer than LONG_GROUP_CHARS letters and digits, or
  COPIES_NO_LETTERS (5) when it has no letters at all ("---", or "7." with nothing after it).
  Blank lines are skipped and list numbers ("12.", "-") ignored, so "1. Boil water" / "2. Boil
  water" repeat. Inside a code block indentation counts and lines without letters never count
  (rows of zeros are data).
- phrase: the line being written ends in a run of PHRASE_SPAN (60) characters or more made of
  at least three copies of one piece with a letter in it ("water water water ..."); in code
  the run must be CODE_PHRASE_SPAN long.

The first copy is kept and the answer ends where the second began. What is shown never has to be
taken back: text that may turn out to be a second copy (it repeats what came just before) is held
until it stops repeating, and the last HOLD_CHARS characters are always held a moment. The work
per piece does not grow with the answer: only the line being written and what is held are kept
as text, the rest of the answer as finished pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_GROUP_LINES = 8
COPIES_LONG, COPIES_SHORT, COPIES_NO_LETTERS, COPIES_CODE = 3, 4, 5, 4
LONG_GROUP_CHARS = 20
MAX_PHRASE = 256  # longest repeated piece of a line that the phrase rule looks for
PHRASE_SPAN, CODE_PHRASE_SPAN = 60, 240
PHRASE_COPIES = 3
HOLD_CHARS = 16

_MARKER = re.compile(r"^([-*+]|\d{1,9}[.)])\s+")
_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class _Line:
    key: str  # what is compared: normalised text
    start: int  # offset of the line in the answer
    code: bool
    letters: bool
    chars: int  # letters and digits


class LoopGuard:
    """Feed the answer piece by piece; each call returns the text that is now safe to show."""

    def __init__(self) -> None:
        self.shown = 0  # how much of the answer has been returned
        self.looped = False
        self._done: list[str] = []  # text shown and no longer needed to find a loop
        self._buf = ""  # the rest of the answer, from offset _base
        self._base = 0
        self._cut: int | None = None
        self._lines: list[_Line] = []
        self._matched = [0] * (MAX_GROUP_LINES + 1)  # lines at the end equal to the line p before them
        self._line_start = 0
        self._in_code = False
        self._runs: dict[int, int] = {}  # phrase rule: period -> characters equal to the one p back
        self._phrase_start = 0  # where a possible second copy in the line being written begins
        self._clean: dict[tuple[int, int], int] = {}  # (second copy's start, period) -> the cut

    @property
    def text(self) -> str:
        """The answer as kept: everything shown, and once a loop is found nothing after its start."""
        return "".join(self._done) + self._buf[: self.shown - self._base]

    @property
    def _end(self) -> int:
        return self._base + len(self._buf)

    def feed(self, piece: str) -> str:
        if self.looped:
            return ""
        first = self._end
        self._buf += piece
        for pos in range(first, self._end):
            if self._buf[pos - self._base] == "\n":
                self._end_line(pos)
            else:
                self._phrase_char(pos)
            if self._cut is not None:
                return self._stop()
        shown = self._release(self._safe_end())
        self._forget()
        return shown

    def close(self) -> str:
        """The answer ended (or was stopped): whatever was held is shown."""
        if self.looped:
            return ""
        return self._release(self._end)

    def _forget(self) -> None:
        """Keep as text only what the rules still read: the line being written and what is held."""
        keep = min(self.shown, self._line_start)
        if keep - self._base > 4096:
            self._done.append(self._buf[: keep - self._base])
            self._buf, self._base = self._buf[keep - self._base:], keep

    # ------------------------------------------------------------------ lines

    def _end_line(self, pos: int) -> None:
        raw = self._buf[self._line_start - self._base:pos - self._base]
        start, self._line_start, self._runs, self._clean = self._line_start, pos + 1, {}, {}
        if _FENCE.match(raw):
            self._in_code = not self._in_code
            code = True
        else:
            code = self._in_code
        if not raw.strip():
            return  # blank lines neither repeat nor break a repetition
        key = raw.rstrip() if code else _MARKER.sub("", raw.strip() + " ").strip()  # "12." alone: ""
        line = _Line(key, start, code, bool(_LETTER.search(key)), sum(c.isalnum() for c in key))
        self._lines = (self._lines + [line])[-(MAX_GROUP_LINES * (COPIES_NO_LETTERS + 1)):]
        lines = self._lines
        for p in range(1, MAX_GROUP_LINES + 1):
            repeats = len(lines) > p and lines[-1].key == lines[-1 - p].key
            self._matched[p] = self._matched[p] + 1 if repeats else 0
            matched = self._matched[p]
            if matched and (matched + p) // p >= _copies_needed(lines[-p:]):
                self._set_cut(lines[-matched].start)  # where the second copy began

    def _line_hold(self) -> int:
        """Where held text begins: lines that repeat the lines just before them, and a line being
        written that so far is the start of one of the last lines."""
        holds = [self._lines[-m].start for m in self._matched[1:] if m]
        partial = self._buf[self._line_start - self._base:]
        key = partial.rstrip() if self._in_code else _MARKER.sub("", partial.strip())
        if partial and any(line.key.startswith(key) for line in self._lines[-MAX_GROUP_LINES:]):
            holds.append(self._line_start)
        return min(holds, default=self._end)

    # ------------------------------------------------------------------ phrases

    def _phrase_char(self, end: int) -> None:
        text, base = self._buf, self._base  # positions below are offsets in the answer
        char, runs = text[end - base], {}
        lowest = max(self._line_start, end - MAX_PHRASE) - base
        i = text.rfind(char, lowest, end - base)
        while i >= 0:  # every period p with the character p back equal to this one
            period = end - base - i
            runs[period] = self._runs.get(period, 0) + 1
            i = text.rfind(char, lowest, i)
        self._runs = runs
        span_needed = CODE_PHRASE_SPAN if self._in_code else PHRASE_SPAN
        self._phrase_start = end + 1
        for period, run in runs.items():
            if run < min(period, HOLD_CHARS // 2) or not _LETTER.search(text, end + 1 - period - base, end + 1 - base):
                continue  # not one whole copy yet, or no word in it ("-----", "0, 0, 0")
            second = end + 1 - run  # where a second copy would have begun
            cut = self._clean.get((second, period))
            if cut is None:
                cut = self._clean[second, period] = base + _clean_cut(text, second - base, period)
            self._phrase_start = min(self._phrase_start, cut)  # held: it may be cut
            span = run + period
            if span >= span_needed and span >= PHRASE_COPIES * period:
                self._set_cut(cut)

    def _phrase_hold(self) -> int:
        return self._phrase_start if self._runs else self._end

    # ------------------------------------------------------------------ showing

    def _safe_end(self) -> int:
        return min(self._end - HOLD_CHARS, self._line_hold(), self._phrase_hold())

    def _release(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        out, self.shown = self._buf[self.shown - self._base:upto - self._base], upto
        return out

    def _set_cut(self, at: int) -> None:
        """Loops of several periods can end at once ("a a a" is also "a a " twice): the earliest wins."""
        self._cut = at if self._cut is None else min(self._cut, at)

    def _stop(self) -> str:
        """A loop: show up to where it began (what was shown already stays)."""
        self.looped = True
        cut = max(self._cut or 0, self.shown)
        return self._release(cut)


def _copies_needed(group: list[_Line]) -> int:
    if any(line.code for line in group):
        return COPIES_CODE if any(line.letters for line in group) else 10**9
    if not any(line.letters for line in group):
        return COPIES_NO_LETTERS
    return COPIES_LONG if sum(line.chars for line in group) >= LONG_GROUP_CHARS else COPIES_SHORT


def _clean_cut(text: str, cut: int, period: int) -> int:
    """A phrase loop's copies need not start where a word does ("..., 1 pair of gloves, 1 pair
    of gloves, ..." can align anywhere): end the kept text after the comma or full stop nearest
    the cut, within half a copy, else at the end of the word the cut falls in."""
    reach = max(1, period // 2)
    for i in range(cut, max(cut - reach, 0), -1):
        if text[i - 1] in ".,;:!?" and (i == len(text) or text[i].isspace()):
            return i
    for i in range(cut, min(cut + period, len(text))):
        if text[i].isspace():
            return i
    return cut
