"""`kit serve` as the tests run it: a real subprocess on a real stick, its banner read for the URL
and key, stopped with SIGTERM (and checked to leave no llama-server behind). Loopback unless a
test puts it in a network namespace of its own (`prefix`)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never the host's proxy
READY_S = 360  # the first start on a fresh stick probes the CPU kernels (~1 min on 2 idle cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    key: str | None
    out: list[str] = field(default_factory=list)  # stdout lines so far
    err: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return "\n".join(self.out) + "\n" + "\n".join(self.err)

    def server_pids(self) -> list[int]:
        """llama-server processes that are children of this kit serve."""
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and cmd.endswith(b"llama-server"):
                found.append(int(pid))
        return found

    def request(self, path: str, body: dict | None = None, *, key: str | None = "default",
                timeout: float = 120) -> tuple[int, dict | str]:
        key = self.key if key == "default" else key
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with LOOPBACK.open(req, timeout=timeout) as r:
                raw = r.read().decode()
                code = r.status
        except urllib.error.HTTPError as exc:
            raw, code = exc.read().decode(), exc.code
        try:
            return code, json.loads(raw)
        except ValueError:
            return code, raw


def _pump(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line.rstrip("\n"))


def start_serve(stick: Path, *args: str, port: int | None = None, prefix: Sequence[str] = (),
                env: dict | None = None, wait: bool = True) -> Served:
    port = port or free_port()
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "kit", "serve", "--stick", str(stick),
                             "--port", str(port), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env, cwd=ROOT)
    served = Served(proc, port, None)
    for stream, into in ((proc.stdout, served.out), (proc.stderr, served.err)):
        threading.Thread(target=_pump, args=(stream, into), daemon=True).start()
    if wait:
        wait_ready(served)
    return served


def wait_ready(served: Served, timeout: float = READY_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("Ctrl+C stops the server" in line for line in served.out):
            key = next((m.group(1) for line in served.out if (m := re.search(r"^\s+key:\s+(\S+)", line))), None)
            served.key = key
            return
        if served.proc.poll() is not None:
            time.sleep(0.3)  # the last lines
            raise AssertionError(f"kit serve exited {served.proc.returncode}:\n{served.text()}")
        time.sleep(0.2)
    stop_serve(served)
    raise AssertionError(f"kit serve was not ready in {timeout} s:\n{served.text()}")


def stop_serve(served: Served, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    children = served.server_pids()
    if served.proc.poll() is None:
        served.proc.send_signal(sig)
    try:
        code = served.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        code = served.proc.wait(10)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in children if _alive(pid)]
    assert not left, f"kit serve left llama-server running: {left}"
    return code


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def serving(stick: Path, *args: str, **kwargs) -> Iterator[Served]:
    served = start_serve(stick, *args, **kwargs)
    try:
        yield served
    finally:
        stop_serve(served)
