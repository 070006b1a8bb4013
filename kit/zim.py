"""Kiwix archives (ZIM) through python-libzim: the only module that imports libzim.

The caller opens only an archive it has verified (kit.knowledge hands a descriptor path, or a
private folder of links for a split archive). What comes out is text: an article's HTML goes
through kit.htmltext (nothing runs, no markup is shown); entry paths are names inside the archive,
never paths on any disk, and one that climbs (`..`), is absolute or holds control characters is
refused rather than shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kit.errors import KnowledgeError
from kit.htmltext import html_sections, printable, sections_text
from kit.passages import Passage, cut_sections

MAX_ARTICLE = 8 << 20  # bytes of one article's HTML read at most: a real one is far smaller
_HTML = ("text/html", "application/xhtml+xml")
MAX_TERMS_ALONE = 8  # terms searched one by one when the whole query finds too little


@dataclass(frozen=True)
class ZimFacts:
    articles: int
    fulltext: bool
    title: str
    language: str


def safe_entry_path(path: str) -> bool:
    """A ZIM entry path the kit will name and open: relative, no '..' part, no control characters."""
    if not path or path.startswith("/") or "\\" in path or re.search(r"[\x00-\x1f\x7f]", path):
        return False
    return ".." not in path.split("/")


class ZimArchive:
    def __init__(self, path: Path, source: str):
        from libzim.reader import Archive

        self.source = source
        try:
            self.archive = Archive(str(path))
        except (RuntimeError, OSError) as exc:  # truncated, not a ZIM, a part missing
            raise KnowledgeError(f"knowledge {source}: the archive cannot be read ({exc})",
                                 "run `kit verify`; rebuild the stick if it is damaged") from None

    def close(self) -> None:
        self.archive = None  # libzim closes its files when the archive is collected

    def facts(self) -> ZimFacts:
        a = self.archive
        return ZimFacts(a.article_count, bool(a.has_fulltext_index), self._metadata("Title"),
                        self._metadata("Language"))

    def check(self) -> bool:
        """libzim's own checksum over the whole archive (the builder runs it once)."""
        try:
            return bool(self.archive.check())
        except RuntimeError:
            return False

    def _metadata(self, key: str) -> str:
        try:
            return bytes(self.archive.get_metadata(key)).decode("utf-8", "replace")[:200]
        except (RuntimeError, KeyError):
            return ""

    def search_paths(self, terms: list[str], limit: int) -> list[str]:
        """Entry paths for the search terms: the archive's own full-text index when it has one, its
        title suggestions otherwise. libzim matches every word of a query (AND), so a question
        whose words are not all in one article finds nothing: the articles holding all the terms
        come first, then those holding the most terms, each term searched alone."""
        if not terms:
            return []
        found = self._search(" ".join(terms), limit)
        if len(found) < limit and len(terms) > 1:
            counts: dict[str, int] = {}
            best: dict[str, int] = {}
            for term in terms[:MAX_TERMS_ALONE]:
                for rank, path in enumerate(self._search(term, limit)):
                    counts[path] = counts.get(path, 0) + 1
                    best[path] = min(best.get(path, rank), rank)
            more = sorted((p for p in counts if p not in found), key=lambda p: (-counts[p], best[p]))
            found += more[: limit - len(found)]
        return found

    def _search(self, query: str, limit: int) -> list[str]:
        try:
            if self.archive.has_fulltext_index:
                from libzim.search import Query, Searcher

                results = Searcher(self.archive).search(Query().set_query(query))
            else:
                from libzim.suggestion import SuggestionSearcher

                results = SuggestionSearcher(self.archive).suggest(query)
            return [p for p in results.getResults(0, limit * 2) if safe_entry_path(p)][:limit]
        except RuntimeError as exc:
            raise KnowledgeError(f"knowledge {self.source}: search failed ({exc})") from None

    def article(self, path: str) -> tuple[str, list[tuple[str, str]]]:
        """(title, [(heading, text), ...]) of an HTML entry, redirects followed."""
        if not safe_entry_path(path):
            raise KnowledgeError(f"knowledge {self.source}: entry {path!r} is not a safe name; refusing it")
        try:
            entry = self.archive.get_entry_by_path(path)
            for _ in range(8):  # a bounded chain of redirects
                if not entry.is_redirect:
                    break
                entry = entry.get_redirect_entry()
            item = entry.get_item()
            if item.mimetype.split(";")[0].strip() not in _HTML:
                raise KnowledgeError(f"knowledge {self.source}: {path} is not an article ({item.mimetype})")
            if item.size > MAX_ARTICLE:
                raise KnowledgeError(f"knowledge {self.source}: {path} is too large to show ({item.size} bytes)")
            html = bytes(item.content).decode("utf-8", "replace")
            title = entry.title
        except KeyError:
            raise KnowledgeError(f"knowledge {self.source}: no entry {path!r}") from None
        except RuntimeError as exc:
            raise KnowledgeError(f"knowledge {self.source}: {path} cannot be read ({exc})") from None
        page_title, sections = html_sections(html)
        return printable(title) or page_title or path, [(s.heading, s.text) for s in sections]

    def passages(self, path: str) -> list[Passage]:
        """An article as passages (each section, long ones cut), for retrieval and citations."""
        title, sections = self.article(path)
        return cut_sections(self.source, path, title, sections)

    def full_text(self, path: str) -> tuple[str, str]:
        """(title, the whole article as readable text)."""
        title, sections = self.article(path)
        return title, sections_text(sections)


def open_archive(path: Path, source: str) -> ZimArchive:
    return ZimArchive(path, source)
