"""`kit serve` under load, on loopback, with real clients: a burst of 16 streaming OpenAI clients
(answered or cleanly refused, memory within the plan), a prompt larger than a slot's context (a
clean 400), and a client that hangs up mid-answer (its slot is freed)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import servekit
from conftest import run_kit

from kit import serve

pytestmark = pytest.mark.slow

NEVER = "<kit-test: a stop string no answer holds>"
MODEL_ID = "gemma-3-270m"  # manifests/demo.toml
CLIENTS = 16
BURST_SLOTS, BURST_CTX = "4", "1024"
BURST_LIMIT_S = 240
SAMPLE_S = 0.2
RAM_MARGIN = 1.2
QUESTION = "How do I purify water?"  # greedy, the demo model answers it (manifests/demo.toml)


def ask(served: servekit.Served, question: str = QUESTION, max_tokens: int = 32) -> str:
    code, body = served.request("/v1/chat/completions", {
        "model": MODEL_ID, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
        "temperature": 0})
    assert code == 200, (code, body)
    text = body["choices"][0]["message"]["content"]
    assert text.strip(), body
    return text


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Sampler:
    """VmRSS of kit serve plus its llama-server, every SAMPLE_S, on a thread of its own."""

    pids: list[int]
    peak: int = 0
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, sum(rss_bytes(pid) for pid in self.pids))
            self.samples += 1
            self.stop.wait(SAMPLE_S)


@dataclass
class Outcome:
    text: str = ""
    finish_reason: str | None = None
    refused: int | None = None  # the HTTP status of a clean refusal
    error: str | None = None
    seconds: float = 0.0


def stream_one(base: str, key: str | None, barrier: threading.Barrier, out: Outcome, n: int) -> None:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key=key or "none", max_retries=0, timeout=BURST_LIMIT_S)
    try:
        barrier.wait(timeout=60)
        start = time.monotonic()
        try:
            stream = client.chat.completions.create(
                model=MODEL_ID, stream=True, max_tokens=48, temperature=0, user=f"client-{n}",
                messages=[{"role": "user", "content": QUESTION}])
            for chunk in stream:
                for choice in chunk.choices:
                    out.text += choice.delta.content or ""
                    out.finish_reason = choice.finish_reason or out.finish_reason
        except openai.APIStatusError as exc:
            if exc.status_code == 503:
                out.refused = exc.status_code
            else:
                out.error = f"HTTP {exc.status_code}: {exc}"
        out.seconds = time.monotonic() - start
    except Exception as exc:  # noqa: BLE001 - reported by the test, never lost in a thread
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def planned_ram(stick: Path, *args: str) -> int:
    done = run_kit("doctor", "--serve", "--json", "--stick", str(stick), *args, timeout=900, check=True)
    return json.loads(done.stdout)["serve"]["estimate"]["ram"]


def test_sixteen_streaming_clients_at_once(demo_stick):
    args = ("--parallel", BURST_SLOTS, "--ctx", BURST_CTX)
    estimate = planned_ram(demo_stick, *args)  # also caches the kernel probe for kit serve
    with servekit.serving(demo_stick, *args) as served:
        children = served.server_pids()
        assert len(children) == 1, served.text()
        ask(served)  # warm: the burst measures serving, not the first page-in
        sampler = Sampler([served.proc.pid, *children])
        outcomes = [Outcome() for _ in range(CLIENTS)]
        barrier = threading.Barrier(CLIENTS + 1)
        threads = [threading.Thread(target=stream_one, args=(served.base, served.key, barrier, outcomes[i], i),
                                    daemon=True) for i in range(CLIENTS)]
        watcher = threading.Thread(target=sampler.run, daemon=True)
        watcher.start()
        for t in threads:
            t.start()
        barrier.wait(timeout=60)
        start = time.monotonic()
        deadline = start + BURST_LIMIT_S
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        took = time.monotonic() - start
        sampler.stop.set()
        watcher.join(timeout=5)
        assert not any(t.is_alive() for t in threads), f"clients still waiting after {BURST_LIMIT_S} s"

        answered = [o for o in outcomes if o.error is None and o.refused is None]
        refused = [o for o in outcomes if o.refused is not None]
        failed = [o for o in outcomes if o.error is not None]
        print(f"\n{CLIENTS} clients: {len(answered)} answered, {len(refused)} refused (503), {len(failed)} failed, "
              f"{took:.1f} s; slowest answer {max((o.seconds for o in answered), default=0):.1f} s")
        print(f"RSS peak {sampler.peak / 2**20:.1f} MiB over {sampler.samples} samples "
              f"(kit serve + llama-server); plan estimate {estimate / 2**20:.1f} MiB "
              f"(ratio {sampler.peak / estimate:.2f}, limit {RAM_MARGIN})")
        assert not failed, [o.error for o in failed]
        for o in answered:
            assert o.text.strip() and o.finish_reason in ("stop", "length"), o
        assert sampler.samples >= 3 and sampler.peak > 0
        assert sampler.peak <= RAM_MARGIN * estimate, (sampler.peak, estimate)

        assert served.proc.poll() is None, served.text()
        assert served.server_pids() == children, served.text()
        ask(served)


def test_prompt_larger_than_the_context_is_a_clean_400(demo_stick):
    with servekit.serving(demo_stick, "--parallel", "2", "--ctx", "512") as served:
        long_message = " ".join(f"stone{i} water shelter fire" for i in range(700))  # about 5,000 tokens
        code, body = served.request("/v1/chat/completions", {
            "model": MODEL_ID, "messages": [{"role": "user", "content": long_message}], "max_tokens": 16})
        print(f"\noversized prompt: HTTP {code}: {json.dumps(body)[:300]}")
        assert code == 400, (code, body)
        assert isinstance(body, dict) and body.get("error", {}).get("message"), body
        assert served.proc.poll() is None, served.text()
        ask(served)


def _busy(served: servekit.Served) -> int:
    """Slots answering now, as llama-server's /metrics counts them (/slots is off: it shows
    every person's conversation)."""
    code, body = served.request("/metrics", timeout=10)
    assert code == 200, (code, body)
    return int(serve.parse_metrics(body)["llamacpp:requests_processing"])


def test_client_that_hangs_up_mid_stream_frees_its_slot(demo_stick):
    with servekit.serving(demo_stick, "--parallel", "1", "--ctx", "2048") as served:
        # a stop string that never comes replaces the server's (a "###" ended this stream after 3
        # chunks once): with ignore_eos it writes until the client hangs up
        body = json.dumps({"model": MODEL_ID, "stream": True, "max_tokens": 1500, "ignore_eos": True,
                           "stop": [NEVER], "temperature": 0,
                           "messages": [{"role": "user", "content": "Write a long story about a river."}]})
        headers = {"Content-Type": "application/json"}
        if served.key:
            headers["Authorization"] = f"Bearer {served.key}"
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
        sock = None
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            sock = conn.sock
            response = conn.getresponse()
            assert response.status == 200, response.read()[:300]
            chunks = 0
            for _ in range(200):  # bounded: a few data: lines, then hang up
                line = response.readline()
                assert line, "the stream ended before a few chunks"
                chunks += line.startswith(b"data: {")
                if chunks >= 5:
                    break
            assert chunks >= 5
            assert _busy(served) == 1, "the slot was not busy mid-answer"
        finally:
            if sock is not None:  # the client goes away mid-answer
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            conn.close()
        hung_up = time.monotonic()
        freed = None
        for _ in range(100):  # bounded: 100 x 0.2 s
            if _busy(served) == 0:
                freed = time.monotonic() - hung_up
                break
            time.sleep(0.2)
        print(f"\nslot freed {freed if freed is None else round(freed, 1)} s after the client hung up "
              f"(1500 tokens would take far longer)")
        assert freed is not None and freed <= 20, "the slot still works for a client that is gone"
        assert served.proc.poll() is None, served.text()
        ask(served)
