"""Knowledge onto the stick: a folder of documents as a passage index, or a Kiwix archive as it is.

- `docs`: the profile's folder is walked in name order (hidden names skipped, links never
  followed); Markdown, plain text, HTML and PDF (pypdf) are cut into passages (kit.passages) and
  written to one SQLite FTS5 index (kit.ftsindex) in the builder's cache, then staged at
  knowledge/<id>/passages.sqlite. The same documents give the same bytes, so a rerun keeps the
  staged index. Licence texts (LICENSE*, COPYING*, NOTICE*) go beside it, unindexed.
- `zim`: a local file or a download pinned by SHA-256 (kit.builder.download), refused unless
  libzim opens it and its own checksum holds. Above the medium's file limit it is cut into
  `<id>.zimaa`, `<id>.zimab`, ... which libzim reads as one archive when asked for `<id>.zim`.

Every file is staged like a model's (kit.builder.stage: hashed, atomic, kept when it is already
there) and listed in the manifest with the facts the runtime shows before it opens anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kit.builder import stage
from kit.builder.cache import knowledge_cache
from kit.builder.download import download
from kit.builder.sources import first_line
from kit.builder.zimparts import ZimFormatError, broken_ranges, cut_points, index_ranges
from kit.errors import BuildError, KnowledgeError, SourceError
from kit.fsutil import atomic_path, atomic_writer
from kit.ftsindex import write_index
from kit.integrity import ByteMeter, Digest, Hasher, ProgressFn, hash_file, hashed_blocks
from kit.manifest import FileEntry, KnowledgeEntry, ProfileKnowledge
from kit.passages import Passage, cut_html, cut_markdown, cut_pages, cut_text
from kit.zim import ZimFacts, open_archive

Report = Callable[[str], None]
Piece = tuple[Path, str, Digest | None]  # a file to stage: source, path under KIT/, its digest if known

INDEX_NAME = "passages.sqlite"
CUTTERS = {".md": cut_markdown, ".markdown": cut_markdown, ".txt": cut_text, ".html": cut_html, ".htm": cut_html}
PDF_SUFFIX = ".pdf"
LICENCE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
MAX_PARTS = 26 * 26  # libzim's part names run from .zimaa to .zimzz
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f\\]")
_LOCK_HINT = "run `kit lock <profile>` on a connected machine to pin it"


def check_knowledge(entry: ProfileKnowledge, profile_dir: Path) -> None:
    """What can be refused before the stick is touched: a missing folder or file, an unpinned url."""
    where = f"knowledge {entry.id}"
    if entry.url is not None:
        if entry.sha256 is None:
            raise SourceError(f"{where}: {entry.url} has no sha256 pin", _LOCK_HINT)
        return
    path = profile_dir / entry.path
    if entry.kind == "docs" and not path.is_dir():
        raise BuildError(f"{where}: {path} is not a folder",
                         "fix `path` in the profile (relative paths start at the profile's folder)")
    if entry.kind == "zim" and not path.is_file():
        raise BuildError(f"{where}: {path} is not a file",
                         "fix `path` in the profile (relative paths start at the profile's folder)")


def stage_knowledge(entry: ProfileKnowledge, profile_dir: Path, kit_dir: Path, cache: Path,
                    max_file_size: int | None, report: Report, progress: ProgressFn | None
                    ) -> tuple[KnowledgeEntry, list[FileEntry], int]:
    """Put one knowledge source on the stick; returns its manifest entry, its files and how many
    of them were copied (the others were already there)."""
    check_knowledge(entry, profile_dir)
    if entry.kind == "docs":
        pieces, facts = _docs_pieces(entry, profile_dir / entry.path, knowledge_cache(cache), report)
    else:
        pieces, facts = _zim_pieces(entry, profile_dir, knowledge_cache(cache), max_file_size, report)
    files, copied = _stage_pieces(entry.id, pieces, kit_dir, report, progress)
    knowledge = KnowledgeEntry(id=entry.id, name=entry.name, kind=entry.kind, licence=entry.licence,
                               language=entry.language, files=tuple(f.path for f in files), facts=facts)
    return knowledge, files, copied


def _stage_pieces(entry_id: str, pieces: list[Piece], kit_dir: Path, report: Report,
                  progress: ProgressFn | None) -> tuple[list[FileEntry], int]:
    digests = [digest or hash_file(src, sha256=True) for src, _, digest in pieces]
    meter = ByteMeter(sum(d.size for d in digests), progress)  # the bytes copied to (or checked on) the stick
    files, copied = [], 0
    for (src, relpath, _), digest in zip(pieces, digests, strict=True):
        entry, did_copy = stage.stage_file(src, kit_dir, relpath, source_digest=digest,
                                           on_block=meter.file(relpath, digest.size))
        report(f"knowledge {entry_id}: {relpath.rsplit('/', 1)[-1]} "
               f"{'copied' if did_copy else 'already on the stick'}")
        files.append(entry)
        copied += did_copy
    return files, copied


# ---------------------------------------------------------------- docs

def _docs_pieces(entry: ProfileKnowledge, folder: Path, cache: Path, report: Report) -> tuple[list[Piece], dict]:
    documents, licences = _sort_folder(entry, folder, report)
    passages, used = [], 0
    for path in documents:
        found = _passages_of(entry, folder, path, report)
        passages += found
        used += bool(found)
    if not passages:
        raise BuildError(f"knowledge {entry.id}: {folder} holds no document with text to index",
                         "add Markdown, text, HTML or PDF files to it, or take the entry out of the profile")
    index = cache / "indexes" / f"{entry.id}.sqlite"
    with atomic_path(index) as tmp:
        count = write_index(tmp, passages, {"source": entry.id, "name": entry.name, "language": entry.language})
    report(f"knowledge {entry.id}: {count} passages from {used} documents")
    prefix = f"knowledge/{entry.id}/"
    pieces: list[Piece] = [(index, prefix + INDEX_NAME, None)]
    pieces += [(path, prefix + _relative(folder, path), None) for path in licences]
    return pieces, {"passages": count, "documents": used}


def _sort_folder(entry: ProfileKnowledge, folder: Path, report: Report) -> tuple[list[Path], list[Path]]:
    """(documents to index, licence texts to stage beside the index); anything else is named and skipped."""
    documents, licences = [], []
    for path in _files_under(folder, folder, entry.id, report):
        if _UNSAFE_NAME.search(_relative(folder, path)):
            report(f"knowledge {entry.id}: skipping {_relative(folder, path)!r}: control characters or a "
                   "backslash in its name (it could not be listed or cited safely)")
        elif path.name.upper().startswith(LICENCE_PREFIXES):
            licences.append(path)
        elif path.suffix.lower() in CUTTERS or path.suffix.lower() == PDF_SUFFIX:
            documents.append(path)
        else:
            report(f"knowledge {entry.id}: skipping {_relative(folder, path)} (not Markdown, text, HTML or PDF)")
    return documents, licences


def _files_under(folder: Path, root: Path, entry_id: str, report: Report) -> Iterator[Path]:
    """Regular files under `folder`, in name order, depth first. Hidden names are skipped and links
    are never followed: one could lead anywhere on this machine, and its target would go on the stick."""
    with os.scandir(folder) as found:
        items = sorted(found, key=lambda item: item.name)
    for item in items:
        if item.name.startswith("."):
            continue
        path = Path(item.path)
        if item.is_symlink():
            report(f"knowledge {entry_id}: skipping {_relative(root, path)}: a link (links are not followed)")
        elif item.is_dir(follow_symlinks=False):
            yield from _files_under(path, root, entry_id, report)
        elif item.is_file(follow_symlinks=False):
            yield path


def _passages_of(entry: ProfileKnowledge, folder: Path, path: Path, report: Report) -> list[Passage]:
    rel = _relative(folder, path)
    suffix = path.suffix.lower()
    if suffix == PDF_SUFFIX:
        pages, title = _pdf_pages(entry, path, rel)
        found = cut_pages(pages, rel, entry.id, title)
    else:
        found = CUTTERS[suffix](path.read_text(encoding="utf-8-sig", errors="replace"), rel, entry.id)
    if not found:
        why = " (a scanned PDF holds pictures of text, not text)" if suffix == PDF_SUFFIX else ""
        report(f"knowledge {entry.id}: {rel} has no text to index{why}; skipped")
    return found


def _pdf_pages(entry: ProfileKnowledge, path: Path, rel: str) -> tuple[list[str], str]:
    """Each page's text and the document's title, through pypdf; any failure of a damaged file is
    one BuildError naming it."""
    from pypdf import PdfReader

    try:
        with _quiet_pypdf():
            reader = PdfReader(path, strict=False)
            if reader.is_encrypted:
                reader.decrypt("")  # many PDFs are "encrypted" with an empty password: readable by anyone
            pages = [page.extract_text() or "" for page in reader.pages]
            title = reader.metadata.title if reader.metadata else None
    except Exception as exc:  # pypdf raises its own errors and ValueError, KeyError, ... on malformed input
        shown = f"{entry.path}/{rel}"
        raise BuildError(f"knowledge {entry.id}: {shown} is not a readable PDF ({first_line(exc)[:160]}); "
                         "remove or replace it",
                         f"remove {shown} or replace it with a good copy, then run the same `kit build` again"
                         ) from None
    return pages, title.strip()[:200] if isinstance(title, str) else ""


@contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """pypdf logs a warning for every flaw it works around; a build's output is no place for them."""
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _relative(folder: Path, path: Path) -> str:
    return path.relative_to(folder).as_posix()


# ---------------------------------------------------------------- zim

def _zim_pieces(entry: ProfileKnowledge, profile_dir: Path, cache: Path, max_file_size: int | None,
                report: Report) -> tuple[list[Piece], dict]:
    archive, digest = _zim_source(entry, profile_dir, cache, report)
    facts = _checked_facts(entry.id, archive, report)
    prefix = f"knowledge/{entry.id}/"
    if max_file_size is None or digest.size <= max_file_size:
        pieces: list[Piece] = [(archive, f"{prefix}{entry.id}.zim", digest)]
    else:
        report(f"knowledge {entry.id}: splitting into parts of at most {max_file_size} bytes")
        folder = cache / "parts" / f"{digest.sha256}-{max_file_size}"
        parts = split_archive(archive, digest, folder, entry.id, max_file_size, report)
        pieces = [(path, f"{prefix}{path.name}", part_digest) for path, part_digest in parts]
    return pieces, {"articles": facts.articles, "fulltext": facts.fulltext, "parts": len(pieces),
                    "title": facts.title}


def _zim_source(entry: ProfileKnowledge, profile_dir: Path, cache: Path, report: Report) -> tuple[Path, Digest]:
    """The archive's file, checked against the profile's pin: a local file, or the download in the
    cache (`<sha256>.zim`, kept for the next build and shared with `kit lock`)."""
    if entry.path is not None:
        path = profile_dir / entry.path
        digest = hash_file(path, sha256=True)
        if entry.sha256 is not None and digest.sha256 != entry.sha256:
            raise BuildError(f"knowledge {entry.id}: {path} has sha256 {digest.sha256}, the profile pins "
                             f"{entry.sha256}", "check the file; if it changed on purpose, `kit lock` re-pins it")
        return path, digest
    cached = cache / f"{entry.sha256}.zim"
    if cached.is_file():
        digest = hash_file(cached, sha256=True)
        if digest.sha256 == entry.sha256:
            report(f"knowledge {entry.id}: using the archive downloaded before ({cached})")
            return cached, digest
        cached.unlink()  # damaged in the cache: fetch it again
    report(f"knowledge {entry.id}: downloading {entry.url}")
    return cached, download(entry.url, cached, sha256=entry.sha256, report=report)


def _checked_facts(entry_id: str, archive: Path, report: Report) -> ZimFacts:
    """libzim opens the archive and its own checksum holds, or the build stops: a damaged archive
    would only fail later, on a laptop with no way to get another."""
    hint = "download the archive again, or take the entry out of the profile"
    try:
        opened = open_archive(archive, entry_id)
    except KnowledgeError as exc:
        raise BuildError(str(exc), hint) from None
    report(f"knowledge {entry_id}: checking the archive (libzim's checksum)")
    if not opened.check():
        raise BuildError(f"knowledge {entry_id}: {archive.name} fails libzim's checksum: it is damaged", hint)
    return opened.facts()


def part_names(stem: str, count: int) -> list[str]:
    """`<stem>.zimaa`, `<stem>.zimab`, ...: the names libzim tries, in order, for `<stem>.zim`."""
    return [f"{stem}.zim{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(count)]


def split_archive(src: Path, digest: Digest, folder: Path, stem: str, max_size: int,
                  report: Report = lambda s: None) -> list[tuple[Path, Digest]]:
    """Cut `src` into parts of at most `max_size` bytes in `folder`, each written atomically; parts
    left there by an earlier build are reused. The cuts keep the archive's search indexes whole
    (kit.builder.zimparts: libzim reads them by offset within one file). Together the parts must
    hash to the archive's SHA-256 (else they are cut again), so what is staged is what libzim checked."""
    keep_whole = _search_indexes(src, digest.size, stem, max_size, report)
    bounds = [0, *cut_points(digest.size, max_size, keep_whole), digest.size]
    if len(bounds) - 1 > MAX_PARTS:
        raise BuildError(f"{src.name} would need {len(bounds) - 1} parts of {max_size} bytes; libzim reads at most "
                         f"{MAX_PARTS}", "use a larger --max-file-size, or a filesystem without FAT32's limit (exFAT)")
    names = part_names(stem, len(bounds) - 1)
    for reuse in (True, False):
        whole = hashlib.sha256()
        parts = [_write_part(src, folder / name, start, end - start, whole.update, reuse)
                 for name, start, end in zip(names, bounds[:-1], bounds[1:], strict=True)]
        if whole.hexdigest() == digest.sha256:
            return parts
        shutil.rmtree(folder, ignore_errors=True)
    raise BuildError(f"{src.name} changed while it was being split", "run the same `kit build` again")


def _search_indexes(src: Path, size: int, stem: str, max_size: int, report: Report) -> list[tuple[int, int]]:
    """The byte ranges no cut may fall in; an index larger than a part is cut anyway, and said so."""
    try:
        ranges = index_ranges(src)
    except ZimFormatError as exc:  # libzim opened it, so the archive is fine: only its search may suffer
        report(f"knowledge {stem}: its search indexes could not be located ({exc}); cutting at even sizes, "
               "so search in it may not work from the parts")
        return []
    for begin, end in broken_ranges(cut_points(size, max_size, ranges), ranges):
        report(f"knowledge {stem}: a search index of {end - begin} bytes is larger than a part, so search in "
               "this archive will not work from the parts; use a larger --max-file-size, or exFAT")
    return ranges


def _write_part(src: Path, dest: Path, start: int, length: int, feed_whole: Callable[[memoryview], None],
                reuse: bool) -> tuple[Path, Digest]:
    """One part: its bytes hashed on their own and fed to the archive's running hash."""
    own = Hasher(sha256=True)
    if reuse and dest.is_file() and not dest.is_symlink() and dest.stat().st_size == length:
        with open(dest, "rb", buffering=0) as fh:
            for block in hashed_blocks(fh, own):
                feed_whole(block)
        return dest, own.digest()
    with open(src, "rb", buffering=0) as fh, atomic_writer(dest) as out:
        fh.seek(start)
        for block in hashed_blocks(fh, own, limit=length):
            feed_whole(block)
            out.write(block)
        if own.size != length:
            raise BuildError(f"{src.name} became shorter while it was being split",
                             "run the same `kit build` again")
    return dest, own.digest()
