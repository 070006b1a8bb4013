"""HTML as readable text, in sections: for documents on the stick and ZIM articles.

Part of the pure core (the standard library's HTMLParser only). Nothing in the HTML runs or is
shown as markup: scripts, styles, forms, embedded objects and their text are dropped, tags become
line breaks, entities become characters, and what is left is plain text split at the headings.
Hostile input costs bounded work: the text kept is capped (MAX_TEXT characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

MAX_TEXT = 2_000_000  # characters kept from one page: an encyclopedia article is far smaller
# Elements whose content is never text for a reader (code, styling, UI, embedded things).
_DROPPED = {"script", "style", "noscript", "template", "iframe", "object", "embed", "svg", "math",
            "canvas", "select", "button", "head", "nav", "footer", "form"}
_HEADINGS = {"h1", "h2", "h3", "h4"}
_BLOCKS = {"p", "div", "section", "article", "br", "li", "ul", "ol", "table", "tr", "td", "th", "dd", "dt",
           "blockquote", "pre", "figure", "figcaption", "caption", "hr", "main", "header", "aside", "details",
           "summary", "dl"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "source", "track", "wbr"}


# Control characters but the line break and the tab: a terminal would act on them (escape
# sequences can set the clipboard or the window title), and no reader needs them.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` without control characters (kept: line breaks and tabs)."""
    return _CONTROLS.sub("", text)


@dataclass(frozen=True)
class Section:
    heading: str  # "" for the text before the first heading
    text: str


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = []
        self.heading: list[str] | None = None
        self.current: list[str] = []
        self.current_heading = ""
        self.skip = 0  # depth inside dropped elements
        self.kept = 0
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "body":  # HTML may leave </head> (or a dropped element) unclosed: the body is text
            self.skip = 0
            return
        if tag in _DROPPED and tag not in _VOID:
            self.skip += 1
            return
        if tag == "title":
            self.in_title = True
        if self.skip:
            return
        if tag in _HEADINGS:
            self._close_section()
            self.heading = []
        elif tag in _BLOCKS or tag in _VOID:
            self._add("\n")
        if tag == "li":
            self._add("- ")

    def handle_startendtag(self, tag, attrs):
        if not self.skip and (tag in _BLOCKS or tag in _VOID):
            self._add("\n")

    def handle_endtag(self, tag):
        if tag in _DROPPED and tag not in _VOID:
            self.skip = max(0, self.skip - 1)
            return
        if tag == "title":
            self.in_title = False
        if self.skip:
            return
        if tag in _HEADINGS and self.heading is not None:
            self.current_heading = _squash(" ".join(self.heading))
            self.heading = None
        elif tag in _BLOCKS:
            self._add("\n")

    def handle_data(self, data):
        if self.in_title:  # the page's name, not its text
            self.title.append(printable(data))
            return
        if self.skip:
            return
        if self.heading is not None:
            self.heading.append(printable(data))
        else:
            self._add(data)

    def _add(self, text: str) -> None:
        if self.kept >= MAX_TEXT:
            return
        text = printable(text)[: MAX_TEXT - self.kept]
        self.kept += len(text)
        self.current.append(text)

    def _close_section(self) -> None:
        text = _tidy("".join(self.current))
        if text or self.current_heading:
            self.sections.append([self.current_heading, text])
        self.current = []
        self.current_heading = ""

    def finish(self) -> list[Section]:
        if self.heading is not None:  # an unclosed heading: what it holds is the heading
            self.current_heading = _squash(" ".join(self.heading))
            self.heading = None
        self._close_section()
        return [Section(h, t) for h, t in self.sections if t or h]


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _tidy(text: str) -> str:
    """Runs of spaces folded, at most one blank line between paragraphs."""
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
    out = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def html_sections(html: str) -> tuple[str, list[Section]]:
    """(the page's <title>, its text cut at h1–h4 headings). Broken HTML still gives its text."""
    reader = _Reader()
    try:
        reader.feed(html)
        reader.close()
    except (AssertionError, ValueError):  # malformed markup deep enough to stop the parser: keep what was read
        pass
    sections = reader.finish()
    return _squash("".join(reader.title)), sections


def sections_text(sections: list[tuple[str, str]]) -> str:
    """(heading, text) sections as one readable text: each heading over a line of dashes."""
    parts = []
    for heading, text in sections:
        if heading:
            parts += [heading, "-" * min(len(heading), 60)]
        if text:
            parts.append(text)
        parts.append("")
    return "\n".join(parts).strip()


def html_text(html: str) -> str:
    """The whole page as readable text, headings on their own lines."""
    _title, sections = html_sections(html)
    return sections_text([(s.heading, s.text) for s in sections])
