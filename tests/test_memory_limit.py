"""Under a real memory ceiling (a cgroup the test makes) the kit plans to fit or refuses clearly:
never an out-of-memory kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from pathlib import Path

import pytest
from conftest import run_kit

pytestmark = pytest.mark.slow
MiB = 1 << 20


def _memory_cgroup_root() -> tuple[str, Path] | None:
    """('v1'|'v2', this process's memory cgroup folder) when one can be made here."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (folder / "memory.limit_in_bytes").exists():
                return "v1", folder
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            folder = Path("/sys/fs/cgroup") / path.lstrip("/")
            if "memory" in (folder / "cgroup.subtree_control").read_text():
                return "v2", folder
    return None


@contextlib.contextmanager
def memory_limit(limit: int):
    """A child cgroup with a hard memory limit; yields the command prefix that runs inside it."""
    found = _memory_cgroup_root()
    if found is None:
        pytest.fail("no writable memory cgroup (v1 memory controller or v2 with memory delegated) on this host")
    version, parent = found
    group = parent / f"kit-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        if version == "v1":
            (group / "memory.limit_in_bytes").write_text(str(limit))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to cap
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            (group / "memory.max").write_text(str(limit))
            (group / "memory.swap.max").write_text("0")
        yield ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "in-cgroup"]
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        group.rmdir()


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
