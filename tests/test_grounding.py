"""kit.grounding: numbered sources in the prompt within the plan's budget, and citations read back."""

from kit.grounding import CHARS_PER_TOKEN, cited, ground, render_sources, search_text, source_budget
from kit.passages import Passage

WATER = Passage("pack", "water.md", "Water", "Boiling", "Bring water to a rolling boil for one minute. " * 3)
RADIO = Passage("pack", "radio.md", "Radio", "Calls", "MAYDAY is for danger to life. " * 3)


def question(text="How do I purify water?"):
    return [{"role": "system", "content": "Be calm."}, {"role": "user", "content": text}]


def test_sources_are_numbered_before_the_question():
    grounded = ground(question(), [WATER, RADIO], budget=10_000)
    assert grounded.sources == (WATER, RADIO)
    content = grounded.messages[-1]["content"]
    assert content.startswith("Sources:\n\n[1] Water — Boiling\nBring water")
    assert "[2] Radio — Calls" in content
    assert content.endswith("Question: How do I purify water?")
    assert grounded.messages[0] == {"role": "system", "content": "Be calm."}


def test_the_budget_bounds_the_sources():
    tight = ground(question(), [WATER, RADIO], budget=len(WATER.text) + 40)
    assert tight.sources == (WATER,)
    assert ground(question(), [WATER], budget=50).sources == ()


def test_budget_comes_from_the_context_less_the_answer_and_the_conversation():
    assert source_budget(2048, 512, question()) == 1024 * CHARS_PER_TOKEN
    assert source_budget(1024, 512, question()) < 512 * CHARS_PER_TOKEN
    assert source_budget(512, 512, question()) == 0


def test_nothing_found_asks_the_model_to_say_so():
    grounded = ground(question(), [], budget=10_000)
    assert grounded.nothing_found and "No source on this stick covers" in grounded.messages[-1]["content"]
    off = ground(question(), [WATER], budget=10_000, searched=False)
    assert not off.nothing_found and off.messages == question()


def test_follow_ups_search_with_the_earlier_questions():
    history = [{"role": "user", "content": "How do I purify water?"}, {"role": "assistant", "content": "Boil it."}]
    assert search_text("and at altitude?", history) == "How do I purify water? and at altitude?"


def test_citations_are_read_back():
    assert cited("Boil it [1]. Or see [2, 1] and [7].", 2) == [1, 2]
    assert render_sources([WATER]) == "[1] Water — Boiling (pack: water.md)"
    assert render_sources([WATER, RADIO], [2]) == ("[1] Water — Boiling (pack: water.md)\n"
                                                  "[2] Radio — Calls (pack: radio.md) · cited")
