"""A llama.cpp tool the kit runs as a child (llama-server, rpc-server): its own process group, gone
when the kit goes (even on SIGKILL), its log kept in memory only, stopped in order.

The one copy of that mechanism; kit.serve and kit.pool add what their tool needs around it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from kit.errors import KitError
from kit.paths import debug_enabled

STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1
# The parent-death signal fires when the *thread* that forked the child ends (prctl(2)), not the
# process: a tool started from a short-lived thread (the chat's start screen runs in a worker
# thread) would be killed as soon as that thread returned. Every child is forked from this one
# thread, which lives as long as the kit.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kit-spawn")


def _parent_death_signal() -> Callable[[], None] | None:
    """What the child runs between fork and exec so that it goes when the kit goes, even on
    SIGKILL: no orphan keeps the port and the model. prctl is looked up here, in the parent
    (dlopen after fork in a threaded process can deadlock); a parent already gone ends the child."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def in_child() -> None:  # pragma: no cover - runs in the child
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return in_child


class ChildProcess:
    """A running tool: `name` in its sentences, `error` the KitError class they are raised as."""

    name = "the tool"
    error: type[KitError] = KitError

    def __init__(self, argv: list[str], env: dict[str, str], *, cwd: Path, pass_fds: tuple[int, ...] = ()):
        self.log: deque[str] = deque(maxlen=400)
        try:
            # its own process group: a terminal's Ctrl+C reaches the kit, which stops it in order
            self.proc = _SPAWNER.submit(
                subprocess.Popen, argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, pass_fds=pass_fds, text=True, errors="replace", bufsize=1,
                process_group=0, preexec_fn=_parent_death_signal()).result()
        except OSError as exc:
            raise self.error(f"{self.name} could not be started: {exc.strerror or exc} ({argv[0]})",
                             "a stick mounted noexec or copied without permissions cannot run it: "
                             "see the stick's README.txt") from None
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.log.append(line)
            self.on_line(line)

    def on_line(self, line: str) -> None:
        """Called for each line the tool writes (on the reader thread)."""

    def running(self) -> bool:
        return self.proc.poll() is None

    def death(self) -> str:
        """One sentence for a tool that stopped by itself."""
        code = self.proc.wait()
        self._reader.join(timeout=2)
        text = "\n".join(self.log)
        if re.search(r"couldn't bind|address already in use|failed to bind|cannot assign", text, re.I):
            return f"{self.name} could not listen on its address (is another program using the port? try --port)"
        if debug_enabled():
            print("\n".join([f"{self.name}'s last lines:", *list(self.log)[-40:]]), file=sys.stderr)
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"{self.name} crashed ({signal.Signals(-code).name})"
            return f"{self.name} crashed (signal {-code})"
        lines = [ln for ln in self.log if re.search(r"error|failed|fatal", ln, re.I)] or list(self.log)[-1:]
        last = re.sub(r"^[\d.]+ [EWI] ", "", lines[-1]).strip()[:200] if lines else "no output"
        return f"{self.name} stopped (exit {code}): {last}"

    def kill(self) -> None:
        """At once: for a tool blocked on a peer that will never answer (a lost pool worker)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)


def check_port_free(bind: str, port: int, error: type[KitError] = KitError) -> None:
    """Before a tool starts: its port is free on its address (and the address is this computer's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as exc:
            raise error(f"port {port} is not free on {bind} ({exc.strerror or exc})",
                        "choose another port with --port, or stop what uses it; the address must be "
                        "one of this computer's") from None
