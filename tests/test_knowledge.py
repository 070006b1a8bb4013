"""kit.knowledge: every source verified before a byte is parsed, then searched as one library."""

import os
from pathlib import Path

import pytest
from knowledgekit import knowledge_stick

from kit import integrity
from kit.errors import KnowledgeError
from kit.knowledge import FAILED, READY, Library


@pytest.fixture(autouse=True)
def _fresh_registry():
    integrity.forget_verified()
    yield
    integrity.forget_verified()


def opened(tmp_path, **kwargs) -> Library:
    library = Library(*knowledge_stick(tmp_path / "stick", **kwargs))
    states = library.check_all()
    assert [s.state for s in states] == [READY] * len(states), states
    return library


def test_docs_and_zim_are_searched_together(tmp_path):
    library = opened(tmp_path)
    hits = library.search("how long should I boil water", 5)
    sources = {h.passage.source for h in hits}
    assert sources == {"field-notes", "first-aid"}
    zim_hit = next(h for h in hits if h.passage.source == "first-aid")
    assert zim_hit.passage.path == "Water_purification" and zim_hit.passage.section == "Boiling"
    assert "rolling boil" in zim_hit.passage.text
    assert library.search("snake bite venom", 3)[0].passage.title == "Snake bite"
    library.close()


def test_an_archive_without_fulltext_index_is_searched_by_title(tmp_path):
    library = opened(tmp_path, docs=False, fulltext=False)
    hits = library.search("hypothermia", 3)
    assert [h.passage.title for h in hits] == ["Hypothermia"]


def test_a_split_archive_opens_from_its_verified_parts(tmp_path):
    """Cut through its full-text index (libzim then cannot use that index), the archive is still
    read from its parts and searched by title."""
    library = opened(tmp_path, docs=False, split=40_000)
    parts = library.manifest.knowledge_source("first-aid").files
    assert len(parts) == 2 and parts[0].endswith(".zimaa")
    assert library.search("hypothermia", 3)[0].passage.title == "Hypothermia"
    assert "rewarming" in library.full_text(library.search("hypothermia", 1)[0].passage)[1].lower()


def test_entry_paths_that_climb_are_never_named_or_opened(tmp_path):
    library = opened(tmp_path, docs=False)
    hits = library.search("rolling boil climbing entry", 10)
    assert hits and all(".." not in h.passage.path for h in hits)
    from kit.passages import Passage

    with pytest.raises(KnowledgeError, match="not a safe name"):
        library.full_text(Passage("first-aid", "../../etc/passwd", "x", "", ""))


def test_articles_are_text_scripts_never_run_or_shown(tmp_path):
    library = opened(tmp_path, docs=False)
    title, text = library.full_text(library.search("water purification boiling", 1)[0].passage)
    assert title == "Water purification"
    assert "rolling boil" in text and "Chlorine tablets" in text
    assert "PWNED" not in text and "<" not in text


def test_a_changed_index_is_refused_and_left_out(tmp_path):
    bundle, manifest = knowledge_stick(tmp_path / "stick")
    index = bundle.resolve("knowledge/field-notes/passages.sqlite")
    data = bytearray(index.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes: the index no longer matches the manifest
    index.write_bytes(bytes(data))
    library = Library(bundle, manifest)
    states = {s.id: s for s in library.check_all()}
    assert states["field-notes"].state == FAILED
    assert "BLAKE3 mismatch" in states["field-notes"].detail
    assert states["first-aid"].state == READY
    assert {h.passage.source for h in library.search("boil water", 5)} == {"first-aid"}
    assert states["field-notes"].line().startswith("knowledge: Field notes not used: ")


def test_a_truncated_archive_is_refused_with_its_reason(tmp_path):
    bundle, manifest = knowledge_stick(tmp_path / "stick", docs=False)
    archive = bundle.resolve("knowledge/first-aid/first-aid.zim")
    with open(archive, "r+b") as fh:
        fh.truncate(archive.stat().st_size // 2)
    state = Library(bundle, manifest).check_all()[0]
    assert state.state == FAILED and "truncated" in state.detail


def test_the_index_read_is_the_copy_hashed_not_the_file(tmp_path):
    """After the check the stick's index is replaced by another valid index: searches still read
    the verified copy (Linux: the sealed memfd)."""
    from kit import sealed

    if sealed.unsupported():
        pytest.skip(f"no sealed copies here: {sealed.unsupported()}")
    library = opened(tmp_path, zim=False)
    index = library.bundle.resolve("knowledge/field-notes/passages.sqlite")
    from kit.ftsindex import write_index
    from kit.passages import Passage

    index.unlink()
    write_index(index, [Passage("field-notes", "evil.md", "Evil", "Evil", "boil water in petrol")], {})
    assert library.search("boil water", 1)[0].passage.title == "Water"


def test_progress_is_reported_while_checking(tmp_path):
    library = Library(*knowledge_stick(tmp_path / "stick"))
    seen = []
    library.check_all(on_change=seen.append)
    assert any(s.state == "checking" for s in seen)
    assert seen[-1].state == READY and seen[-1].percent == 100
    assert [s.line() for s in library.states()] == ["knowledge: Field notes verified",
                                                    "knowledge: First aid archive verified"]


def test_background_checking_makes_sources_usable_when_done(tmp_path):
    library = Library(*knowledge_stick(tmp_path / "stick"))
    library.start_checking()
    library._thread.join(timeout=60)
    assert all(s.state == READY for s in library.states())
    assert library.search("radio check-in", 1)[0].passage.title == "Radio"
    library.close()
    assert library.search("radio", 1) == []


def test_an_archive_swapped_after_its_check_is_never_read(tmp_path):
    """libzim reads the descriptors opened after the identity check: another valid archive renamed
    over the stick's file afterwards (a swap, a new inode) is never what search reads."""
    from knowledgekit import Page, make_zim

    library = opened(tmp_path, docs=False)
    stick_file = library.bundle.resolve("knowledge/first-aid/first-aid.zim")
    other = make_zim(tmp_path / "other.zim", (Page("Hypothermia", "Hypothermia",
                                                   "<h2>Rewarming</h2><p>Rub the skin with snow and petrol.</p>"),))
    other.replace(stick_file)
    hit = library.search("rewarming blankets", 1)[0]
    assert "dry blankets" in hit.passage.text and "petrol" not in hit.passage.text
    assert "petrol" not in library.full_text(hit.passage)[1]


def test_climbing_entries_never_come_out_of_an_archive_search(tmp_path):
    library = opened(tmp_path, docs=False)
    archive = library._opened["first-aid"]
    found = archive.search_paths(["rolling", "boil", "climbing", "entry"], 10)
    assert found and all(".." not in path for path in found)


def test_a_source_that_fails_in_an_unforeseen_way_is_left_out_not_stuck(tmp_path, monkeypatch):
    import kit.knowledge

    def broken(*args):
        raise RuntimeError("an error nobody planned for")

    monkeypatch.setattr(kit.knowledge, "open_index", broken)
    library = Library(*knowledge_stick(tmp_path / "stick"))
    states = {s.id: s for s in library.check_all()}
    assert states["field-notes"].state == FAILED and "RuntimeError" in states["field-notes"].detail
    assert states["first-aid"].state == READY


def test_closing_while_checking_leaves_nothing_open(tmp_path):
    library = Library(*knowledge_stick(tmp_path / "stick"))
    before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()
    library.start_checking()
    library.close()
    library._thread.join(timeout=30)
    assert library.search("boil water", 3) == []
    if before:  # the archive's descriptors, the RAM copy's, SQLite's: all closed
        assert set(os.listdir("/proc/self/fd")) - before == set()


def test_the_index_copy_in_ram_is_gone_once_opened(tmp_path):
    from kit import sealed

    if sealed.unsupported():
        pytest.skip(f"no sealed copies here: {sealed.unsupported()}")
    roots = [Path(r) for r in sealed.LINK_ROOTS if Path(r).is_dir()]
    before = {p for r in roots for p in r.glob("kit-knowledge-*")}
    library = opened(tmp_path, zim=False)
    assert {p for r in roots for p in r.glob("kit-knowledge-*")} == before  # nothing left for a kill to strand
    assert library.search("radio check-in", 1)[0].passage.title == "Radio"  # SQLite reads its open copy
