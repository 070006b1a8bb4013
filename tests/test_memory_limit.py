"""Under a real memory ceiling (a cgroup the test makes) the kit plans to fit or refuses clearly:
never an out-of-memory kill."""

from __future__ import annotations

import json

import pytest
from cgroups import memory_limit
from conftest import run_kit

pytestmark = pytest.mark.slow
MiB = 1 << 20


def test_too_little_memory_is_a_clear_refusal(demo_stick):
    with memory_limit(300 * MiB) as prefix:
        done = run_kit("ask", "--stick", str(demo_stick), "--max-tokens", "8", "hello", prefix=prefix)
    assert done.returncode == 1, (done.returncode, done.stderr)  # not -9 / 137: nobody was killed
    assert "does not fit" in done.stderr or "no model on this stick fits" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_tight_limit_gets_a_smaller_context_and_answers(demo_stick):
    free = run_kit("doctor", "--stick", str(demo_stick), "--json", timeout=900)
    assert free.returncode == 0, free.stderr
    unlimited_ctx = json.loads(free.stdout)["plan"]["n_ctx"]
    with memory_limit(1200 * MiB) as prefix:
        doctor = run_kit("doctor", "--stick", str(demo_stick), "--json", prefix=prefix)
        done = run_kit("ask", "--stick", str(demo_stick), "--max-tokens", "16", "--temperature", "0",
                       "How do I purify water?",
                       prefix=prefix, timeout=900)
    report = json.loads(doctor.stdout)
    assert report["host"]["memory_limit"] == 1200 * MiB
    assert report["plan"]["n_ctx"] < unlimited_ctx
    assert report["plan"]["estimate"]["total"] < 1200 * MiB
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.strip()
