"""Real memory cgroups the tests make (v1 memory controller or v2 with memory delegated): a hard
limit, a command prefix that runs inside it, and its peak usage."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

import pytest


class Prefix(list):
    """The command prefix that runs a program inside the cgroup at `group`."""

    def __init__(self, argv: list[str], group: Path):
        super().__init__(argv)
        self.group = group


def peak_usage(group: Path) -> int:
    """The most memory the cgroup has held (v1 max_usage_in_bytes, v2 memory.peak)."""
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if (group / name).exists():
            return int((group / name).read_text().split()[0])
    raise AssertionError(f"{group} reports no peak usage")


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
    """A child cgroup with a hard memory limit; yields the command prefix that runs inside it
    (its folder is the prefix's `.group`, for peak_usage)."""
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
        yield Prefix(["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "in-cgroup"], group)
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (group / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)  # killed, not yet gone: rmdir would fail with EBUSY
        group.rmdir()
