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
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kit import pool, serve
from kit.conversation import DEFAULT_MAX_TOKENS
from kit.engine import ChatEngine, GenStats, Message
from kit.errors import EngineError
from kit.launch import Session
from kit.plan import Overrides

READ_POLL_S = 1.0  # how often a silent stream looks at the pool
SILENCE_TIMEOUT_S = 300.0  # between two pieces of an answer (a long prompt is read first), at most
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
                "temperature": temperature, "repeat_penalty": REPEAT_PENALTY,
                "stream_options": {"include_usage": True}}
        lines: queue.Queue = queue.Queue()
        cancel = threading.Event()
        reader = threading.Thread(target=_read_stream, args=(self.server.process, body, lines, cancel), daemon=True)
        start = last = time.perf_counter()
        reader.start()
        try:
            while True:
                if stop is not None and stop.is_set():
                    stats.stopped = True
                    return
                try:
                    kind, value = lines.get(timeout=READ_POLL_S)
                except queue.Empty:
                    self._check(last)
                    continue
                if kind == "end":
                    return
                if kind == "usage":
                    stats.context_used = int(value.get("prompt_tokens", 0)) + int(value.get("completion_tokens", 0))
                    continue
                if kind == "refused":  # llama-server answered, with an error: not the pool's
                    raise _refusal(value)
                if kind == "error":
                    self._check(last, force=True)
                    raise EngineError(f"the pooled server stopped answering: {value}",
                                      "ask again; if it keeps failing, run `kit doctor --pool ...`")
                text = value
                last = time.perf_counter()
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - start
                stats.completion_tokens += 1
                stats.seconds = time.perf_counter() - start
                yield text
        finally:
            cancel.set()  # the reader closes its connection: llama-server stops generating

    def _check(self, since: float, *, force: bool = False) -> None:
        """The pool, the server, and the time since the last piece of the answer."""
        if self._watch is not None:
            self._watch.check(self.server.process, force=force)
        if not self.server.process.running():
            raise EngineError(f"the pooled server stopped: {self.server.process.death()}")
        if time.perf_counter() - since > SILENCE_TIMEOUT_S:
            raise EngineError(f"the pooled server wrote nothing for {SILENCE_TIMEOUT_S:.0f} s",
                              "ask again, or use a smaller model")

    def close(self) -> None:
        self.server.close()


def _refusal(body: str) -> EngineError:
    """llama-server's error answer as the engine's sentence (a full context, as LlamaEngine says it)."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body.strip()[:200] or "no reason given"
    if "context" in message.lower() or "exceed" in message.lower():
        return EngineError(f"the conversation no longer fits the context: {message}",
                           "start a new conversation (the context is full)")
    return EngineError(f"the model could not answer: {message}",
                       "start a new conversation, or choose another preset or model")


def _read_stream(server: serve.ServerProcess, body: dict, lines: queue.Queue, cancel: threading.Event) -> None:
    """Server-sent events from llama-server: each delta's text onto `lines`, then ("end", None);
    every failure becomes one item on `lines` (never a traceback from this thread)."""
    try:
        with server.open("/v1/chat/completions", body, timeout=SILENCE_TIMEOUT_S) as response:
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
                if chunk.get("usage"):
                    lines.put(("usage", chunk["usage"]))
        lines.put(("end", None))
    except urllib.error.HTTPError as exc:
        lines.put(("refused", exc.read().decode("utf-8", "replace")))
    except Exception as exc:  # noqa: BLE001 - a cut stream (IncompleteRead), a reset, a bad chunk
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
