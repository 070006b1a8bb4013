"""`kit pool worker` as the tests run it: a real subprocess on a real stick, bound to a loopback
address of its own (127.0.0.2, 127.0.0.3, ...: all of 127/8 is this machine's), its banner
awaited, stopped with SIGTERM, and checked to leave no rpc-server behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_S = 300  # a first start probes the CPU kernels


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P with P and P + 1 free on `host` (the worker's rpc-server and facts ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s:
                try:
                    s.bind((host, port + 1))
                    return port
                except OSError:
                    continue
    raise AssertionError("no two free ports in a row")


@dataclass
class PoolWorker:
    proc: subprocess.Popen
    host: str
    port: int
    out: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def text(self) -> str:
        return "\n".join(self.out)

    def rpc_pids(self) -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and cmd.endswith(b"ggml-rpc-server"):
                found.append(int(pid))
        return found


def _pump(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line.rstrip("\n"))


def start_worker(stick: Path, host: str, *args: str, port: int | None = None,
                 prefix: Sequence[str] = ()) -> PoolWorker:
    port = port or free_port_pair(host)
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "kit", "pool", "worker", "--stick", str(stick),
                             "--bind", host, "--port", str(port), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    worker = PoolWorker(proc, host, port)
    threading.Thread(target=_pump, args=(proc.stdout, worker.out), daemon=True).start()
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if any("Ctrl+C stops the worker." in line for line in worker.out):
            return worker
        if proc.poll() is not None:
            time.sleep(0.3)
            raise AssertionError(f"kit pool worker exited {proc.returncode}:\n{worker.text()}")
        time.sleep(0.2)
    stop_worker(worker)
    raise AssertionError(f"kit pool worker was not ready in {READY_S} s:\n{worker.text()}")


def stop_worker(worker: PoolWorker, sig: int = signal.SIGTERM) -> None:
    children = worker.rpc_pids()
    if worker.proc.poll() is None:
        worker.proc.send_signal(sig)
    try:
        worker.proc.wait(30)
    except subprocess.TimeoutExpired:
        worker.proc.kill()
        worker.proc.wait(10)
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in children if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
    assert not left, f"kit pool worker left rpc-server running: {left}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@contextmanager
def workers(stick: Path, hosts: Sequence[str], *args: str, prefixes: Sequence[Sequence[str]] = ()
            ) -> Iterator[list[PoolWorker]]:
    started: list[PoolWorker] = []
    try:
        for i, host in enumerate(hosts):
            started.append(start_worker(stick, host, *args, prefix=prefixes[i] if prefixes else ()))
        yield started
    finally:
        for worker in started:
            stop_worker(worker)


def read_facts(worker: PoolWorker) -> dict:
    with socket.create_connection((worker.host, worker.port + 1), timeout=5) as s:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return json.loads(data)
