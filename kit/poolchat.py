"""`kit ask --pool` and `kit chat --pool`: the chat front ends on a pooled model.

llama-cpp-python has no RPC (it dropped rpc_servers in 0.3.10), so a pooled chat goes through
llama-server, as kit serve starts it (kit.serve.start: the same checks, plan and verified bytes),
on loopback with a random key and no page; `ServerChatEngine` streams its answers into the same
ChatEngine interface the chat and `kit ask` use. A worker that stops answering ends the answer
with kit.errors.PoolLost within seconds (kit.pool.PoolWatch), never a hang.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kit import pool, serve
from kit.conversation import DEFAULT_MAX_TOKENS
from kit.engine import ChatEngine, GenStats, Message
from kit.errors import EngineError
from kit.launch import Session
from kit.plan import Overrides

_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))
READ_POLL_S = 1.0  # how often a silent stream looks at the pool
ANSWER_TIMEOUT_S = 600.0  # a whole answer, at most
REPEAT_PENALTY = 1.1  # kit.engine.LlamaEngine's: the same answer at temperature 0


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerChatEngine(ChatEngine):
    """A kit-started llama-server as a ChatEngine (one slot: one conversation at a time)."""

    server: serve.Server
    model_id: str
    n_ctx: int
    last_stats: GenStats | None = None
    _watch: pool.PoolWatch | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.server.serving.pool:
            self._watch = pool.PoolWatch(self.server.serving.pool)

    def stream(self, messages: Sequence[Message], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               stop: threading.Event | None = None, temperature: float = 0.3) -> Iterator[str]:
        stats = GenStats()
        self.last_stats = stats
        body = {"model": self.model_id, "messages": list(messages), "stream": True, "max_tokens": max_tokens,
                "temperature": temperature, "repeat_penalty": REPEAT_PENALTY}
        lines: queue.Queue = queue.Queue()
        request = urllib.request.Request(self.server.process.base + "/v1/chat/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.server.serving.key}"})
        cancel = threading.Event()
        reader = threading.Thread(target=_read_stream, args=(request, lines, cancel), daemon=True)
        start = time.perf_counter()
        reader.start()
        try:
            while True:
                if stop is not None and stop.is_set():
                    stats.stopped = True
                    return
                try:
                    kind, value = lines.get(timeout=READ_POLL_S)
                except queue.Empty:
                    self._check(start)
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    self._check(start, force=True)
                    raise EngineError(f"the pooled server stopped answering: {value}",
                                      "ask again; if it keeps failing, run `kit doctor --pool ...`")
                text = value
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - start
                stats.completion_tokens += 1
                stats.seconds = time.perf_counter() - start
                yield text
        finally:
            cancel.set()  # the reader closes its connection: llama-server stops generating

    def _check(self, start: float, *, force: bool = False) -> None:
        if self._watch is not None:
            gone = self._watch.lost(force=force)
            if gone:
                self.server.process.kill()  # blocked on the lost worker: it would never answer
                raise pool.lost_error(gone)
        if not self.server.process.running():
            raise EngineError(f"the pooled server stopped: {self.server.process.death()}")
        if time.perf_counter() - start > ANSWER_TIMEOUT_S:
            raise EngineError(f"no answer in {ANSWER_TIMEOUT_S:.0f} s", "ask again, or use a smaller model")

    def close(self) -> None:
        self.server.close()


def _read_stream(request: urllib.request.Request, lines: queue.Queue, cancel: threading.Event) -> None:
    """Server-sent events from llama-server: each delta's text onto `lines`, then ("end", None)."""
    try:
        with _LOOPBACK.open(request, timeout=ANSWER_TIMEOUT_S) as response:
            for raw in response:
                if cancel.is_set():
                    return
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        lines.put(("text", text))
        lines.put(("end", None))
    except (OSError, ValueError) as exc:
        lines.put(("error", getattr(exc, "reason", None) or exc))


def start_pooled(stick, endpoints: Sequence[tuple[str, int]], overrides: Overrides | None = None, *,
                 on_progress=None, on_status=lambda s: None) -> Session:
    """launch.start's counterpart for a pool: a Session whose engine is a private llama-server."""
    options = serve.ServeOptions(port=free_loopback_port(), parallel=1, pool=tuple(endpoints), private=True)
    server = serve.start(stick, overrides or Overrides(), options, on_status=on_status, on_progress=on_progress)
    s = server.serving
    engine = ServerChatEngine(server, s.model.id, s.serve_plan.slot_ctx)
    opened = server.opened
    return Session(opened.bundle, opened.manifest, opened.host, s.plan, s.kernel, engine, opened.state,
                   signer=opened.trust.signer_label, load_mode=s.load_mode)
