"""10. Knowledge: does the search find the passage that answers, how fast, and what sources cost
the first token.

- Retrieval quality: the question set written for the demo pack (bench/knowledge_questions.toml,
  each naming the passage that answers it) against the bench stick's verified index, through
  kit.knowledge.Library as `kit ask` searches it: recall of the right passage in the top 5.
- Search latency: the same questions against an index of the demo pack plus 10,000 generated
  passages made of the pack's own words (so every query term has competition), p95 per query; and
  against a Kiwix archive of 10,000 such articles (libzim's own full-text index).
- In the prompt: how often the right passage is among what the model is actually given (the
  relevant passages among the best, at most kit.grounding.MAX_SOURCES).
  Recall is shown there too, as a stress figure with no target: the distractors are bags of the
  pack's own words, so every one of them holds the query's terms.
- First token with sources vs without: the stick's launcher, `ask` with its knowledge and with
  `--no-knowledge`, interleaved (the sources make the prompt longer: that is the cost).
"""

from __future__ import annotations

import random
import re
import tempfile
import time
import tomllib
from pathlib import Path

from bench.common import ROOT, Ratio, Section, fmt, interleave, median, say, spread, tests_module
from bench.context import Context
from bench.first_token import QUESTION, kit_env, time_to_first_byte

QUESTIONS = ROOT / "bench" / "knowledge_questions.toml"
DEMO_PACK = ROOT / "manifests" / "knowledge" / "demo"
RECALL_TARGET = 0.9
LATENCY_TARGET_MS = 50.0
DISTRACTORS = 10_000
TOP = 5


def questions() -> list[dict]:
    return tomllib.loads(QUESTIONS.read_text(encoding="utf-8"))["questions"]


def right_passage(hit_passage, question: dict) -> bool:
    """The passage the question names (a long section's later parts count too)."""
    section = re.sub(r" \(\d+\)$", "", hit_passage.section)
    return hit_passage.path == question["file"] and section == question["section"]


def percentile_95(times_ms: list[float]) -> float:
    ordered = sorted(times_ms)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def timed_queries(search, qs: list[dict], passes: int) -> list[float]:
    times = []
    for _ in range(passes):
        for q in qs:
            start = time.perf_counter()
            search(q["question"])
            times.append((time.perf_counter() - start) * 1000)
    return times


def archive_pages(passages: list, count: int, seed: int = 15) -> list:
    """`count` articles for a Kiwix archive, of the pack's words like the distractors."""
    page = tests_module("knowledgekit").Page
    return [page(f"A/{i:05d}", p.title, f"<h2>{p.section}</h2><p>{p.text}</p>")
            for i, p in enumerate(distractors(passages, count, seed))]


def recall(search, qs: list[dict]) -> tuple[float, list[str]]:
    """Share of questions whose passage is in the top 5, and the questions that missed."""
    missed = [q["question"] for q in qs if not any(right_passage(h.passage, q) for h in search(q["question"]))]
    return 1 - len(missed) / len(qs), missed


def demo_passages() -> list:
    from kit.passages import cut_markdown

    passages = []
    for path in sorted(DEMO_PACK.glob("*.md")):
        passages += cut_markdown(path.read_text(encoding="utf-8"), path.name, "survival-demo")
    return passages


def distractors(passages: list, count: int, seed: int = 15) -> list:
    """`count` passages of 60–180 words drawn from the pack's own vocabulary, with titles and
    headings of the same words: realistic competition for BM25, deterministic for a given seed."""
    from kit.passages import Passage

    rng = random.Random(seed)
    words = [w for p in passages for w in re.findall(r"[A-Za-z]{3,}", p.text)]
    out = []
    for i in range(count):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(60, 180))) + "."
        title = " ".join(rng.choice(words) for _ in range(2)).capitalize()
        out.append(Passage("survival-demo", f"filler/{i:05d}.md", title, rng.choice(words).capitalize(), text))
    return out


def stick_library(stick: Path):
    from kit import signing
    from kit.knowledge import Library
    from kit.paths import find_bundle

    bundle = find_bundle(stick)
    library = Library(bundle, signing.check_stick(bundle).manifest)
    states = library.check_all()
    if library.empty or any(s.state != "verified" for s in states):
        raise RuntimeError(f"the bench stick's knowledge is not usable: {[s.line() for s in states]}")
    return library


def run(ctx: Context) -> Section:
    from kit.ftsindex import open_index, write_index
    from kit.grounding import MAX_SOURCES
    from kit.knowledge import Library
    from kit.zim import open_archive

    qs = questions()
    section = Section("10. Knowledge: retrieval, search latency, first token with sources",
                      ["measure", "value", "range / detail"])

    library = stick_library(ctx.stick)
    say(f"knowledge: recall@{TOP} of {len(qs)} questions on the stick's demo pack")
    stick_recall, stick_missed = recall(lambda q: library.search(q, TOP), qs)
    # what the model is given: the relevant passages among the best, at most MAX_SOURCES
    in_prompt, prompt_missed = recall(lambda q: library.search(q, TOP, relevant_only=True)[:MAX_SOURCES], qs)
    library.close()
    passes = 3 if ctx.sizes.kernel_rounds > 1 else 1  # --quick: one pass

    say(f"knowledge: an index of the pack plus {DISTRACTORS} generated passages")
    pack = demo_passages()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.sqlite"
        write_index(big, [*pack, *distractors(pack, DISTRACTORS)], {"source": "survival-demo"})
        index = open_index(big, "survival-demo")
        big_recall, big_missed = recall(lambda q: index.search(q, TOP), qs)
        times_ms = timed_queries(lambda q: index.search(q, TOP), qs, passes)
        size = big.stat().st_size
        count = index.count
        index.close()
        say(f"knowledge: a Kiwix archive of {DISTRACTORS} articles (python-libzim's Creator, full-text index)")
        archive_path = tests_module("knowledgekit").make_zim(Path(tmp) / "big.zim", archive_pages(pack, DISTRACTORS))
        archive = open_archive(archive_path, "bench")
        zim_ms = timed_queries(lambda q: Library._search_zim(archive, q, TOP), qs, passes)
        zim_size = archive_path.stat().st_size
        archive.close()
    p95, zim_p95 = percentile_95(times_ms), percentile_95(zim_ms)

    rounds = max(1, ctx.sizes.first_token_rounds)
    base = [str(ctx.stick / "START-linux.sh"), "ask", QUESTION, "--max-tokens", "8", "-q"]
    say(f"knowledge: first token with and without sources, {rounds} rounds")

    def with_sources() -> float:
        return time_to_first_byte(base, env=kit_env())[0]

    def without() -> float:
        return time_to_first_byte([*base, "--no-knowledge"], env=kit_env())[0]

    with_sources(), without()  # untimed: page cache warm, kernel verdict cached
    with_s, without_s = interleave(rounds, with_sources, without)

    section.rows += [
        [f"recall@{TOP}, demo pack on the stick ({len(qs)} questions)", f"{stick_recall:.3f}",
         f"missed: {'; '.join(stick_missed) or 'none'}"],
        [f"recall@{TOP}, pack + {DISTRACTORS} generated passages (a stress figure, no target)", f"{big_recall:.3f}",
         f"{len(big_missed)} missed"],
        [f"in the prompt: the right passage among the relevant best {MAX_SOURCES} (what the model is given)",
         f"{in_prompt:.3f}", f"{len(prompt_missed)} missed"],
        [f"search latency, {count} passages ({size / 2**20:.1f} MiB index), per query", f"p95 {p95:.2f} ms",
         f"median {median(times_ms):.2f} ms, max {max(times_ms):.2f} ms, {len(times_ms)} queries"],
        [f"search latency, a Kiwix archive of {DISTRACTORS} articles ({zim_size / 2**20:.1f} MiB), per query",
         f"p95 {zim_p95:.2f} ms", f"median {median(zim_ms):.2f} ms, max {max(zim_ms):.2f} ms: libzim's full-text "
         "search, each term alone when the whole question finds too little, each article's best section"],
        ["first token, `ask` with sources, s", fmt(median(with_s), 2), spread(with_s, 2)],
        ["first token, `ask --no-knowledge`, s", fmt(median(without_s), 2), spread(without_s, 2)],
        ["first token, with sources / without (no target: what the sources cost)",
         f"{median(with_s) / median(without_s):.2f}x", "medians"],
    ]
    section.ratios += [
        Ratio(f"retrieval recall@{TOP} on the demo pack", stick_recall, RECALL_TARGET),
        Ratio(f"search latency p95 over {DISTRACTORS}+ passages, ms", p95, LATENCY_TARGET_MS, at_most=True,
              note=f"{count} passages"),
        Ratio(f"search latency p95 in a {DISTRACTORS}-article Kiwix archive, ms", zim_p95, LATENCY_TARGET_MS,
              at_most=True),
    ]
    section.notes += [
        f"question \"{QUESTION}\", 8 tokens, the stick's launcher and frozen runtime, kernel verdict cached; "
        "with sources the prompt carries the passages the plan's context leaves room for",
        "recall counts a question found when one of the top 5 passages is the one the question set names "
        "(file and `##` heading); search is kit.knowledge.Library.search, as `kit ask` and the chat use it",
    ]
    section.data = {"recall_stick": stick_recall, "recall_big": big_recall, "latency_ms": times_ms,
                    "first_token_with_s": with_s, "first_token_without_s": without_s}
    return section
