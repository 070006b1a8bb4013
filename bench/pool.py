"""9. Pooling laptops: `kit serve --pool` over two `kit pool worker`s vs `kit serve` alone, one
streaming client, the pool on loopback and behind an added network delay.

- Workers: two `kit pool worker --threads 1` processes on 127.0.0.2 and 127.0.0.3 of this machine.
  The same 2 cores do every side's work, so the pooled rows show what the RPC hops cost, not more
  compute: llama.cpp runs the layers one device after the other (the pool lends memory, not speed).
- Delay: `tc netem` is not in this kernel ("Specified qdisc kind is unknown"), so a TCP relay in
  this process stands between the lead and each worker (its rpc-server port and its facts port)
  and holds every chunk d/2 in each direction before passing it on: d more round-trip time,
  chunks still pipelined (a reader and a writer thread per direction). The relay costs time of
  its own (Python threads on the same 2 cores): its +0 ms row is the baseline for the delays.
- Interleaved: alone, pool direct, relay +0, +2, +20 ms, repeated; each start answers one untimed
  warm-up, then `runs` timed streams of exactly max_tokens tokens (ignore_eos, the bench's stop
  string no answer holds); tok/s is the server's own generation rate for the stream
  (timings.predicted_per_second: the prompt is not generation), TTFT from request to first chunk.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import Section, fmt, median, say, spread, tests_module
from bench.context import QUICK, Context
from bench.serve import request_body, stream_one

DELAYS_MS = (0, 2, 20)  # through the relay; "pool, direct" has none
WORKER_HOSTS = ("127.0.0.2", "127.0.0.3")


@dataclass(frozen=True)
class PoolSizes:
    rounds: int
    runs: int  # timed streams per start
    max_tokens: int


FULL_SIZES = PoolSizes(rounds=2, runs=3, max_tokens=64)
QUICK_SIZES = PoolSizes(rounds=1, runs=1, max_tokens=16)


# ---------------------------------------------------------------- the delaying relay


class DelayRelay:
    """127.0.0.1:port (and port + 1) -> target:target_port (+ 1), each chunk held `one_way` s."""

    def __init__(self, target: str, target_port: int, one_way: float):
        self.one_way = one_way
        self.listeners = []
        self.port = tests_module("poolkit").free_port_pair()
        for offset in (0, 1):
            listener = socket.create_server(("127.0.0.1", self.port + offset))
            self.listeners.append(listener)
            threading.Thread(target=self._accept, args=(listener, (target, target_port + offset)),
                             daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self, listener: socket.socket, target: tuple[str, int]) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(target, timeout=10)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
            for src, dst in ((client, upstream), (upstream, client)):
                self._pipe(src, dst)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        held: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()

        def read() -> None:
            while True:
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                with ready:
                    held.append((time.monotonic() + self.one_way, data))
                    ready.notify()
                if not data:
                    return

        def write() -> None:
            while True:
                with ready:
                    while not held:
                        ready.wait()
                    due, data = held.popleft()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


# ---------------------------------------------------------------- the section


@contextlib.contextmanager
def _served(stick: Path, pool: str | None) -> Iterator[object]:
    servekit = tests_module("servekit")
    served = servekit.start_serve(stick, "--parallel", "1", *(("--pool", pool) if pool else ()))
    try:
        yield served
    finally:
        servekit.stop_serve(served)


def run(ctx: Context) -> Section:
    sizes = QUICK_SIZES if ctx.sizes == QUICK else FULL_SIZES
    stick = ctx.stick
    poolkit = tests_module("poolkit")
    body, warm = request_body(sizes.max_tokens), request_body(4)
    sides = ["alone", "pool, direct", *(f"pool via relay +{d} ms" for d in DELAYS_MS)]
    tps: dict[str, list[float]] = {s: [] for s in sides}
    ttft: dict[str, list[float]] = {s: [] for s in sides}
    layers = ""
    say(f"pool: {sizes.rounds} x ({', '.join(sides)}), {sizes.runs} streams of {sizes.max_tokens} tokens each")
    # one thread each: the lead and two workers share this machine's 2 cores, where separate laptops
    # would each have their own; more threads here only make them wait for each other
    with poolkit.workers(stick, WORKER_HOSTS, "--threads", "1") as workers:
        for i in range(sizes.rounds):
            for side, delay in zip(sides, (None, "direct", *DELAYS_MS), strict=True):
                say(f"pool: round {i + 1}/{sizes.rounds}, {side}")
                relays = [DelayRelay(w.host, w.port, delay / 2000) for w in workers] if isinstance(delay, int) else []
                try:
                    pool = None if delay is None else ",".join(r.endpoint for r in relays) if relays else \
                        ",".join(w.endpoint for w in workers)
                    with _served(stick, pool) as served:
                        if delay == "direct":
                            layers = next((ln.strip() for ln in served.out if ln.strip().startswith("pool:")), "")
                        stream_one(served.port, warm, served.key)
                        for _ in range(sizes.runs):
                            result = stream_one(served.port, body, served.key)
                            tps[side].append(result.server_tps or float("nan"))
                            ttft[side].append(result.ttft or float("nan"))
                finally:
                    for relay in relays:
                        relay.close()
    alone = median(tps["alone"])
    section = Section("9. Pooling laptops: kit serve --pool (two workers) vs kit serve alone",
                      ["lead", "generation tok/s", "range", "vs alone", "TTFT s (median)"])
    for side in sides:
        section.rows.append([side, fmt(median(tps[side])), spread(tps[side]), fmt(median(tps[side]) / alone, 2),
                             fmt(median(ttft[side]), 2)])
    section.notes += [
        f"one streaming client, {sizes.max_tokens} tokens a stream, {sizes.runs} streams per start, "
        f"{sizes.rounds} rounds interleaved; load average at the end {[round(x, 1) for x in os.getloadavg()]}",
        f"{layers or 'pool: (no banner line)'}; both workers run on this machine's same 2 cores",
        "added delay: a relay in this process holding each chunk d/2 each way (tc netem is not in this "
        "kernel); its own cost is the +0 ms row against the direct one",
    ]
    section.data = {"tps": tps, "ttft": ttft, "sizes": vars(sizes)}
    return section
