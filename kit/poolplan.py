"""kit pool, the pure part: what a worker tells a lead, whether the lead may use it, and the pool
as the plan sees it.

A worker is llama.cpp's own rpc-server (the kit writes no distributed engine). rpc-server answers
one client at a time, speaks no version but its protocol's and offers a CPU's whole RAM as "free",
so the kit puts a small read-only facts port beside it (the worker's kit version, protocol, the
memory it offers and whether a lead already uses it: one JSON line, then the connection closes).
The lead reads the facts, checks the protocol again with rpc-server's own HELLO, and plans with
the pool as one more device: llama.cpp offloads the last layers to it, split over the workers in
proportion to what each offers (--tensor-split), and keeps the token embeddings at home.

Part of the pure core: no llama_cpp, no textual, no sockets here.
"""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from kit.errors import PoolError
from kit.hardware import Gpu
from kit.units import MiB, human_bytes

DEFAULT_PORT = 50052  # rpc-server's own default
FACTS_PORT_OFFSET = 1  # the facts port is the worker's port + 1
MAX_FACTS_BYTES = 4096
MAX_WORKERS = 16  # GGML_RPC_MAX_SERVERS
# ggml/include/ggml-rpc.h of the pinned llama.cpp (build/llama-cpp.env); tests/test_pool_plan.py
# reads the header and fails when a new pin changes it.
RPC_PROTOCOL = (7, 0, 0)
POOL_BACKEND = "rpc"
# What rpc-server itself holds beyond the tensors it is sent: its runtime and the ggml context.
WORKER_OVERHEAD = 64 * MiB
MIN_OFFER = 64 * MiB

# rpc-server's wire (ggml-rpc.cpp): | cmd (1 byte) | size (8 bytes, LE) | data |; the answer is
# | size (8) | data |. HELLO is command 14 in every version; its request is conn_caps[24], its
# answer major, minor, patch, padding and conn_caps[24]. Zero caps: plain TCP.
RPC_CMD_HELLO = 14
RPC_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE (ggml-rpc/transport.h)
HELLO_REQUEST = struct.pack("<BQ", RPC_CMD_HELLO, RPC_CONN_CAPS) + bytes(RPC_CONN_CAPS)
HELLO_ANSWER_BYTES = 8 + 4 + RPC_CONN_CAPS


def parse_hello_answer(raw: bytes) -> tuple[int, int, int]:
    """(major, minor, patch) from rpc-server's answer to HELLO_REQUEST; PoolError if it is not one."""
    if len(raw) < 8 + 3:
        raise PoolError("it closed the connection during the RPC greeting (not an rpc-server, or another version)")
    (size,) = struct.unpack_from("<Q", raw)
    if size != 4 + RPC_CONN_CAPS:
        raise PoolError(f"its RPC greeting has {size} bytes, not {4 + RPC_CONN_CAPS} (another protocol version)")
    return tuple(raw[8:11])


@dataclass(frozen=True)
class WorkerFacts:
    """What a worker's facts port says."""

    kit: str  # kit version
    protocol: tuple[int, int, int]  # rpc-server's, as the worker's own HELLO got it
    memory: int  # bytes offered to the pool
    threads: int
    kernel: str  # the CPU variant its probe chose
    busy: bool  # a lead is connected to its rpc-server now (it serves one at a time)

    def to_json(self) -> bytes:
        return (json.dumps({"survival-kit-pool": 1, **asdict(self)}) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerFacts:
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("survival-kit-pool") != 1:
                raise ValueError("not a kit pool worker")
            protocol = tuple(int(v) for v in data["protocol"])
            facts = cls(str(data["kit"]), protocol, int(data["memory"]), int(data["threads"]),
                        str(data["kernel"]), bool(data["busy"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError, RecursionError) as exc:
            raise PoolError(f"its facts port did not answer as a kit pool worker does ({exc})") from None
        if len(facts.protocol) != 3 or facts.memory < 0 or facts.threads < 1:
            raise PoolError("its facts are out of range")
        return facts


@dataclass(frozen=True)
class Worker:
    """A worker as the lead found it."""

    host: str
    port: int
    facts: WorkerFacts

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def protocol_text(protocol: Sequence[int]) -> str:
    return ".".join(map(str, protocol))


def refusal(facts: WorkerFacts, *, kit_version: str, protocol: tuple[int, int, int] = RPC_PROTOCOL) -> str | None:
    """Why the lead must not use this worker, in words; None when it may."""
    if facts.kit != kit_version:
        return f"it runs kit {facts.kit}, this lead kit {kit_version}: use sticks of one kit version"
    if tuple(facts.protocol) != tuple(protocol):
        return (f"its rpc-server speaks protocol {protocol_text(facts.protocol)}, this lead "
                f"{protocol_text(protocol)} (another llama.cpp build)")
    if facts.busy:
        return "it already serves another lead (a worker serves one at a time)"
    if facts.memory < MIN_OFFER:
        return f"it offers only {human_bytes(facts.memory)}"
    return None


_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


def parse_endpoint(text: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = text.strip(), str(default_port)
    if not _HOST.match(host or "") or not port_text.isdigit() or not 1 <= int(port_text) <= 65534:
        raise PoolError(f"{text!r} is not HOST:PORT", "give each worker as printed by `kit pool worker`, "
                        "e.g. --pool 192.168.1.20:50052,192.168.1.21:50052")
    return host, int(port_text)


def parse_pool(text: str) -> list[tuple[str, int]]:
    """--pool HOST:PORT,...: at most MAX_WORKERS, none twice."""
    found = [parse_endpoint(part) for part in text.split(",") if part.strip()]
    if not found:
        raise PoolError("--pool names no worker", "give HOST:PORT of each, comma-separated")
    if len(found) > MAX_WORKERS:
        raise PoolError(f"--pool names {len(found)} workers; llama.cpp takes at most {MAX_WORKERS}")
    if len(set(found)) != len(found):
        raise PoolError("--pool names a worker twice", "name each worker once")
    return found


def check_bind(address: str, *, trusted: bool) -> None:
    """A worker binds one address it is given: never every interface unless told it is safe."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise PoolError(f"--bind {address!r} is not an IP address",
                        "give this computer's address on the team's network, e.g. --bind 192.168.1.20") from None
    if ip.is_unspecified and not trusted:
        raise PoolError(f"--bind {address} would offer rpc-server on every network this computer is on; "
                        "rpc-server has no password and anyone who reaches it can use this computer",
                        "bind the one address the team uses, or add --i-trust-this-network")
    if ip.version != 4:
        raise PoolError(f"--bind {address}: the pool uses IPv4 addresses", "give an IPv4 address")


def offer(usable_ram: int, asked: int | None) -> tuple[int, str]:
    """The bytes a worker offers and why: what its plan leaves usable (less rpc-server's own),
    or --memory when that is no more."""
    most = max(0, usable_ram - WORKER_OVERHEAD)
    if asked is None:
        return most, f"offering {human_bytes(most)}: this computer's usable RAM, less rpc-server's own"
    if asked > most:
        raise PoolError(f"--memory {human_bytes(asked)} is more than this computer can lend "
                        f"({human_bytes(most)} usable)", f"give at most --memory {most // MiB}M")
    if asked < MIN_OFFER:
        raise PoolError(f"--memory {human_bytes(asked)} is too little to hold a layer",
                        f"give at least {MIN_OFFER // MiB}M")
    return asked, f"offering {human_bytes(asked)}, as asked"


def pool_gpu(workers: Sequence[Worker]) -> Gpu:
    """The pool as the plan sees it: one more device whose memory is what the workers offer
    (each has kept its own safety margin already)."""
    total = sum(w.facts.memory for w in workers)
    name = f"the pool of {len(workers)} worker{'s' if len(workers) != 1 else ''}"
    return Gpu(vendor="other", name=name, backend=POOL_BACKEND, vram_total=total, vram_free=total)


def tensor_split(workers: Sequence[Worker]) -> list[int]:
    """llama.cpp's --tensor-split proportions: what each offers, in MiB."""
    return [max(1, w.facts.memory // MiB) for w in workers]
