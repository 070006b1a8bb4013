"""kit pool, for real: `kit pool worker` processes on loopback addresses of their own (each in a
memory cgroup of its own where it matters), a lead whose memory is capped by a real cgroup below
what the demo model needs alone, llama.cpp's own rpc-server and llama-server between them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from cgroups import memory_limit, peak_usage
from conftest import run_kit
from poolkit import free_port_pair, read_facts, start_worker, stop_worker, workers
from servekit import free_port, serving, wait_ready

from kit import __version__, chatformat, ggml, launch, llamaserver, poolplan
from kit.conversation import choose_preset, first_messages
from kit.plan import Overrides
from kit.units import MiB

pytestmark = pytest.mark.slow
QUESTION = "How do I purify water?"
TOKENS = 32
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _chat(port: int, messages: list[dict], key: str | None = None, **extra) -> str:
    body = {"messages": messages, "max_tokens": TOKENS, "temperature": 0, "repeat_penalty": 1.1, **extra}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with LOOPBACK.open(request, timeout=300) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def _one_machine_answer(stick: Path, messages: list[dict], n_ctx: int) -> str:
    """The same question on one machine: the runtime's llama-server with the kit's own arguments for
    one slot of n_ctx tokens, the same probed kernel, every layer on this CPU. Weight repacking
    off: rpc-server's buffers are never repacked, and the repacked kernels add in another order."""
    opened = launch.open_stick(stick)
    kernel = launch.choose_kernel(opened)
    plan, serve_plan = launch.plan_serve(opened, Overrides(n_ctx=n_ctx), kernel, 1)
    model = opened.manifest.model(plan.model_id)
    port = free_port()
    template = None if model.model_facts().has_chat_template else chatformat.server_template(model.chat_format)
    stops = [] if template is None else chatformat.stop_strings(model.chat_format)
    spec = llamaserver.ServerSpec(ggml.tool_path("llama-server"), launch.model_paths(opened.bundle, model)[0],
                                  model.id, serve_plan, llamaserver.LOOPBACK, port, kernel.path,
                                  chat_template=template, stops=stops)
    argv = [*llamaserver.server_argv(spec), "--no-repack"]
    proc = subprocess.Popen(argv, env=llamaserver.server_env(spec, None), cwd=spec.executable.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with LOOPBACK.open(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        return _chat(port, messages)
    finally:
        proc.terminate()
        proc.wait(30)


def _messages(stick: Path) -> list[dict]:
    opened = launch.open_stick(stick)
    return first_messages(QUESTION, choose_preset(opened.manifest.presets, None))


def test_a_lead_too_small_for_the_model_answers_through_two_workers_as_one_machine_would(demo_stick):
    run_kit("doctor", "--stick", str(demo_stick), "--json", check=True, timeout=900)  # the kernel verdict, cached
    with memory_limit(2048 * MiB) as w1, memory_limit(2048 * MiB) as w2, \
            workers(demo_stick, ["127.0.0.2", "127.0.0.3"], "--memory", "900M", prefixes=[w1, w2]) as pool:
        endpoints = ",".join(w.endpoint for w in pool)
        # what the lead needs alone and pooled, read under a roomy cgroup (the same baseline)
        with memory_limit(2048 * MiB) as roomy:
            alone = json.loads(run_kit("doctor", "--stick", str(demo_stick), "--json", "--serve", "--parallel", "1",
                                       "--ctx", "2048", prefix=roomy, check=True).stdout)
            pooled = json.loads(run_kit("doctor", "--stick", str(demo_stick), "--json", "--pool", endpoints,
                                        "--parallel", "1", "--ctx", "2048", prefix=roomy, check=True).stdout)
        baseline = 2048 * MiB - alone["host"]["ram_available"]
        need_alone = min(v["needs"] for v in alone["plan"]["verdicts"])  # at the smallest context, CPU only
        need_pooled = pooled["serve"]["estimate"]["ram"]
        assert pooled["plan"]["gpu_layers"] == pooled["plan"]["settings"]["gpu_layers"] > 0
        assert need_pooled < need_alone, (need_pooled, need_alone)
        # a limit between the two: the plan keeps max(15 %, 512 MiB) of what is available free
        limit = baseline + 512 * MiB + (need_alone + need_pooled) // 2
        print(f"lead alone needs {need_alone / MiB:.0f} MiB, pooled {need_pooled / MiB:.0f} MiB; "
              f"cgroup limit {limit / MiB:.0f} MiB (baseline {baseline / MiB:.0f} MiB)")
        with memory_limit(limit) as lead:
            refused = run_kit("ask", "--stick", str(demo_stick), "--max-tokens", "8", QUESTION, prefix=lead)
            assert refused.returncode == 1, (refused.returncode, refused.stderr)
            assert "does not fit" in refused.stderr or "no model on this stick fits" in refused.stderr
            answered = run_kit("ask", "--stick", str(demo_stick), "--pool", endpoints, "--ctx", "2048",
                               "--temperature", "0", "--max-tokens", str(TOKENS), "-q", "--no-knowledge", QUESTION,
                               prefix=lead, timeout=900)  # the reference below is the model alone
            peak = peak_usage(lead.group)
        assert answered.returncode == 0, answered.stderr
        print(f"pooled lead peak (its cgroup, page cache included): {peak / MiB:.0f} MiB of {limit / MiB:.0f}")
    reference = _one_machine_answer(demo_stick, _messages(demo_stick), 2048)
    assert answered.stdout.strip() == reference.strip(), (answered.stdout, reference)


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_worker_lost_mid_answer_is_reported_and_the_lead_goes_on_without_it(demo_stick, how):
    """killed: SIGKILL (its rpc-server dies with it, the connection breaks); frozen: SIGSTOP of both,
    a laptop that hangs or a cut cable: connected but silent, which llama-server would wait on forever."""
    worker = start_worker(demo_stick, "127.0.0.2")
    frozen = [worker.proc.pid, *worker.rpc_pids()]
    try:
        with serving(demo_stick, "--pool", worker.endpoint) as served:
            assert "pool:" in served.text()
            body = {"messages": [{"role": "user", "content": "Write a long story about a river."}],
                    "max_tokens": 2000, "stream": True, "stop": ["\x00never\x00"]}
            request = urllib.request.Request(served.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            chunks, ended = [], threading.Event()

            def read():
                try:
                    with LOOPBACK.open(request, timeout=120) as response:
                        for line in response:
                            chunks.append(line)
                except OSError:
                    pass
                ended.set()

            threading.Thread(target=read, daemon=True).start()
            deadline = time.monotonic() + 120
            while len(chunks) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(chunks) >= 10, served.text()
            killed_at = time.monotonic()
            if how == "killed":
                worker.proc.send_signal(signal.SIGKILL)  # the laptop is gone: its rpc-server dies with it
            else:
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
            assert ended.wait(30), "the answer did not end within 30 s of the worker's death"
            while "going on without the pool" not in served.text() and time.monotonic() - killed_at < 30:
                time.sleep(0.2)
            assert "going on without the pool" in served.text(), served.text()
            reported = time.monotonic() - killed_at
            print(f"worker {how}: answer ended, lead reported it and went on alone after {reported:.1f} s")
            assert reported < 30
            assert f"pool worker {worker.endpoint} stopped answering" in served.text()
            # usable again: the same port answers, from this computer alone
            served.out.clear()
            wait_ready(served)
            answer = _chat(served.port, [{"role": "user", "content": "Say hello."}], max_tokens=8)
            assert answer.strip()
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stop_worker(worker)


class _FakeWorker:
    """A listener that speaks like a worker but is another build: facts as given, and an rpc port
    that answers HELLO with `protocol`; it records every byte sent to the rpc port."""

    def __init__(self, facts: dict, protocol: tuple[int, int, int]):
        self.host, self.port = "127.0.0.4", free_port_pair("127.0.0.4")
        self.received = b""
        self.rpc = socket.create_server((self.host, self.port))
        self.facts = socket.create_server((self.host, self.port + 1))
        self.protocol, self.facts_bytes = protocol, (json.dumps(facts) + "\n").encode()
        threading.Thread(target=self._serve, args=(self.facts, self._answer_facts), daemon=True).start()
        threading.Thread(target=self._serve, args=(self.rpc, self._answer_rpc), daemon=True).start()

    @staticmethod
    def _serve(listener: socket.socket, answer) -> None:
        """Each connection in turn, until the listener is closed."""
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    answer(conn)

    def _answer_facts(self, conn: socket.socket) -> None:
        conn.sendall(self.facts_bytes)

    def _answer_rpc(self, conn: socket.socket) -> None:
        while len(self.received) < len(poolplan.HELLO_REQUEST):
            chunk = conn.recv(4096)
            if not chunk:
                break
            self.received += chunk
        conn.sendall(struct.pack("<Q", 28) + bytes(self.protocol) + bytes(25))
        while chunk := conn.recv(4096):  # anything after HELLO would be a tensor command
            self.received += chunk

    def close(self):
        self.rpc.close()
        self.facts.close()


def _facts(**changes) -> dict:
    facts = {"survival-kit-pool": 1, "kit": __version__, "protocol": list(poolplan.RPC_PROTOCOL),
             "memory": 2048 * MiB, "threads": 2, "kernel": "x64", "busy": False}
    return {**facts, **changes}


@pytest.mark.parametrize(("facts", "protocol", "said"), [
    (_facts(protocol=[6, 0, 0]), (6, 0, 0), "speaks protocol 6.0.0"),
    (_facts(), (6, 1, 0), "greets with protocol 6.1.0"),
    (_facts(kit="0.0.1"), poolplan.RPC_PROTOCOL, "it runs kit 0.0.1"),
    (_facts(busy=True), poolplan.RPC_PROTOCOL, "already serves another lead"),
])
def test_a_worker_of_another_build_is_refused_before_any_tensor_is_sent(demo_stick, facts, protocol, said):
    fake = _FakeWorker(facts, protocol)
    try:
        done = run_kit("serve", "--stick", str(demo_stick), "--port", str(free_port()), "--pool",
                       f"{fake.host}:{fake.port}", timeout=120)
    finally:
        fake.close()
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert said in done.stderr and "refused" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert fake.received in (b"", poolplan.HELLO_REQUEST), fake.received  # a greeting at most, never a tensor


def test_the_worker_binds_only_the_address_it_was_given(demo_stick):
    worker = start_worker(demo_stick, "127.0.0.2", "--memory", "512M")
    try:
        facts = read_facts(worker)
        assert facts["memory"] == 512 * MiB and facts["kit"] == __version__
        assert tuple(facts["protocol"]) == poolplan.RPC_PROTOCOL
        assert "WARNING: rpc-server has no password" in worker.text()
        for other in ("127.0.0.1", "127.0.0.5"):
            for port in (worker.port, worker.port + 1):
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((other, port), timeout=3).close()
        (rpc,) = worker.rpc_pids()
        environ = Path(f"/proc/{rpc}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith((b"HOME=", b"XDG_"))]  # no cache in the host's home
        assert b"--cache" not in Path(f"/proc/{rpc}/cmdline").read_bytes().split(b"\0")
    finally:
        stop_worker(worker)


def test_every_interface_needs_the_explicit_opt_in(demo_stick):
    done = run_kit("pool", "worker", "--stick", str(demo_stick), "--bind", "0.0.0.0", timeout=60)
    assert done.returncode == 1 and "--i-trust-this-network" in done.stderr, done.stderr
    done = run_kit("pool", "worker", "--stick", str(demo_stick), "--bind", "10.0.0.1:5", timeout=60)
    assert done.returncode == 1 and "not an IP address" in done.stderr, done.stderr


def test_a_pool_nobody_answers_is_one_sentence(demo_stick):
    port = free_port_pair("127.0.0.6")
    done = run_kit("doctor", "--stick", str(demo_stick), "--pool", f"127.0.0.6:{port}", timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"no kit pool worker answers at 127.0.0.6:{port}" in done.stderr
    assert "Traceback" not in done.stderr
