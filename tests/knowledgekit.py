"""Real knowledge for tests: ZIM archives written by python-libzim's own Creator, and a stick's
KIT/knowledge laid out by hand (files hashed, a BundleManifest naming them) for the runtime's tests
that need no model and no builder."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from libzim.writer import Creator, Hint, Item, StringProvider

from kit import __version__
from kit.ftsindex import write_index
from kit.integrity import hash_file
from kit.manifest import BundleManifest, FileEntry, KnowledgeEntry
from kit.passages import Passage
from kit.paths import KIT_DIRNAME, BundlePaths


@dataclass(frozen=True)
class Page:
    path: str
    title: str
    html: str
    mimetype: str = "text/html"


class _Item(Item):
    def __init__(self, page: Page):
        super().__init__()
        self.page = page

    def get_path(self) -> str:
        return self.page.path

    def get_title(self) -> str:
        return self.page.title

    def get_mimetype(self) -> str:
        return self.page.mimetype

    def get_contentprovider(self):
        return StringProvider(self.page.html)

    def get_hints(self):
        return {Hint.FRONT_ARTICLE: self.page.mimetype == "text/html"}


FIRST_AID_PAGES = (
    Page("Water_purification", "Water purification",
         "<html><head><title>Water purification</title><script>document.write('PWNED')</script></head><body>"
         "<h1>Water purification</h1><p>Water from rivers and lakes can carry germs.</p>"
         "<h2>Boiling</h2><p>Bring the water to a rolling boil for one minute to kill bacteria, viruses and "
         "parasites; at high altitude boil it for three minutes. Let it cool covered.</p>"
         "<h2>Chlorine tablets</h2><p>Follow the label of the tablets; wait thirty minutes before drinking.</p>"
         "</body></html>"),
    Page("Hypothermia", "Hypothermia",
         "<html><body><h2>Signs</h2><p>Shivering, confusion, slurred speech and drowsiness show the body "
         "temperature is falling dangerously.</p><h2>Rewarming</h2><p>Move the person out of the wind, remove "
         "wet clothing and wrap them in dry blankets; give warm sweet drinks if they are fully awake.</p>"
         "</body></html>"),
    Page("../../etc/passwd", "Climbing entry", "<p>rolling boil climbing entry that must never be named</p>"),
    Page("Snake_bite", "Snake bite",
         "<html><body><h2>First aid</h2><p>Keep the bitten limb still and below the heart, remove rings and "
         "watches, and carry the person to medical help. Do not cut the wound or suck the venom.</p>"
         "</body></html>"),
)


def make_zim(path: Path, pages=FIRST_AID_PAGES, *, fulltext: bool = True) -> Path:
    """A real ZIM archive of `pages`, with libzim's full-text index or without it."""
    with contextlib.redirect_stdout(open(os.devnull, "w")), Creator(str(path)).config_indexing(fulltext, "eng") as c:
        c.set_mainpath(pages[0].path)
        c.add_metadata("Title", "Test first aid")
        c.add_metadata("Language", "eng")
        for page in pages:
            c.add_item(_Item(page))
    return path


DOC_PASSAGES = (
    Passage("field-notes", "water.md", "Water", "Boiling",
            "Bring water to a rolling boil for one minute; three minutes above 2000 metres."),
    Passage("field-notes", "water.md", "Water", "Storing",
            "Keep treated water in clean covered containers and use a ladle, never hands."),
    Passage("field-notes", "radio.md", "Radio", "Short messages",
            "Say who you are, where you are, what happened and what you need. Agree check-in times."),
)


def docs_index(path: Path, passages=DOC_PASSAGES) -> Path:
    write_index(path, passages, {"source": passages[0].source})
    return path


def _entry(kit: Path, relpath: str) -> FileEntry:
    digest = hash_file(kit / relpath, sha256=True)
    return FileEntry(relpath, digest.size, digest.blake3, digest.sha256)


def knowledge_stick(root: Path, *, docs: bool = True, zim: bool = True, fulltext: bool = True,
                    split: int | None = None) -> tuple[BundlePaths, BundleManifest]:
    """A stick holding a docs source ("field-notes") and a ZIM source ("first-aid"; with `split`,
    in parts of that many bytes named as libzim reads them) and the manifest that names them."""
    kit = root / KIT_DIRNAME
    files: list[FileEntry] = []
    knowledge: list[KnowledgeEntry] = []
    if docs:
        (kit / "knowledge/field-notes").mkdir(parents=True)
        docs_index(kit / "knowledge/field-notes/passages.sqlite")
        files.append(_entry(kit, "knowledge/field-notes/passages.sqlite"))
        knowledge.append(KnowledgeEntry("field-notes", "Field notes", "docs", "CC0-1.0", "en",
                                        ("knowledge/field-notes/passages.sqlite",),
                                        {"passages": len(DOC_PASSAGES), "documents": 2}))
    if zim:
        folder = kit / "knowledge/first-aid"
        folder.mkdir(parents=True)
        whole = make_zim(folder / "first-aid.zim", fulltext=fulltext)
        names = [whole.name]
        if split:
            data = whole.read_bytes()
            whole.unlink()
            names = []
            for i in range(0, len(data), split):
                name = f"first-aid.zim{chr(97 + i // split // 26)}{chr(97 + i // split % 26)}"
                (folder / name).write_bytes(data[i:i + split])
                names.append(name)
        rel = [f"knowledge/first-aid/{n}" for n in names]
        files += [_entry(kit, r) for r in rel]
        knowledge.append(KnowledgeEntry("first-aid", "First aid archive", "zim", "CC-BY-SA-4.0", "en", tuple(rel),
                                        {"articles": 3, "fulltext": fulltext, "parts": len(rel)}))
    manifest = BundleManifest(kit_version=__version__, created="2026-12-05T00:00:00Z", profile="test", models=(),
                              runtimes=(), files=tuple(files), knowledge=tuple(knowledge))
    return BundlePaths(root, kit), manifest
