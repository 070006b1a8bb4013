"""bench/kernel_choice.py's helpers: the CPU hog is bounded in time, "every run" is the worst run."""

from __future__ import annotations

import sys
import time

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench.kernel_choice import cpu_hog, picked_by, worst_share  # noqa: E402


def test_the_hog_busies_a_core_and_ends_by_itself():
    with cpu_hog(max_seconds=1.5) as hog:
        time.sleep(0.5)
        assert hog.poll() is None
        with open(f"/proc/{hog.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        assert fields[0] == "R" or int(fields[11]) > 0  # running, or it has already used CPU time
        start = time.monotonic()
        hog.wait(timeout=10)  # bounded: it stops itself even if the bench never does
        assert time.monotonic() - start < 2.0
    assert hog.returncode == 0


def test_the_hog_is_stopped_when_the_block_ends():
    with cpu_hog(max_seconds=60) as hog:
        pass
    assert hog.returncode is not None


def test_every_run_counts_so_the_worst_choice_is_the_ratio():
    speeds = {"zen4": 100.0, "icelake": 97.0, "haswell": 80.0, "sapphirerapids": float("nan")}
    assert worst_share(speeds, ["zen4", "icelake", "zen4"]) == 0.97
    assert worst_share(speeds, ["zen4", "haswell"]) == 0.8
    assert worst_share(speeds, ["zen4", "sapphirerapids"]) is None  # a choice that does not work: no value
    assert worst_share(speeds, []) is None


def test_picked_by_counts_the_kits_fresh_choices():
    choices = {"quiet": [("zen4", 3.1), ("zen4", 3.0)], "hog": [("icelake", 5.0), ("zen4", 5.2)]}
    assert picked_by("zen4", {"ggml": "zen4", "fastest": "icelake"}, choices) == "ggml, kit 2/2, kit+hog 1/2"
    assert picked_by("icelake", {"ggml": "zen4", "fastest": "icelake"}, choices) == "fastest, kit+hog 1/2"
