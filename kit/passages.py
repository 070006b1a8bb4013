"""Documents cut into passages: the unit that is indexed, retrieved, cited and shown.

Part of the pure core. A passage is one section of one document (a Markdown `##` heading, an
HTML h1–h4, a PDF page, a plain-text block), with what a citation needs: the document's title, its
path in the knowledge source and the section's heading. A long section is cut at paragraph breaks
into parts of at most MAX_PASSAGE characters, so that a passage always fits the prompt's budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kit.htmltext import html_sections, printable

MAX_PASSAGE = 1_500  # characters: a few hundred tokens, several fit the smallest context
MIN_PASSAGE = 40  # shorter text (a lone heading, a page number) is not worth a place in the index
# A short note before a document's first heading (a byline, a disclaimer) answers nothing by
# itself and would match every question about its words: it is kept only in a document without
# headings.
MIN_PREAMBLE = 200


@dataclass(frozen=True)
class Passage:
    source: str  # the knowledge source's id on the stick
    path: str  # the document inside it ('/'-separated), or a ZIM entry's path
    title: str  # the document's title
    section: str  # the heading this passage sits under ("" for a document's opening text)
    text: str

    def citation(self) -> str:
        """'Title — Section (path)': how a source is named under an answer and in `kit search`
        (control characters dropped again: an index from elsewhere reaches a terminal here)."""
        where = f"{self.title} — {self.section}" if self.section and self.section != self.title else self.title
        return printable(f"{where} ({self.source}: {self.path})")


def cut_markdown(text: str, path: str, source: str) -> list[Passage]:
    """Sections at `#`–`####` headings; the first `#` heading is the title (else the file name)."""
    title = _stem(path)
    sections: list[tuple[str, list[str]]] = [("", [])]
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        match = None if in_fence else re.match(r"^(#{1,4})\s+(.*?)\s*#*\s*$", line)
        if match:
            heading = match.group(2).strip()
            if len(match.group(1)) == 1 and title == _stem(path) and not any(s[1] for s in sections):
                title = heading
                continue
            sections.append((heading, []))
        else:
            sections[-1][1].append(line)
    return cut_sections(source, path, title, [(h, _plain_markdown("\n".join(lines))) for h, lines in sections])


def cut_text(text: str, path: str, source: str) -> list[Passage]:
    """Plain text: one section (the title is the file name), cut at blank lines when long."""
    return cut_sections(source, path, _stem(path), [("", text.strip())])


def cut_html(html: str, path: str, source: str) -> list[Passage]:
    """An HTML page's text at its headings; scripts and markup never reach a passage."""
    page_title, sections = html_sections(html)
    title = page_title or next((s.heading for s in sections if s.heading), "") or _stem(path)
    return cut_sections(source, path, title, [(s.heading, s.text) for s in sections])


def cut_pages(pages: list[str], path: str, source: str, title: str = "") -> list[Passage]:
    """A PDF's pages (their text, read by the builder): one section per page."""
    return cut_sections(source, path, title or _stem(path),
                     [(f"page {i + 1}", page.strip()) for i, page in enumerate(pages)])


def cut_sections(source: str, path: str, title: str, sections: list[tuple[str, str]]) -> list[Passage]:
    """(heading, text) sections as passages: every kind of document ends here, ZIM articles too."""
    out = []
    headed = any(heading for heading, _ in sections)
    for heading, text in sections:
        text = re.sub(r"\n{3,}", "\n\n", printable(text)).strip()
        heading = printable(heading)
        if not heading and headed and len(text) < MIN_PREAMBLE:
            continue
        for i, part in enumerate(split_long(text)):
            if len(part) < MIN_PASSAGE and not heading:
                continue
            label = heading if i == 0 else f"{heading} ({i + 1})" if heading else f"part {i + 1}"
            out.append(Passage(source, path, printable(title), label, part))
    return out


def split_long(text: str, limit: int = MAX_PASSAGE) -> list[str]:
    """`text` in parts of at most `limit` characters, cut at paragraph breaks, else at sentence
    ends, else anywhere."""
    if len(text) <= limit:
        return [text] if text else []
    parts: list[str] = []
    current = ""
    for piece in _pieces(text, limit):
        joined = f"{current}\n\n{piece}" if current else piece
        if len(joined) <= limit:
            current = joined
        else:
            if current:
                parts.append(current)
            current = piece
    if current:
        parts.append(current)
    return parts


def _pieces(text: str, limit: int) -> list[str]:
    pieces = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        while len(para) > limit:
            cut = max(para.rfind(". ", 0, limit), para.rfind("\n", 0, limit))
            cut = cut + 1 if cut > limit // 3 else limit
            pieces.append(para[:cut].strip())
            para = para[cut:].strip()
        if para:
            pieces.append(para)
    return pieces


def _plain_markdown(text: str) -> str:
    """Markdown without its markup noise: emphasis markers, link targets, image tags, HTML tags."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>\n]{1,200}>", "", text)
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<![\w*])[*_](\S[^*_\n]*?)[*_](?![\w*])", r"\1", text)
    return text.strip()


def _stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0].replace("-", " ").replace("_", " ").strip() or name
