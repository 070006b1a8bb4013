"""bench/chat_terminal.py's arithmetic: the rate between two token counts read off the screen.
(The section itself runs in `bench/run.py --quick`, tests/test_bench.py.)"""

from __future__ import annotations

import math
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench.chat_terminal import ASK_STATS, CHAT_DONE, COUNT, time_at, window_rate  # noqa: E402

# (seconds, count on screen): 50 tokens a second, then 25
READINGS = [(0.0, 10), (0.2, 20), (0.4, 30), (1.0, 60), (1.4, 70), (2.2, 90)]


def test_the_time_a_count_was_reached_is_interpolated_between_readings():
    assert time_at(READINGS, 20) == 0.2
    assert math.isclose(time_at(READINGS, 25), 0.3)
    assert time_at(READINGS, 5) is None and time_at(READINGS, 91) is None


def test_window_rates():
    assert math.isclose(window_rate(READINGS, 10, 60), 50.0)
    assert math.isclose(window_rate(READINGS, 60, 90), 25.0)
    assert math.isnan(window_rate(READINGS, 80, 200))  # not covered by the readings


def test_the_screen_patterns_match_what_the_chat_and_ask_print():
    assert COUNT.search("│ Answering... 123 tokens, 45.6 tok/s · Esc stops").group(1) == "123"
    assert CHAT_DONE.search(" 57.3 tok/s · context 1036 of 8192 tokens (13%)").group(1) == "57.3"
    found = ASK_STATS.search("[1000 tokens, 65.5 tok/s, model gemma-3-270m, kernel zen4]")
    assert found.groups() == ("1000", "65.5")
