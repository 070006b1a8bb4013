"""kit.history: conversations on the stick, one file each; in memory on a read-only stick;
two kits on one stick at once never damage each other's files."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from kit.history import (
    SCHEMA_VERSION,
    Conversation,
    HistoryError,
    HistoryStore,
    new_conversation,
    new_id,
    to_markdown,
)


def chat(question: str, answer: str = "An answer.", **kw) -> Conversation:
    conv = new_conversation("gemma-3-270m", "general", **kw)
    conv.add("user", question)
    conv.add("assistant", answer)
    return conv


def test_save_load_round_trip_and_file_layout(tmp_path):
    store = HistoryStore(tmp_path)
    conv = chat("How do I purify water?", "Boil it.")
    store.save(conv)
    path = tmp_path / "history" / f"{conv.id}.json"
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["id"] == conv.id
    assert store.load(conv.id) == conv
    assert [p.name for p in (tmp_path / "history").iterdir()] == [path.name]  # no temp file left behind


def test_empty_conversation_is_not_saved(tmp_path):
    store = HistoryStore(tmp_path)
    store.save(new_conversation())
    assert store.list().conversations == ()


def test_list_newest_first_with_titles(tmp_path):
    store = HistoryStore(tmp_path)
    a, b = chat("first question"), chat("second " * 30)
    a.updated, b.updated = "2025-01-01T10:00:00Z", "2025-01-02T10:00:00Z"
    store.save(a)
    store.save(b)
    listing = store.list()
    assert [s.id for s in listing.conversations] == [b.id, a.id]
    assert listing.conversations[0].title.endswith("...") and len(listing.conversations[0].title) == 60
    assert listing.conversations[1].title == "first question" and listing.conversations[1].messages == 2


def test_unreadable_and_newer_files_are_reported_not_fatal(tmp_path):
    store = HistoryStore(tmp_path)
    good = chat("fine")
    store.save(good)
    folder = tmp_path / "history"
    (folder / "20250101-000000-00000000.json").write_text("{half a file")
    newer = good.to_dict() | {"id": "20250101-000000-11111111", "schema_version": SCHEMA_VERSION + 1}
    (folder / "20250101-000000-11111111.json").write_text(json.dumps(newer))
    (folder / "notes.json").write_text("{}")  # not a conversation name: ignored
    (folder / f".{good.id}.json.123-abcd.part").write_text("partial")  # a writer that was killed
    listing = store.list()
    assert [s.id for s in listing.conversations] == [good.id]
    assert len(listing.unreadable) == 2
    assert any("newer kit" in u for u in listing.unreadable)
    with pytest.raises(HistoryError, match="cannot be read"):
        store.load("20250101-000000-00000000")


def test_malformed_conversations_are_refused():
    base = chat("q").to_dict()
    for bad in ({**base, "messages": [{"role": "system", "content": "x"}]},
                {**base, "messages": [{"role": "user"}]},
                {**base, "id": "../../etc/passwd"},
                {**base, "schema_version": 0},
                [1, 2]):
        with pytest.raises(ValueError):
            Conversation.from_dict(bad)


def test_ids_are_checked_before_touching_files(tmp_path):
    store = HistoryStore(tmp_path)
    with pytest.raises(HistoryError, match="not a conversation id"):
        store.load("../bundle")
    with pytest.raises(HistoryError, match="not a conversation id"):
        store.delete("../../x")


def test_delete_and_missing(tmp_path):
    store = HistoryStore(tmp_path)
    conv = chat("bye")
    store.save(conv)
    store.delete(conv.id)
    store.delete(conv.id)  # already gone (another kit deleted it): fine
    assert store.list().conversations == ()
    with pytest.raises(HistoryError, match="is gone"):
        store.load(conv.id)


def test_read_only_stick_keeps_history_in_memory():
    store = HistoryStore(None)
    assert not store.persistent
    conv = chat("kept in memory")
    store.save(conv)
    conv.add("user", "changed after saving")
    loaded = store.load(conv.id)
    assert len(loaded.messages) == 2  # the store keeps a copy, not the live object
    assert [s.id for s in store.list().conversations] == [conv.id]
    assert store.export(conv, "# md") is None and store.save_text("answer", "x") is None
    store.delete(conv.id)
    assert store.list().conversations == ()


def test_markdown_export(tmp_path):
    store = HistoryStore(tmp_path)
    conv = new_conversation("gemma-3-270m", "first-aid")
    conv.add("user", "A burn?")
    conv.add("assistant", "Cool it with **running water**.", stopped=True)
    md = to_markdown(conv, assistant="Gemma 3 270M", preset="First aid")
    assert md.startswith("# A burn?\n")
    assert "- Model: gemma-3-270m" in md and "- Preset: First aid" in md
    assert "## You\n\nA burn?" in md and "## Gemma 3 270M\n\nCool it with **running water**." in md
    assert "*(stopped before the end)*" in md
    path = store.export(conv, md)
    assert path == tmp_path / "exports" / f"{conv.id}.md" and path.read_text() == md


WATER = {"source": "survival-demo", "path": "water.md", "title": "Water", "section": "Boiling"}


def test_an_answer_keeps_its_sources_and_an_export_lists_them(tmp_path):
    store = HistoryStore(tmp_path)
    conv = new_conversation("gemma-3-270m", "general")
    conv.add("user", "How do I purify water?")
    conv.add("assistant", "Boil it [1].", sources=[WATER | {"text": "not kept: the stick has it"}])
    conv.add("user", "The capital of Mongolia?")
    conv.add("assistant", "Ulaanbaatar.", sources=[])  # searched, nothing found
    conv.add("user", "Thanks")
    conv.add("assistant", "You are welcome.")  # no search made: no key
    store.save(conv)
    loaded = store.load(conv.id)
    assert loaded == conv
    assert [m.get("sources") for m in loaded.messages[1::2]] == [[WATER], [], None]
    assert all(set(m) == {"role", "content"} for m in loaded.prompt_history())
    md = to_markdown(loaded)
    assert "Boil it [1].\n\nSources:\n\n- [1] Water — Boiling (survival-demo: water.md)" in md
    assert md.count("Sources:") == 1


def test_malformed_sources_are_refused():
    base = chat("q").to_dict()
    for bad in ("water.md", [WATER | {"path": 3}], [{"source": "x"}], [WATER] * 50):
        data = {**base, "messages": [base["messages"][0], {**base["messages"][1], "sources": bad}]}
        with pytest.raises(ValueError, match="malformed"):
            Conversation.from_dict(data)


def test_prompt_history_drops_extra_fields():
    conv = chat("q", "a")
    conv.messages[-1]["stopped"] = True
    assert conv.prompt_history() == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_ids_are_unique_and_sortable():
    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == len("20250101-000000-0123abcd") for i in ids)


def _writer(state: str, tag: str, rounds: int, same_id: str) -> None:
    """One kit: its own conversations, plus rewrites of one conversation both kits have open."""
    store = HistoryStore(Path(state))
    for i in range(rounds):
        store.save(chat(f"{tag} question {i}", "x" * 5000))
        shared = Conversation.from_dict(chat("shared").to_dict() | {"id": same_id})
        shared.add("user", f"{tag} {i} " + "y" * 20000)
        store.save(shared)
        store.list()


def test_two_kits_on_one_stick_do_not_corrupt_each_other(tmp_path):
    """Two processes write, rewrite one shared conversation and list at once: every file stays whole."""
    same_id = new_id()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), tag, 25, same_id)) for tag in ("A", "B")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    listing = HistoryStore(tmp_path).list()
    assert listing.unreadable == ()
    titles = [s.title for s in listing.conversations]
    assert sum(t.startswith("A question") for t in titles) == 25
    assert sum(t.startswith("B question") for t in titles) == 25
    assert len(listing.conversations) == 51  # + the shared one, whole, from whichever wrote last
    assert not [n for n in os.listdir(tmp_path / "history") if n.endswith(".part")]
