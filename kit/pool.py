"""kit pool: several laptops lend their memory to run a model none of them holds alone, through
llama.cpp's own RPC backend (rpc-server on each worker, llama-server --rpc on the lead).

The worker: its own runtime verified, its CPU kernel probed (not ggml's pick), rpc-server bound to
the one address given, with a clean environment and no tensor cache (nothing on the host's disk),
and the kit's read-only facts port beside it (kit.poolplan). The lead's side: each worker's facts
read and its protocol checked with rpc-server's own HELLO before llama-server sends any tensor,
and a worker that stops answering found within seconds (bounded timeouts everywhere).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from kit import __version__, ggml, launch, poolplan
from kit.child import ChildProcess, check_port_free
from kit.errors import PoolError, PoolLost
from kit.plan import make_budget
from kit.poolplan import Worker, WorkerFacts
from kit.units import human_bytes

Status = Callable[[str], None]
CONNECT_TIMEOUT_S = 3.0
READY_TIMEOUT_S = 30.0
CHECK_EVERY_S = 4.0  # the lead asks each worker's facts port this often while it serves
MISSES_LOST = 2  # unanswered checks in a row before a worker counts as gone (~15 s at most)
BUSY_RETRY_S = 1.0
TOOL = "ggml-rpc-server"


# ---------------------------------------------------------------- talking to a worker


def _read(sock: socket.socket, want: int, deadline: float) -> bytes:
    """Up to `want` bytes, or what came before EOF, by `deadline`: one bound for the whole read,
    not per recv, so a peer that trickles a byte at a time cannot hold the lead."""
    data = b""
    while len(data) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(left)
        chunk = sock.recv(want - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_facts(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> WorkerFacts:
    """The facts a worker's facts port (port + 1) gives; PoolError when it gives none."""
    facts_port = port + poolplan.FACTS_PORT_OFFSET
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, facts_port), timeout=timeout) as sock:
            raw = _read(sock, poolplan.MAX_FACTS_BYTES + 1, deadline)
    except OSError as exc:
        raise PoolError(f"no kit pool worker answers at {host}:{port} ({exc.strerror or exc} on its facts port "
                        f"{facts_port})", "start `kit pool worker --bind ADDR` on that computer, and check the "
                        "address and that both are on the same network") from None
    if len(raw) > poolplan.MAX_FACTS_BYTES:
        raise PoolError(f"{host}:{port} sent more than a worker's facts")
    return WorkerFacts.from_json(raw)


def hello(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> tuple[int, int, int]:
    """rpc-server's protocol version, from its own greeting (nothing else is sent)."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(poolplan.HELLO_REQUEST)
            raw = _read(sock, poolplan.HELLO_ANSWER_BYTES, deadline)
    except OSError as exc:
        raise PoolError(f"rpc-server at {host}:{port} did not greet ({exc.strerror or exc})") from None
    return poolplan.parse_hello_answer(raw)


def find_worker(host: str, port: int) -> Worker:
    """A worker the lead may use: its facts, then rpc-server's own HELLO; one sentence if not."""
    try:
        facts = read_facts(host, port)
        if facts.busy:  # its last lead may have just let go (the facts follow rpc-server's log)
            time.sleep(BUSY_RETRY_S)
            facts = read_facts(host, port)
        why = poolplan.refusal(facts, kit_version=__version__)
        if why is None:
            spoken = hello(host, port)
            if spoken != tuple(facts.protocol):
                why = (f"its rpc-server greets with protocol {poolplan.protocol_text(spoken)}, not the "
                       f"{poolplan.protocol_text(facts.protocol)} its facts say")
    except PoolError as err:
        raise PoolError(f"worker {host}:{port}: {err}", err.hint) from None
    if why:
        raise PoolError(f"worker {host}:{port} refused: {why}", "start the worker from a stick of this kit version, "
                        "or leave it out of --pool")
    return Worker(host, port, facts)


def find_pool(endpoints: Sequence[tuple[str, int]], on_status: Status = lambda s: None) -> list[Worker]:
    workers = []
    for host, port in endpoints:
        worker = find_worker(host, port)
        on_status(f"pool worker {worker.endpoint}: kit {worker.facts.kit}, protocol "
                  f"{poolplan.protocol_text(worker.facts.protocol)}, offers {human_bytes(worker.facts.memory)}")
        workers.append(worker)
    return workers


@dataclass
class PoolWatch:
    """The lead's check that every worker still answers: a worker whose facts port stays silent
    MISSES_LOST times in a row is gone (a killed laptop, a cut cable: no hang)."""

    workers: Sequence[Worker]
    misses: dict[str, int] = field(default_factory=dict)
    _last: float = 0.0

    def lost(self, *, now: float | None = None, force: bool = False) -> Worker | None:
        now = time.monotonic() if now is None else now
        if not force and now - self._last < CHECK_EVERY_S:
            return None
        self._last = now
        for worker in self.workers:
            try:
                read_facts(worker.host, worker.port, timeout=CONNECT_TIMEOUT_S)
                if force:  # llama-server has ended (only then is rpc-server free to greet): did it crash alone?
                    hello(worker.host, worker.port, timeout=CONNECT_TIMEOUT_S)
                self.misses[worker.endpoint] = 0
            except PoolError:
                self.misses[worker.endpoint] = self.misses.get(worker.endpoint, 0) + 1
                if force or self.misses[worker.endpoint] >= MISSES_LOST:
                    return worker
        return None

    def check(self, server: ChildProcess, *, force: bool = False) -> None:
        """PoolLost when a worker is gone, `server` (llama-server) killed first: it may be blocked
        on that worker and would never finish. `force` (something went wrong) asks every worker
        now, and greets each rpc-server when `server` has ended (only then is rpc-server free)."""
        gone = self.lost(force=force and not server.running())
        if gone is None:
            return
        server.kill()
        raise PoolLost(f"pool worker {gone.endpoint} stopped answering; the answer in progress has ended",
                       "start the worker again, or go on without the pool")


# ---------------------------------------------------------------- the worker


class RpcServerProcess(ChildProcess):
    name = "rpc-server"
    error = PoolError

    def __init__(self, *args, **kwargs):
        self.busy = False
        super().__init__(*args, **kwargs)

    def on_line(self, line: str) -> None:
        if "Accepted client connection" in line:
            self.busy = True
        elif "Client connection closed" in line:
            self.busy = False


@dataclass(frozen=True)
class WorkerOptions:
    bind: str
    port: int = poolplan.DEFAULT_PORT
    memory: int | None = None  # bytes; None: what this computer can lend
    threads: int | None = None  # None: one per physical core
    trusted: bool = False  # --i-trust-this-network: 0.0.0.0 allowed


@dataclass
class RunningWorker:
    options: WorkerOptions
    facts: WorkerFacts
    offer_reason: str
    process: RpcServerProcess
    _facts_socket: socket.socket
    _closing: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self):
        self._thread = threading.Thread(target=self._serve_facts, daemon=True, name="pool-facts")
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.options.bind}:{self.options.port}"

    def current_facts(self) -> WorkerFacts:
        return replace(self.facts, busy=self.process.busy)

    def _serve_facts(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._facts_socket.accept()
            except OSError:
                if self._closing.is_set():
                    return  # closed
                time.sleep(0.1)  # ECONNABORTED, EMFILE...: a healthy worker keeps answering
                continue
            with conn:
                with contextlib.suppress(OSError):
                    conn.settimeout(CONNECT_TIMEOUT_S)
                    conn.sendall(self.current_facts().to_json())

    def wait(self, stop: threading.Event, interval: float = 0.5) -> None:
        """Until `stop` is set; rpc-server stopping by itself is a PoolError."""
        while not stop.is_set():
            if not self.process.running():
                raise PoolError(self.process.death(), "start the worker again")
            stop.wait(interval)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._facts_socket.shutdown(socket.SHUT_RDWR)
        self._facts_socket.close()
        self.process.stop()
        self._thread.join(timeout=2)


def start_worker(stick, options: WorkerOptions, *, on_status: Status = lambda s: None,
                 on_progress=None) -> RunningWorker:
    """Everything up to rpc-server answering on options.bind:options.port."""
    poolplan.check_bind(options.bind, trusted=options.trusted)
    opened = launch.open_stick(stick)
    tool = ggml.tool_path(TOOL)
    if not tool.is_file():
        raise PoolError(f"this runtime has no rpc-server ({tool})",
                        "kit pool runs on Linux, from a stick built by this kit's `kit build`")
    check_port_free(options.bind, options.port, PoolError)
    try:  # held from now on: nothing can take it while the kernel is probed
        facts_socket = socket.create_server((options.bind, options.port + poolplan.FACTS_PORT_OFFSET))
    except OSError as exc:
        raise PoolError(f"port {options.port + poolplan.FACTS_PORT_OFFSET} is not free on {options.bind} "
                        f"({exc.strerror or exc})",
                        "choose another --port: the worker uses it and the next one") from None
    try:
        return _start_worker(opened, tool, options, facts_socket, on_status, on_progress)
    except BaseException:
        facts_socket.close()
        raise


def _start_worker(opened, tool, options: WorkerOptions, facts_socket: socket.socket, on_status: Status,
                  on_progress) -> RunningWorker:
    """start_worker's rest, with the facts port held."""
    threads = options.threads or max(1, opened.host.physical_cores or 1)
    most = max(opened.host.logical_cores, opened.host.physical_cores, 1)
    if not 1 <= threads <= most:
        raise PoolError(f"--threads must be between 1 and {most} (this computer's logical cores), not {threads}",
                        "give a number in that range, or leave --threads out")
    memory, why = poolplan.offer(make_budget(opened.host).ram, options.memory)
    launch.verify_own_tools(opened.bundle, opened.manifest, opened.host.platform, tool.parent)
    on_status("choosing the CPU kernel (a short probe with the stick's smallest model)")
    kernel = launch.choose_kernel(opened, progress=on_progress,
                                  on_probe=lambda r: on_status(f"probed CPU kernel {r.variant}: {r.state}"))
    # no --cache: rpc-server would keep tensors in the host's ~/.cache; no HOME for it to find one
    argv = [str(tool), "--host", options.bind, "--port", str(options.port), "--threads", str(threads)]
    env = {"GGML_BACKEND_PATH": str(kernel.path), "PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    launch.recheck_tools(kernel.path)
    process = RpcServerProcess(argv, env, cwd=tool.parent)
    try:
        protocol = _wait_ready(process, options)
    except BaseException:
        process.stop()
        raise
    facts = WorkerFacts(__version__, protocol, memory, threads, kernel.chosen, False)
    return RunningWorker(options, facts, why, process, facts_socket)


def _wait_ready(process: RpcServerProcess, options: WorkerOptions) -> tuple[int, int, int]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not process.running():
            raise PoolError(process.death())
        with contextlib.suppress(PoolError):
            return hello(options.bind, options.port, timeout=1.0)
        time.sleep(0.2)
    raise PoolError(f"rpc-server did not answer on {options.bind}:{options.port} in {READY_TIMEOUT_S:.0f} s",
                    "start the worker again; KIT_DEBUG=1 shows rpc-server's last lines")
