"""Knowledge through the command line, on the real demo stick (its demonstration pack) and the real
model: `kit search`, answers that cite, `--no-knowledge`, `kit doctor`, a damaged index."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_kit

pytestmark = pytest.mark.slow


def test_search_finds_the_passage_that_answers(demo_stick):
    done = run_kit("search", "how long should I boil drinking water", "--stick", str(demo_stick), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    top = data["results"][0]
    assert top["source"] == "survival-demo" and top["path"] == "water.md"
    assert "boil" in top["text"].lower()
    assert data["knowledge"][0]["state"] == "verified"
    text = run_kit("search", "purify water", "--stick", str(demo_stick))
    assert text.returncode == 0 and text.stdout.startswith("[1] Water")


def test_search_with_nothing_to_find_says_so(demo_stick):
    done = run_kit("search", "zzyzx quux", "--stick", str(demo_stick))
    assert done.returncode == 1
    assert "Nothing on this stick matches" in done.stdout


@pytest.fixture(scope="module")
def cited_answer(demo_stick):
    return run_kit("ask", "How do I purify water?", "--stick", str(demo_stick), "--temperature", "0",
                   "--max-tokens", "160")


def test_an_answer_cites_a_retrieved_passage(cited_answer):
    assert cited_answer.returncode == 0, cited_answer.stderr
    answer, _, sources = cited_answer.stdout.partition("\nSources:\n")
    listed = dict(re.findall(r"^\[(\d+)\] (.+)$", sources, re.MULTILINE))
    assert any(line.endswith(" · cited") for line in listed.values()), sources
    assert listed, cited_answer.stdout
    assert any("survival-demo: water.md" in line for line in listed.values())
    markers = set(re.findall(r"\[(\d+)\]", answer))
    assert markers & set(listed), f"no marker of {sorted(listed)} in: {answer!r}"
    assert "knowledge: Survival Kit demonstration pack verified" in cited_answer.stderr


def test_no_knowledge_answers_from_the_model_alone(demo_stick):
    done = run_kit("ask", "How do I purify water?", "--stick", str(demo_stick), "--temperature", "0",
                   "--max-tokens", "24", "--no-knowledge")
    assert done.returncode == 0, done.stderr
    assert "Sources:" not in done.stdout and "knowledge:" not in done.stderr


def test_doctor_lists_the_knowledge(demo_stick):
    data = json.loads(run_kit("doctor", "--stick", str(demo_stick), "--json", check=True).stdout)
    (source,) = data["knowledge"]
    assert source["id"] == "survival-demo" and source["state"] == "verified" and source["count"] > 40
    text = run_kit("doctor", "--stick", str(demo_stick), check=True).stdout
    assert re.search(r"survival-demo\s+Survival Kit demonstration pack \(docs, \d+ passages, .*\): verified", text)


def test_a_damaged_index_is_named_and_answers_go_on(stick_copy):
    index = stick_copy / "KIT" / "knowledge" / "survival-demo" / "passages.sqlite"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index.write_bytes(bytes(data))
    search = run_kit("search", "purify water", "--stick", str(stick_copy))
    assert search.returncode == 1 and search.stdout == ""
    assert "kit: no knowledge on this stick can be used" in search.stderr and "BLAKE3 mismatch" in search.stderr
    assert "Traceback" not in search.stderr
    ask = run_kit("ask", "How do I purify water?", "--stick", str(stick_copy), "--max-tokens", "8")
    assert ask.returncode == 0, ask.stderr
    assert "not used" in ask.stderr and "Sources:" not in ask.stdout
    verify = run_kit("verify", str(stick_copy))
    assert verify.returncode == 4 and "passages.sqlite" in verify.stdout
