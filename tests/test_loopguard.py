"""kit.loopguard: loops are stopped with what came before them kept; normal answers never cut.

The answers here are fed in small pieces as a model streams them; every test also checks that
what the guard showed is exactly what it kept (nothing shown is ever taken back). Real answers of
the demo model are in tests/test_engine.py (the loop) and tests/test_answers_real.py.
"""

from __future__ import annotations

import pytest

from kit.loopguard import LoopGuard


def guarded(text: str, piece: int = 3) -> LoopGuard:
    guard = LoopGuard()
    shown = []
    for i in range(0, len(text), piece):
        shown.append(guard.feed(text[i:i + piece]))
        if guard.looped:
            break
    shown.append(guard.close())
    assert "".join(shown) == guard.text  # shown = kept: nothing to take back
    return guard


NUMBERED_30 = "Pack these:\n\n" + "\n".join(
    f"{i}. {item}" for i, item in enumerate(
        ["water", "food", "a torch", "batteries", "a radio", "a map", "a compass", "matches", "a lighter",
         "a knife", "rope", "tape", "a tarp", "a blanket", "warm socks", "a hat", "gloves", "rain gear",
         "a first aid kit", "medicines", "copies of papers", "cash", "a whistle", "a mirror", "soap",
         "a toothbrush", "a phone charger", "pen and paper", "a water filter", "a cooking pot"], start=1))
TABLE = ("| Item | Amount | Why |\n|---|---:|---|\n" + "\n".join(
    f"| {item} | {n} | {why} |" for item, n, why in [
        ("Water", "4 l", "drinking"), ("Water", "2 l", "washing"), ("Rice", "1 kg", "food"),
        ("Beans", "1 kg", "food"), ("Matches", "2 boxes", "fire"), ("Candles", "6", "light"),
        ("Bandages", "10", "first aid"), ("Bandages", "10", "first aid, spare")]))
CODE = """Here is a script:

```python
def purify(litres):
    if litres <= 0:
        return 0
    minutes = 1
    if litres > 5:
        if litres > 20:
            return 10
        return 5
    return minutes


grid = [
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
]
mask = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
print("-" * 40)
print("-" * 40)
```

Run it with `python purify.py`."""
NORMAL = {
    "numbered list of 30": NUMBERED_30,
    "table with similar rows": TABLE,
    "code block": CODE,
    "rules between sections": "Intro\n\n---\n\nMiddle\n\n---\n\nEnd\n\n---\n\nNotes",
    "a little laughter": "That is funny, ha ha ha ha ha! Anyway, boil it for one minute.",
    "nested closing braces": "```js\nfunction a() {\n  if (x) {\n    if (y) {\n      z();\n    }\n  }\n}\n```",
    "a list of short steps": "1. Boil.\n2. Cool.\n3. Pour.\n4. Drink.\n5. Boil again tomorrow.",
}


@pytest.mark.parametrize("name", NORMAL)
@pytest.mark.parametrize("piece", [1, 4, 17])
def test_normal_answers_are_never_cut(name, piece):
    guard = guarded(NORMAL[name], piece)
    assert not guard.looped
    assert guard.text == NORMAL[name]


LOOPS = {  # answer -> what is kept
    "Translate it:\n\n" + "* water\n" * 30: "Translate it:\n\n* water\n",
    "Water lasts:\n\n" + "---\n\n" * 40: "Water lasts:\n\n---\n\n",
    "Steps:\n" + "".join(f"{i}. Boil the water.\n" for i in range(1, 40)): "Steps:\n1. Boil the water.\n",
    "Hello. The river flows to the sea. The river flows to the sea. The river flows to the sea. The river "
    "flows to the sea. The river flows": "Hello. The river flows to the sea.",
    "It is " + "water " * 50: "It is water",
    "A story.\n\n" + "I will not let you down.\n\nI am here.\n\n" * 10:
        "A story.\n\nI will not let you down.\n\nI am here.\n\n",
    "Items:\n" + "".join(f"{i}.\n" for i in range(1, 60)): "Items:\n1.\n",
}


@pytest.mark.parametrize("answer", LOOPS, ids=lambda a: a[:24])
@pytest.mark.parametrize("piece", [1, 4, 17])
def test_a_loop_is_stopped_and_the_first_copy_kept(answer, piece):
    guard = guarded(answer, piece)
    assert guard.looped
    assert guard.text == LOOPS[answer]


def test_the_stop_comes_after_a_few_copies_not_at_the_token_limit():
    guard = LoopGuard()
    fed = 0
    for _ in range(1000):
        guard.feed("I will not let you down.\n\n")
        fed += 1
        if guard.looped:
            break
    assert guard.looped and fed <= 4  # a short line needs four copies


def test_a_loop_inside_code_needs_more_copies_and_letters():
    rows = "```\n" + "    x = x + 1\n" * 3 + "y = 2\n```\n"
    assert not guarded(rows).looped  # three equal lines of code: fine
    assert guarded("```\n" + "    x = x + 1\n" * 8).looped
    assert not guarded("```\n" + "0 0 0 0\n" * 30 + "```\n").looped  # data, not words


def test_a_suspected_repeat_is_held_then_shown_when_it_stops_repeating():
    guard = LoopGuard()
    shown = guard.feed("Boil the water.\nBoil the water.\n")
    assert "Boil the water.\nBoil" not in shown  # the second copy waits
    shown += guard.feed("Then let it cool, covered, for an hour or more.\n")
    shown += guard.close()
    assert shown == guard.text == "Boil the water.\nBoil the water.\nThen let it cool, covered, for an hour or more.\n"
    assert not guard.looped


def test_close_shows_everything_held():
    guard = LoopGuard()
    assert guard.feed("Short.") == ""  # the last few characters wait a moment
    assert guard.close() == "Short."
    assert guard.text == "Short." and not guard.looped


def test_a_long_answer_keeps_little_text_and_still_finds_a_late_loop():
    """The work per piece must not grow with the answer: the guard keeps as text only the line
    being written and what it holds (counted, not timed)."""
    answer = "".join(f"{i}. Step {i}: fill bottle {i} and boil it for {i % 7 + 1} minutes.\n" for i in range(1, 1500))
    loop = "Then drink it slowly, sip by sip.\n" * 10
    guard = LoopGuard()
    biggest = 0
    for i in range(0, len(answer + loop), 5):
        guard.feed((answer + loop)[i:i + 5])
        biggest = max(biggest, len(guard._buf))
        if guard.looped:
            break
    assert len(answer) > 80_000 and biggest < 5_000
    assert guard.looped and guard.text == answer + "Then drink it slowly, sip by sip.\n"
