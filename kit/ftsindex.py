"""The passage index of a `docs` knowledge source: one SQLite FTS5 database on the stick.

Part of the pure core (the standard library's sqlite3). The builder writes it (`write_index`); the
runtime opens only a file it has verified (`open_index`: on Linux the bytes of the sealed copy
made while hashing, so nothing read from the stick after the check is ever parsed). Ranking is
FTS5's BM25, with a hit on a section heading or title worth more than one in the text, and
English stemming (porter) over Unicode words.
"""

from __future__ import annotations

import re
import sqlite3
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kit.errors import KnowledgeError
from kit.htmltext import sections_text
from kit.passages import Passage

INDEX_FORMAT = 1
# title, section, text, path: a heading names what a passage is about; the path is not searched
BM25_WEIGHTS = (2.0, 4.0, 1.0, 0.0)
MAX_TERMS = 32
# Words that say nothing about what is asked (kept short: a question word can matter elsewhere).
STOPWORDS = frozenset("""
a an and are as at be been but by can could do does did for from had has have how i if in into is it its
me my no not of on or our should so than that the their them then there these they this to too was we
were what when where which who whom why will with would you your yours am get got about any some please
tell know want need help also just one much many more most very really
""".split())


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # larger is better (the negated BM25)
    matched: int  # how many of the query's terms the passage holds
    terms: int  # how many terms the query had

    @property
    def relevant(self) -> bool:
        """Holds two of the question's terms (its only one, if it has one). Measured on the demo
        pack's 60 questions and 10 off-topic ones: half of the terms kept the right passage out
        of the prompt for 15 questions, one term let 7 off-topic questions in; two: 2 and 1."""
        return self.terms > 0 and self.matched >= min(self.terms, 2)


def query_terms(text: str) -> list[str]:
    """The words of a question worth searching for, lower case, each once, in order."""
    seen: dict[str, None] = {}
    for word in re.findall(r"\w+", text.lower()):
        if word not in STOPWORDS and not word.isdigit() and len(word) > 1:
            seen.setdefault(word, None)
    return list(seen)[:MAX_TERMS]


def fts_query(terms: list[str]) -> str:
    """An FTS5 expression that matches any of `terms`, each a quoted string: nothing a user types
    is read as FTS5 syntax (NEAR, column filters, `*`)."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


_SCHEMA = """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE VIRTUAL TABLE passages USING fts5(
        title, section, text, path UNINDEXED, tokenize = 'porter unicode61 remove_diacritics 2');
"""


def _fill(conn: sqlite3.Connection, passages: Iterable[Passage], info: dict[str, str]) -> int:
    conn.executescript(_SCHEMA)
    count = 0
    for p in passages:
        conn.execute("INSERT INTO passages (title, section, text, path) VALUES (?, ?, ?, ?)",
                     (p.title, p.section, p.text, p.path))
        count += 1
    meta = {**info, "format": str(INDEX_FORMAT), "passages": str(count)}
    conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
    return count


def write_index(dest: Path, passages: Iterable[Passage], info: dict[str, str]) -> int:
    """Write the index of `passages` to `dest` (a fresh file; the caller makes it atomic) and
    return how many passages it holds."""
    conn = sqlite3.connect(dest)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        count = _fill(conn, passages, info)
        conn.execute("INSERT INTO passages (passages) VALUES ('optimize')")
        conn.commit()
        conn.execute("VACUUM")
    finally:
        conn.close()
    return count


def rank_passages(passages: list[Passage], query: str, limit: int) -> list[Hit]:
    """Passages that are in no index (a ZIM article's sections), ranked and matched exactly as an
    index ranks its own: in a throwaway in-memory index."""
    if not passages:
        return []
    conn = sqlite3.connect(":memory:")
    try:
        _fill(conn, passages, {})
        return PassageIndex(conn, passages[0].source).search(query, limit)
    finally:
        conn.close()


class PassageIndex:
    """An opened index: search it, read a passage back."""

    def __init__(self, conn: sqlite3.Connection, source: str):
        self.conn = conn
        self.source = source
        try:
            self.meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            fmt = int(self.meta.get("format", "0"))
        except (sqlite3.Error, ValueError) as exc:
            raise KnowledgeError(f"knowledge {source}: its index cannot be read ({exc})") from None
        if fmt != INDEX_FORMAT:
            raise KnowledgeError(f"knowledge {source}: index format {fmt} is not the one this kit reads "
                                 f"({INDEX_FORMAT})", "rebuild the stick with this kit's `kit build`")

    @property
    def count(self) -> int:
        return int(self.meta.get("passages", "0"))

    def search(self, query: str, limit: int = 5) -> list[Hit]:
        terms = query_terms(query)
        if not terms:
            return []
        try:
            rows = self.conn.execute(
                "SELECT rowid, title, section, text, path, bm25(passages, ?, ?, ?, ?) AS rank FROM passages "
                "WHERE passages MATCH ? ORDER BY rank LIMIT ?", (*BM25_WEIGHTS, fts_query(terms), limit)).fetchall()
            matched = self._matched(terms, [row[0] for row in rows])
        except sqlite3.Error as exc:
            raise KnowledgeError(f"knowledge {self.source}: search failed ({exc})") from None
        return [Hit(Passage(self.source, path, title, section, text), -rank, matched[rowid], len(terms))
                for rowid, title, section, text, path, rank in rows]

    def _matched(self, terms: list[str], rowids: list[int]) -> dict[int, int]:
        """How many of the terms each passage holds, by the index's own tokenizer (stems, case,
        accents), one query a term over those passages only."""
        counts = dict.fromkeys(rowids, 0)
        if not rowids:
            return counts
        among = f"SELECT rowid FROM passages WHERE passages MATCH ? AND rowid IN ({','.join('?' * len(rowids))})"
        for term in terms:
            for (rowid,) in self.conn.execute(among, (fts_query([term]), *rowids)):
                counts[rowid] += 1
        return counts

    def document_text(self, path: str) -> str:
        """Every passage of one document, in order, as one text (what "open the source" shows)."""
        rows = self.conn.execute("SELECT section, text FROM passages WHERE path = ? ORDER BY rowid", (path,)).fetchall()
        return sections_text(rows)

    def close(self) -> None:
        self.conn.close()


def open_index(path: Path, source: str) -> PassageIndex:
    """The index at `path`, read-only: the caller hands a file it has verified (a sealed copy of
    the stick's file, or the file itself right after its identity check). `immutable`: SQLite
    writes nothing beside it (no journal, no lock file on the stick or the host)."""
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        conn.execute("SELECT 1 FROM passages LIMIT 1").fetchall()
    except sqlite3.Error as exc:  # not a database, or not this kit's index
        raise KnowledgeError(f"knowledge {source}: its index cannot be opened ({exc})",
                             "run `kit verify`; rebuild the stick if it is damaged") from None
    return PassageIndex(conn, source)
