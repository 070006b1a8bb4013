"""kit.ftsindex: the SQLite FTS5 index of a docs source: written by the builder, opened read-only."""

import sqlite3

import pytest
from knowledgekit import DOC_PASSAGES, docs_index

from kit.errors import KnowledgeError
from kit.ftsindex import Hit, fts_query, open_index, query_terms, rank_passages, write_index
from kit.passages import Passage


def test_this_python_has_fts5():
    with sqlite3.connect(":memory:") as conn:
        conn.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize = 'porter unicode61 remove_diacritics 2')")


def test_search_ranks_the_passage_that_answers(tmp_path):
    index = open_index(docs_index(tmp_path / "i.sqlite"), "field-notes")
    assert index.count == 3
    hits = index.search("how long do I boil water?")
    assert hits[0].passage.section == "Boiling"
    assert hits[0].passage.citation() == "Water — Boiling (field-notes: water.md)"
    assert hits[0].relevant
    assert index.search("what is the capital of France") == []


def test_stemming_finds_other_forms_of_a_word(tmp_path):
    index = open_index(docs_index(tmp_path / "i.sqlite"), "field-notes")
    assert index.search("boiled")[0].passage.section == "Boiling"


def test_user_text_is_never_fts5_syntax(tmp_path):
    index = open_index(docs_index(tmp_path / "i.sqlite"), "field-notes")
    for hostile in ('water" OR text:*', "NEAR(water boil)", "title:Radio", "-- ; DROP TABLE passages", "\"\"\"'"):
        index.search(hostile)  # no sqlite error, no injection
    assert index.search("radio")[0].passage.title == "Radio"
    assert fts_query(['a"b']) == '"a""b"'
    assert query_terms("How do I boil THE water?") == ["boil", "water"]


def test_relevance_needs_two_terms_or_the_only_one():
    p = DOC_PASSAGES[0]
    assert Hit(p, 1.0, 1, 1).relevant and not Hit(p, 1.0, 1, 2).relevant and Hit(p, 1.0, 2, 5).relevant
    assert not Hit(p, 1.0, 0, 0).relevant


def test_terms_are_matched_by_their_stems(tmp_path):
    """'boil' in a question matches 'Boiling' and 'boil' in the passage: the index's own tokenizer."""
    index = open_index(docs_index(tmp_path / "i.sqlite"), "field-notes")
    (hit,) = [h for h in index.search("boil metres", 3) if h.passage.section == "Boiling"]
    assert (hit.matched, hit.terms) == (2, 2)
    (storing,) = [h for h in index.search("containers ladles", 3) if h.passage.section == "Storing"]
    assert storing.matched == 2  # plural and singular alike


def test_passages_outside_an_index_are_ranked_as_in_one():
    ranked = rank_passages(list(DOC_PASSAGES), "how long do I boil water", 2)
    assert ranked[0].passage == DOC_PASSAGES[0] and ranked[0].matched == 2
    assert rank_passages([], "water", 3) == []


def test_document_text_joins_its_passages_in_order(tmp_path):
    index = open_index(docs_index(tmp_path / "i.sqlite"), "field-notes")
    text = index.document_text("water.md")
    assert text.index("Boiling") < text.index("Storing") and "Radio" not in text


def test_the_same_passages_give_the_same_bytes(tmp_path):
    a = docs_index(tmp_path / "a.sqlite").read_bytes()
    b = docs_index(tmp_path / "b.sqlite").read_bytes()
    assert a == b


def test_a_file_that_is_not_an_index_is_a_clean_refusal(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(KnowledgeError, match="cannot be opened"):
        open_index(junk, "x")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE passages (x)").connection.commit()
    with pytest.raises(KnowledgeError):
        open_index(other, "x")


def test_opening_writes_nothing_beside_the_index(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    write_index(folder / "i.sqlite", [Passage("s", "p", "T", "S", "some text here")], {})
    before = (folder / "i.sqlite").read_bytes()
    assert open_index(folder / "i.sqlite", "s").search("text")
    assert sorted(p.name for p in folder.iterdir()) == ["i.sqlite"]  # no journal, no lock file
    assert (folder / "i.sqlite").read_bytes() == before
