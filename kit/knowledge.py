"""The knowledge on a stick, opened only once verified, and searched as one library.

Each source is checked against the manifest before a byte of it is parsed: a `docs` index is
hashed while it is copied into a sealed memfd (kit.sealed), and those bytes are what SQLite reads
(from a 0400 file in a private 0700 RAM folder: SQLite cannot open a memfd by its /proc path); a
ZIM archive is hashed part by part and handed to libzim as descriptors opened after the identity
check (kit.integrity.open_verified), so a file swapped on the stick afterwards is never read.
Where memfd is missing, the verified file is opened right after its identity check.

A multi-gigabyte archive takes minutes to hash at USB speed, so the chat checks in the background
(`start_checking`) and searches whatever is verified so far; `kit ask` and `kit search` check
first (`check_all`). A source that fails its check is reported and left out, never used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from kit import integrity, sealed
from kit.errors import KitError, KnowledgeError
from kit.ftsindex import Hit, PassageIndex, matched_terms, open_index, query_terms
from kit.manifest import BundleManifest, KnowledgeEntry
from kit.passages import Passage
from kit.paths import BundlePaths

WAITING, CHECKING, READY, FAILED = "waiting", "checking", "verified", "damaged"
ZIM_ARTICLES = 3  # articles read per archive and question: each gives its best section
RRF_K = 10  # reciprocal-rank fusion: how much a first place outweighs a fifth


@dataclass(frozen=True)
class SourceState:
    """What the front ends show of one source: its check's state and progress."""

    id: str
    name: str
    kind: str
    size: int
    count: int  # passages (docs) or articles (zim), from the manifest
    state: str = WAITING
    done: int = 0  # bytes checked
    detail: str = ""  # why it failed

    @property
    def percent(self) -> int:
        return 100 if self.state == READY else int(100 * self.done / self.size) if self.size else 0

    def line(self) -> str:
        """'knowledge: checking WikiMed, 40 %' and the like."""
        if self.state == CHECKING:
            return f"knowledge: checking {self.name}, {self.percent} %"
        if self.state == FAILED:
            return f"knowledge: {self.name} not used: {self.detail}"
        return f"knowledge: {self.name} {self.state}"

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "kind": self.kind, "bytes": self.size, "count": self.count,
                "state": self.state, "detail": self.detail}


def _split_name(first_part: Path) -> Path:
    """NAME.zim for NAME.zimaa: the name libzim is given to find every part of a split archive."""
    return first_part.with_name(first_part.name[: -len("aa")])


def _count(entry: KnowledgeEntry) -> int:
    value = entry.facts.get("passages" if entry.kind == "docs" else "articles", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Library:
    """The stick's knowledge sources; searched over the ones verified and opened."""

    def __init__(self, bundle: BundlePaths, manifest: BundleManifest):
        self.bundle, self.manifest = bundle, manifest
        self._lock = threading.Lock()
        self._states = {k.id: SourceState(k.id, k.name, k.kind, manifest.knowledge_size(k), _count(k))
                        for k in manifest.knowledge}
        self._opened: dict[str, object] = {}  # id -> PassageIndex or kit.zim.ZimArchive
        self._exit = contextlib.ExitStack()  # the private RAM folder, while the library is open
        self._folder: Path | None = None
        self._copied: list[Path] = []
        self._fds: list[int] = []  # verified archive parts libzim reads through /proc/self/fd
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def empty(self) -> bool:
        return not self.manifest.knowledge

    def states(self) -> list[SourceState]:
        with self._lock:
            return list(self._states.values())

    @property
    def usable(self) -> bool:
        """At least one source is verified and open."""
        with self._lock:
            return bool(self._opened)

    def ready(self) -> bool:
        """Every source has been checked (verified or not)."""
        return all(s.state in (READY, FAILED) for s in self.states())

    def status_line(self) -> str:
        """One line for a status bar: the source being checked, else a summary; '' with none."""
        states = self.states()
        busy = next((s for s in states if s.state == CHECKING), None)
        if busy:
            return busy.line()
        ready = [s for s in states if s.state == READY]
        failed = [s for s in states if s.state == FAILED]
        if not states:
            return ""
        text = f"knowledge: {len(ready)} of {len(states)} sources verified"
        return text + (f"; {failed[0].name} not used: {failed[0].detail}" if failed else "")

    # ------------------------------------------------------------------ checking

    def check_all(self, on_change: Callable[[SourceState], None] | None = None) -> list[SourceState]:
        """Verify and open every source, in manifest order; failures are recorded, not raised."""
        for entry in self.manifest.knowledge:
            if self._stop.is_set():
                break
            if self._states[entry.id].state in (READY, FAILED):
                continue
            self._check(entry, on_change or (lambda s: None))
        return self.states()

    def start_checking(self, on_change: Callable[[SourceState], None] | None = None) -> None:
        """check_all in a background thread (the chat): search uses each source once it is ready."""
        if self._thread is None and not self.empty:
            self._thread = threading.Thread(target=self.check_all, args=(on_change,), name="kit-knowledge",
                                            daemon=True)
            self._thread.start()

    def _set(self, entry_id: str, on_change, **changes) -> None:
        with self._lock:
            state = self._states[entry_id] = replace(self._states[entry_id], **changes)
        on_change(state)

    def _check(self, entry: KnowledgeEntry, on_change) -> None:
        self._set(entry.id, on_change, state=CHECKING, done=0)
        checked = 0
        last = [0.0]

        def on_block(n: int) -> None:
            nonlocal checked
            checked += n
            if self._stop.is_set():
                raise KnowledgeError("the check was stopped")
            if checked - last[0] >= (4 << 20) or checked >= self._states[entry.id].size:
                last[0] = checked
                self._set(entry.id, on_change, done=checked)

        try:
            opened = self._open_docs(entry, on_block) if entry.kind == "docs" else self._open_zim(entry, on_block)
        except (KitError, OSError) as err:
            detail = str(err) if isinstance(err, KitError) else f"cannot be read ({err.strerror or err})"
            self._set(entry.id, on_change, state=FAILED, detail=detail)
            return
        with self._lock:
            self._opened[entry.id] = opened
        self._set(entry.id, on_change, state=READY, done=self._states[entry.id].size)

    def _verify(self, relpath: str, on_block) -> Path:
        """Hash one file of the stick and return its path, its identity just checked."""
        status = integrity.verify_entry(self.bundle.kit, self.manifest.file(relpath), on_block)
        if status.state != integrity.OK:
            raise KnowledgeError(f"{relpath} is {status.state}: {status.detail}")
        path = self.bundle.resolve(relpath)
        integrity.require_verified(path)
        return path

    def _private_copy(self, relpath: str, on_block) -> Path | None:
        """The file hashed into a sealed memfd, then put in this library's private RAM folder, where
        SQLite can open it (it resolves /proc/self/fd/N to the memfd's name and fails); None where
        this system has neither."""
        if sealed.unsupported() is not None:
            return None
        try:
            folder = self._ram_folder()
            status, copy = integrity.seal_entry(self.bundle.kit, self.manifest.file(relpath), on_block)
        except OSError:  # no RAM folder, or memory ran short: the stick's file, checked
            return None
        if copy is None:
            raise KnowledgeError(f"{relpath} is {status.state}: {status.detail}")
        try:
            dest = folder / f"{len(self._copied)}-{Path(relpath).name}"
            with open(copy.path, "rb") as src, open(dest, "xb") as out:
                shutil.copyfileobj(src, out)
            dest.chmod(0o400)
        finally:
            copy.close()
        self._copied.append(dest)
        return dest

    def _ram_folder(self) -> Path:
        if self._folder is None:
            self._folder = self._exit.enter_context(sealed.ram_folder("knowledge"))
        return self._folder

    def _open_docs(self, entry: KnowledgeEntry, on_block) -> PassageIndex:
        for extra in entry.files[1:]:  # licence texts: checked too, so the whole source is as built
            self._verify(extra, on_block)
        index = self._private_copy(entry.files[0], on_block) or self._verify(entry.files[0], on_block)
        return open_index(index, entry.id)

    def _open_zim(self, entry: KnowledgeEntry, on_block):
        """libzim opens the archive's verified descriptors by /proc path, and reopens them later
        (its search indexes are opened on first use): they stay open, and a split archive's
        links stay in the RAM folder, for as long as the library is."""
        from kit.zim import open_archive

        paths = [self._verify(p, on_block) for p in entry.files]
        parts = paths[: len(entry.opened)]
        fds = [integrity.open_verified(p) for p in parts]
        self._fds += fds
        if not sealed.fd_path(fds[0]).exists():  # no descriptor paths here: by name, right after the check
            for p in parts:
                integrity.require_verified(p)
            first = parts[0]
            return open_archive(first if len(parts) == 1 else _split_name(first), entry.id)
        if len(parts) == 1:
            return open_archive(sealed.fd_path(fds[0]), entry.id)
        names = [Path(p).name for p in entry.opened]  # libzim finds NAME.zimaa, .zimab... beside NAME.zim
        links = self._exit.enter_context(sealed.shard_names([sealed.fd_path(fd) for fd in fds], names))
        return open_archive(_split_name(links[0]), entry.id)

    # ------------------------------------------------------------------ searching

    def search(self, query: str, limit: int = 5, *, relevant_only: bool = False) -> list[Hit]:
        """The best passages over every verified source, merged by rank (reciprocal-rank fusion:
        BM25 scores of different sources do not compare)."""
        with self._lock:
            opened = list(self._opened.items())
        ranked: dict[tuple[str, str, str], tuple[float, Hit]] = {}
        for source_id, source in opened:
            try:
                hits = source.search(query, limit) if isinstance(source, PassageIndex) else \
                    self._search_zim(source, query, limit)
            except (KnowledgeError, OSError) as err:  # an archive whose stick went: left out from now on
                self._drop(source_id, str(err) if isinstance(err, KnowledgeError) else f"unreadable ({err})")
                continue
            for rank, hit in enumerate(hits):
                key = (source_id, hit.passage.path, hit.passage.section)
                fused = ranked.get(key, (0.0, hit))[0] + 1 / (RRF_K + rank + 1)
                ranked[key] = (fused, hit)
        merged = [hit for _, hit in sorted(ranked.values(), key=lambda pair: -pair[0])]
        if relevant_only:
            merged = [h for h in merged if h.relevant]
        return merged[:limit]

    def _drop(self, source_id: str, why: str) -> None:
        with self._lock:
            self._opened.pop(source_id, None)
            self._states[source_id] = replace(self._states[source_id], state=FAILED, detail=why)

    @staticmethod
    def _search_zim(archive, query: str, limit: int) -> list[Hit]:
        terms = query_terms(query)
        hits = []
        for path in archive.search_paths(terms, min(limit, ZIM_ARTICLES)):
            try:
                passages = archive.passages(path)
            except KnowledgeError:  # not an article (an image, a redirect loop): skip it
                continue
            if not passages:
                continue
            best = max(passages, key=lambda p: (matched_terms(terms, f"{p.title} {p.section} {p.text}"),
                                                -passages.index(p)))
            matched = matched_terms(terms, f"{best.title} {best.section} {best.text}")
            hits.append(Hit(best, 0.0, matched, len(terms)))
        return hits

    def full_text(self, passage: Passage) -> tuple[str, str]:
        """(title, text) of what a citation points at: a ZIM article whole, a document's passages."""
        with self._lock:
            source = self._opened.get(passage.source)
        if source is None:
            raise KnowledgeError(f"knowledge {passage.source} is not verified yet")
        if isinstance(source, PassageIndex):
            return passage.title, source.document_text(passage.path)
        return source.full_text(passage.path)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for source in self._opened.values():
                with contextlib.suppress(Exception):
                    source.close()
            self._opened.clear()
        self._exit.close()
        self._folder = None
        self._copied.clear()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
