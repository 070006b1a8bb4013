"""kit.child: how the kit runs llama.cpp's tools as children."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from kit.child import ChildProcess


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_started_from_a_short_lived_thread_outlives_the_thread_and_stops_in_order(tmp_path):
    """PR_SET_PDEATHSIG fires when the forking *thread* ends: the chat starts its pooled server from
    a worker thread that returns at once, and the server must not die with it."""
    started: list[ChildProcess] = []
    thread = threading.Thread(target=lambda: started.append(
        ChildProcess(["/bin/sh", "-c", "echo ready; exec sleep 60"], {"PATH": "/usr/bin:/bin"}, cwd=tmp_path)))
    thread.start()
    thread.join()
    child = started[0]
    time.sleep(0.5)
    assert child.running(), f"killed with its thread (exit {child.proc.returncode})"
    deadline = time.monotonic() + 5
    while "ready" not in child.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ready" in child.log  # its output is kept in memory
    assert os.getpgid(child.proc.pid) == child.proc.pid  # its own process group: Ctrl+C reaches the kit
    child.stop()
    assert not child.running() and child.proc.returncode == -15
    assert "stopped" in child.death() or "crashed (SIGTERM)" in child.death()
