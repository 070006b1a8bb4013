"""The knowledge on a stick, opened only once verified, and searched as one library.

Each source is checked against the manifest before a byte of it is parsed: a `docs` index is
hashed while it is copied into a sealed memfd (kit.sealed), and those bytes are what SQLite reads
(from a 0400 file in a private 0700 RAM folder, removed once SQLite holds it open: SQLite cannot
open a memfd by its /proc path); a ZIM archive is hashed part by part and handed to libzim as
descriptors opened after the identity check (kit.integrity.open_verified), so a file swapped on
the stick afterwards is never read (one rewritten in place, same inode, would be: libzim reads on
demand). Where memfd is missing, the verified file is opened right after its identity check.

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
from kit.ftsindex import Hit, PassageIndex, open_index, query_terms, rank_passages
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
        self._exit = contextlib.ExitStack()  # a split archive's links in a RAM folder, while the library is open
        self._fds: list[int] = []  # verified archive parts libzim reads through /proc/self/fd
        self._on_change: Callable[[SourceState], None] = lambda state: None
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

    # ------------------------------------------------------------------ checking

    def check_all(self, on_change: Callable[[SourceState], None] | None = None) -> list[SourceState]:
        """Verify and open every source, in manifest order; failures are recorded, not raised.
        `on_change` is told every change of a source's state, later ones too (a source that
        fails while searched)."""
        if on_change is not None:
            self._on_change = on_change
        for entry in self.manifest.knowledge:
            if self._stop.is_set():
                break
            if self._states[entry.id].state in (READY, FAILED):
                continue
            self._check(entry)
        return self.states()

    def start_checking(self, on_change: Callable[[SourceState], None] | None = None) -> None:
        """check_all in a background thread (the chat): search uses each source once it is ready."""
        if self._thread is None and not self.empty:
            self._thread = threading.Thread(target=self.check_all, args=(on_change,), name="kit-knowledge",
                                            daemon=True)
            self._thread.start()

    def _set(self, entry_id: str, **changes) -> None:
        with self._lock:
            state = self._states[entry_id] = replace(self._states[entry_id], **changes)
        self._on_change(state)

    def _check(self, entry: KnowledgeEntry) -> None:
        size = self._states[entry.id].size
        self._set(entry.id, state=CHECKING, done=0)
        checked = 0
        shown = 0

        def on_block(n: int) -> None:
            nonlocal checked, shown
            checked = min(size, checked + n)  # a file hashed twice (a fallback) never shows past 100 %
            if self._stop.is_set():
                raise KnowledgeError("the check was stopped")
            if checked - shown >= (4 << 20) or checked >= size:
                shown = checked
                self._set(entry.id, done=checked)

        try:
            opened = self._open_docs(entry, on_block) if entry.kind == "docs" else self._open_zim(entry, on_block)
        except Exception as err:  # any failure leaves this source out, never the check stuck at N %
            self._set(entry.id, state=FAILED, detail=_why(err))
            return
        with self._lock:
            if self._stop.is_set():  # closed meanwhile: nobody will search it or close it
                opened.close()
                return
            self._opened[entry.id] = opened
        self._set(entry.id, state=READY, done=size)

    def _verify(self, relpath: str, on_block) -> Path:
        """Hash one file of the stick and return its path, its identity just checked."""
        status = integrity.verify_entry(self.bundle.kit, self.manifest.file(relpath), on_block)
        if status.state != integrity.OK:
            raise KnowledgeError(f"{relpath} is {status.state}: {status.detail}")
        path = self.bundle.resolve(relpath)
        integrity.require_verified(path)
        return path

    def _open_docs(self, entry: KnowledgeEntry, on_block) -> PassageIndex:
        """The index's bytes hashed into a sealed memfd, then handed to SQLite as a 0400 file in a
        private RAM folder (SQLite resolves /proc/self/fd/N to the memfd's name and cannot open
        it), removed as soon as SQLite holds it open: nothing is left behind, even by a killed kit.
        Without memfd or a RAM folder: the stick's file, right after its identity check."""
        for extra in entry.files[1:]:  # licence texts: checked too, so the whole source is as built
            self._verify(extra, on_block)
        relpath = entry.files[0]
        if sealed.unsupported() is None:
            try:
                with sealed.ram_folder("knowledge") as folder:
                    copy = self._private_copy(relpath, folder / Path(relpath).name, on_block)
                    if copy is not None:
                        return open_index(copy, entry.id)
            except integrity.SealFailed:  # memory ran short: the stick's file, checked
                pass
        return open_index(self._verify(relpath, on_block), entry.id)

    def _private_copy(self, relpath: str, dest: Path, on_block) -> Path | None:
        """The file hashed into a sealed memfd and written from it to `dest` (0400); None without
        a RAM folder to write in."""
        status, copy = integrity.seal_entry(self.bundle.kit, self.manifest.file(relpath), on_block)
        if copy is None:
            raise KnowledgeError(f"{relpath} is {status.state}: {status.detail}")
        try:
            with open(copy.path, "rb") as src, open(dest, "xb") as out:
                shutil.copyfileobj(src, out)
            dest.chmod(0o400)
        finally:
            copy.close()
        return dest

    def _open_zim(self, entry: KnowledgeEntry, on_block):
        """libzim reads the archive's verified descriptors by /proc path, and reopens them later
        (its search indexes are opened on first use): they stay open, and a split archive's links
        stay in a RAM folder, for as long as the library is. libzim is handed the first part's
        name itself (NAME.zimaa), never NAME.zim, which it would open before the parts."""
        from kit.zim import open_archive

        paths = [self._verify(p, on_block) for p in entry.files]
        parts = paths[: len(entry.opened)]
        fds = [integrity.open_verified(p) for p in parts]
        with self._lock:
            self._fds += fds
        if not sealed.fd_path(fds[0]).exists():  # no descriptor paths here: by name, right after the check
            for p in parts:
                integrity.require_verified(p)
            return open_archive(parts[0], entry.id)
        if len(parts) == 1:
            return open_archive(sealed.fd_path(fds[0]), entry.id)
        names = [Path(p).name for p in entry.opened]  # libzim finds NAME.zimab... beside NAME.zimaa
        with self._lock:
            links = self._exit.enter_context(sealed.shard_names([sealed.fd_path(fd) for fd in fds], names))
        return open_archive(links[0], entry.id)

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
            except Exception as err:  # an archive whose stick went, a closed library: left out from now on
                self._drop(source_id, _why(err))
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
            source = self._opened.pop(source_id, None)
        if source is not None:
            with contextlib.suppress(Exception):
                source.close()
        self._set(source_id, state=FAILED, detail=why)

    @staticmethod
    def _search_zim(archive, query: str, limit: int) -> list[Hit]:
        """Each article found gives its best section, ranked as an index ranks its passages."""
        hits = []
        for path in archive.search_paths(query_terms(query), min(limit, ZIM_ARTICLES)):
            try:
                best = rank_passages(archive.passages(path), query, 1)
            except KnowledgeError:  # not an article (an image, a redirect loop): skip it
                continue
            hits += best
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
        """Stop the check and free everything; sources found after this are closed by the check
        itself (see _check). Descriptors stay open while a check that cannot stop still runs."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            opened, self._opened = list(self._opened.values()), {}
        for source in opened:
            with contextlib.suppress(Exception):
                source.close()
        if self._thread is not None and self._thread.is_alive():
            return  # blocked on a failing stick: its descriptor numbers must not be reused under it
        with self._lock:
            self._exit.close()
            fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _why(err: BaseException) -> str:
    if isinstance(err, KitError):
        return str(err)
    if isinstance(err, OSError):
        return f"cannot be read ({err.strerror or err})"
    return f"failed: {type(err).__name__}: {err}"
