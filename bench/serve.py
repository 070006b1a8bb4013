"""8. Serving a team: `kit serve --parallel 4` (llama.cpp's llama-server behind the kit) answering
1, 2 and 4 streaming clients at once, and the same llama-server started bare, side by side.

- Clients: real streaming HTTP requests to /v1/chat/completions (http.client, one thread each,
  released together by a barrier), the same question, temperature 0, a fixed max_tokens with
  "ignore_eos" so every stream writes exactly that many tokens, and "cache_prompt": false so each
  request reads its whole prompt, as a new person's would. Tokens are counted from the usage the
  server sends in its last chunk; a round's aggregate rate is every stream's completion tokens
  over the round's wall time (first request sent to last stream ended). Time to first token is
  from a request sent to its first chunk with content.
- Three servers up at once, one asked at a time (an idle llama-server uses no CPU): kit serve;
  **bare**, llama-server with exactly the argv and environment kit serve gave its own child (read
  from /proc/PID/cmdline and /environ: GGML_BACKEND_PATH, the kernel, is the same) on a sealed
  memfd copy of the model made by the kit's own call, so that what differs is only the kit around it
  (its status loop's /metrics request every second, its process); and **bare on the file**, the
  same but the stick's model file in place of the sealed copy, to show what the sealed copy's
  memory costs on this host. Each bare server gets its own port (and the CORS origin naming it)
  and a copy of kit serve's page folder (which goes when it stops).
- Paired: for each of 1, 2, 4 streams the three sides run one round each, seconds apart (their
  order rotated every pass), `passes` times per start. Ratios are medians of those pairs as well
  as of the medians, so a busy minute on this shared host hurts every side of a pair alike.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import Section, compare, compare_paired, fmt, median, say, spread, tests_module
from bench.context import QUICK, Context

SCALING_TARGET = 2.0  # 4 streams' aggregate rate over one stream's, on this 2-core machine
BARE_TARGET = 0.97  # kit serve / bare llama-server, same argv
STREAMS = (1, 2, 4)
SLOTS = 4
QUESTION = "How do I purify water?"
READY_S = 180.0
REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ServeSizes:
    alternations: int  # starts of the three servers
    passes: int  # passes of 1, 2, 4 streams (each side once, order rotated) per start: a multiple of 3
    max_tokens: int


FULL_SIZES = ServeSizes(alternations=2, passes=6, max_tokens=128)
QUICK_SIZES = ServeSizes(alternations=1, passes=1, max_tokens=32)
SETTLE_S = 0.5  # between rounds: the last server's workers stop polling for work (6.5 M pause loops)


@dataclass
class StreamResult:
    sent: float  # perf_counter when the request went out
    first: float | None  # ... when the first chunk with content came
    ended: float
    tokens: int  # completion tokens, from the server's usage (else the content chunks)
    chunks: int  # chunks with content
    server_tps: float | None  # the server's own timings.predicted_per_second for this stream

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent


# ---------------------------------------------------------------- clients


NO_STOP = "<kit-bench: a stop string no answer holds>"


def request_body(max_tokens: int) -> dict:
    return {"model": "any", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "cache_prompt": False, "stream": True,
            # replaces the server's stop strings ("###" ...), which ignore_eos does not override
            "stop": [NO_STOP], "stream_options": {"include_usage": True}}


def stream_one(port: int, body: dict, key: str | None = None, timeout: float = REQUEST_TIMEOUT_S) -> StreamResult:
    """One streaming chat completion, read chunk by chunk as a client would."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        payload = json.dumps(body).encode()
        sent = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=payload, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"llama-server answered {response.status}: {response.read()[:300]!r}")
        first, chunks, tokens, server_tps = None, 0, None, None
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
            if event.get("timings"):
                server_tps = event["timings"].get("predicted_per_second")
        ended = time.perf_counter()
    finally:
        conn.close()
    return StreamResult(sent, first, ended, chunks if tokens is None else int(tokens), chunks, server_tps)


@dataclass
class Round:
    streams: int
    seconds: float  # first request sent to last stream ended
    tokens: int
    results: list[StreamResult]

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def concurrent_round(port: int, streams: int, body: dict, key: str | None = None) -> Round:
    """`streams` clients released together; every one must finish (an error fails the round)."""
    barrier = threading.Barrier(streams)
    results: list[StreamResult | None] = [None] * streams
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = stream_one(port, body, key)
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S + 60)
    if errors or any(r is None for r in results):
        raise RuntimeError(f"a client of {streams} failed: {errors[0] if errors else 'timed out'}")
    done = [r for r in results if r is not None]
    seconds = max(r.ended for r in done) - min(r.sent for r in done)
    return Round(streams, seconds, sum(r.tokens for r in done), done)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); NaN when there are none."""
    kept = sorted(v for v in values if v is not None and v == v)
    if not kept:
        return float("nan")
    pos = (len(kept) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(kept) - 1)
    return kept[low] + (kept[high] - kept[low]) * (pos - low)


# ---------------------------------------------------------------- the servers


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...] = ()  # the sealed copy's descriptor, for /proc/self/fd/N


def read_command(pid: int) -> ServerCommand:
    """The exact command line and environment of a running process."""
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    env = dict(item.decode().split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
               if b"=" in item)
    return ServerCommand(argv, env)


def bare_argv(argv: list[str], model_file: Path, page_dir: Path | None, port: int) -> list[str]:
    """kit serve's llama-server argv with `model_file` for kit serve's sealed copy
    (/proc/self/fd/N), `page_dir` for its page folder and `port` for its port; the rest as it was."""
    out = list(argv)
    kit_port = out[out.index("--port") + 1]
    for i, arg in enumerate(out[:-1]):
        if arg == "--model" and out[i + 1].startswith("/proc/self/fd/"):
            out[i + 1] = str(model_file)
        elif arg == "--path" and page_dir is not None:
            out[i + 1] = str(page_dir)
        elif arg == "--port":
            out[i + 1] = str(port)
        elif arg == "--cors-origins":
            out[i + 1] = out[i + 1].replace(f":{kit_port}", f":{port}")
    if "--host" not in out or out[out.index("--host") + 1] != "127.0.0.1":
        raise RuntimeError("kit serve's llama-server is not on loopback: the bench only serves on 127.0.0.1")
    return out


def wait_health(port: int, proc: subprocess.Popen, timeout: float = READY_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bare llama-server exited {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as r:
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"bare llama-server was not ready in {timeout:.0f} s")


@contextlib.contextmanager
def bare_server(command: ServerCommand, port: int, log: Path):
    with open(log, "ab") as out:
        proc = subprocess.Popen(command.argv, env=command.env, cwd=Path(command.argv[0]).parent,
                                pass_fds=command.pass_fds, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        try:
            wait_health(port, proc)
        except RuntimeError as exc:
            tail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"{exc}: {tail}") from None
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextlib.contextmanager
def kit_server(stick: Path, port: int):
    servekit = tests_module("servekit")
    served = servekit.start_serve(stick, "--parallel", str(SLOTS), port=port)
    try:
        pids = served.server_pids()
        if len(pids) != 1:
            raise RuntimeError(f"kit serve has {len(pids)} llama-server children, not one")
        yield served, pids[0]
    finally:
        servekit.stop_serve(served)


def banner_line(served) -> str:
    return next((line for line in served.out if line.startswith("Serving ")), "")


# ---------------------------------------------------------------- the section


def stick_model(stick: Path, alias: str):
    """The stick's bundle paths and the manifest entry of its model `alias` (one file)."""
    from kit import signing
    from kit.paths import find_bundle

    bundle = find_bundle(stick)
    manifest = signing.check_stick(bundle).manifest
    model = manifest.model(alias)
    if len(model.files) != 1:
        raise RuntimeError(f"{model.id} is split into {len(model.files)} files: the bench serves one-file models")
    return bundle, next(f for f in manifest.files if f.path == model.files[0])


def _arg(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else "?"


SIDES = ("kit", "bare", "file")  # kit serve; bare llama-server on a sealed copy; bare on the model file


def sealed_copy(kit_dir: Path, entry) -> int:
    """A sealed memfd of the stick's model made by the kit's own call (kit.integrity.seal_entry,
    as kit serve makes its copy), for the bare server: its descriptor, for pass_fds."""
    from kit import integrity

    status, copy = integrity.seal_entry(kit_dir, entry)
    if copy is None:
        raise RuntimeError(f"the bench could not make a sealed copy of {entry.path}: {status.state} {status.detail}")
    return copy.fd


def run(ctx: Context) -> Section:
    sizes = QUICK_SIZES if ctx.sizes == QUICK else FULL_SIZES
    stick = ctx.stick
    servekit = tests_module("servekit")
    ports = {side: servekit.free_port() for side in SIDES}
    body = request_body(sizes.max_tokens)
    warm_body = request_body(8)
    say(f"serve: {sizes.alternations} starts of kit serve, bare llama-server on a sealed copy and on the file "
        f"(ports {', '.join(map(str, ports.values()))}), {sizes.passes} passes of "
        f"{', '.join(map(str, STREAMS))} streams on each, paired, {sizes.max_tokens} tokens a stream")
    rounds: dict[str, dict[int, list[Round]]] = {side: {n: [] for n in STREAMS} for side in SIDES}
    commands: dict[str, ServerCommand] = {}
    banner = ""
    loads: list[list[float]] = []

    with tempfile.TemporaryDirectory(prefix="kit-bench-serve-") as tmp, contextlib.ExitStack() as held:
        page_copy = Path(tmp) / "page"
        for i in range(sizes.alternations):
            say(f"serve: start {i + 1}/{sizes.alternations}")
            with kit_server(stick, ports["kit"]) as (served, pid), contextlib.ExitStack() as servers:
                if not commands:
                    found = read_command(pid)
                    page = _arg(found.argv, "--path")
                    if page != "?":
                        shutil.copytree(page, page_copy)
                    pages = page_copy if page != "?" else None
                    bundle, entry = stick_model(stick, _arg(found.argv, "--alias"))
                    model_file = bundle.resolve(entry.path)
                    fd = sealed_copy(bundle.kit, entry)
                    held.callback(os.close, fd)
                    commands["bare"] = ServerCommand(bare_argv(found.argv, Path(f"/proc/self/fd/{fd}"), pages,
                                                               ports["bare"]), found.env, (fd,))
                    commands["file"] = ServerCommand(bare_argv(found.argv, model_file, pages, ports["file"]),
                                                     found.env)
                    banner = banner_line(served)
                for side in ("bare", "file"):
                    servers.enter_context(bare_server(commands[side], ports[side], Path(tmp) / f"{side}.log"))
                keys = {"kit": served.key, "bare": None, "file": None}
                for side in SIDES:
                    concurrent_round(ports[side], SLOTS, warm_body, keys[side])  # untimed: every slot has run once
                for p in range(sizes.passes):
                    order = SIDES[p % 3:] + SIDES[:p % 3]
                    for n in STREAMS:
                        for side in order:
                            time.sleep(SETTLE_S)
                            rounds[side][n].append(concurrent_round(ports[side], n, body, keys[side]))
                    loads.append([round(x, 1) for x in os.getloadavg()])

    return _section(sizes, rounds, commands["bare"], banner, loads)


def _section(sizes: ServeSizes, rounds: dict[str, dict[int, list[Round]]], command: ServerCommand,
             banner: str, loads: list[list[float]]) -> Section:
    tps = {side: {n: [r.tps for r in rs] for n, rs in by_n.items()} for side, by_n in rounds.items()}
    ttft = {side: {n: [s.ttft for r in rs for s in r.results] for n, rs in by_n.items()}
            for side, by_n in rounds.items()}
    short = sorted({s.tokens for by_n in rounds.values() for rs in by_n.values() for r in rs for s in r.results
                    if s.tokens != sizes.max_tokens})

    def pairs(mine: list[float], theirs: list[float]) -> float:
        return compare_paired("", mine, theirs, BARE_TARGET).value

    def ttfts(side: str, n: int) -> str:
        return f"{fmt(percentile(ttft[side][n], 50), 2)} / {fmt(percentile(ttft[side][n], 95), 2)}"

    section = Section("8. Serving a team: kit serve --parallel 4 vs bare llama-server",
                      ["streams", "kit serve tok/s", "kit range", "bare tok/s", "bare range", "kit / bare (pairs)",
                       "bare on the file tok/s", "sealed copy / file (pairs)", "vs 1 stream (kit)",
                       "TTFT p50 / p95, s (kit)", "TTFT p50 / p95, s (bare)"])
    one = median(tps["kit"][1])
    for n in STREAMS:
        kit_n, bare_n = median(tps["kit"][n]), median(tps["bare"][n])
        section.rows.append([str(n), fmt(kit_n), spread(tps["kit"][n]), fmt(bare_n), spread(tps["bare"][n]),
                             fmt(pairs(tps["kit"][n], tps["bare"][n]), 3), fmt(median(tps["file"][n])),
                             fmt(pairs(tps["bare"][n], tps["file"][n]), 3), fmt(kit_n / one, 2),
                             ttfts("kit", n), ttfts("bare", n)])
    scaling = "serve: 4 streams / 1 stream, kit serve"
    section.ratios += compare(scaling, tps["kit"][4], tps["kit"][1], SCALING_TARGET)
    section.ratios.append(compare_paired(scaling, tps["kit"][4], tps["kit"][1], SCALING_TARGET))
    # llama-server's own batching here, with no kit around it: what 4:1 can be on this host
    section.ratios.append(compare_paired("serve: 4 streams / 1 stream, bare llama-server", tps["bare"][4],
                                         tps["bare"][1], SCALING_TARGET))
    for n in (1, 4):
        name = f"serve: kit serve / bare llama-server, {n} stream{'s' if n > 1 else ''}"
        section.ratios += compare(name, tps["kit"][n], tps["bare"][n], BARE_TARGET)
        section.ratios.append(compare_paired(name, tps["kit"][n], tps["bare"][n], BARE_TARGET))
    server_tps = [s.server_tps for r in rounds["kit"][1] for s in r.results if s.server_tps]
    argv = command.argv
    section.notes += [
        banner or "kit serve's banner not read",
        f"llama-server --parallel {_arg(argv, '--parallel')} --ctx-size {_arg(argv, '--ctx-size')} "
        f"--threads {_arg(argv, '--threads')} --flash-attn {_arg(argv, '--flash-attn')}, "
        f"GGML_BACKEND_PATH {Path(command.env.get('GGML_BACKEND_PATH', '?')).name} on every side; bare: the same "
        "argv and environment on a sealed copy made by the bench; bare on the file: the stick's model file",
        f"{sizes.max_tokens} tokens a stream (ignore_eos, temperature 0, cache_prompt off); aggregate = "
        f"completion tokens / the round's wall time; median of {sizes.alternations * sizes.passes} rounds per "
        f"cell ({sizes.alternations} starts x {sizes.passes} passes; the three servers up, one asked at a time, "
        "paired per number of streams)",
        "every stream wrote exactly max_tokens" if not short else f"some streams stopped short: {short} tokens",
        f"one stream, the server's own generation rate (timings): median {fmt(median(server_tps))} tok/s",
        "sealed copy / file: the memfd's 4 KiB shmem pages against the file's page cache, which on this "
        "host's ext4 holds in large folios that llama.cpp's mmap maps as 2 MiB pages (FilePmdMapped)",
        f"TTFT: request sent to its first content chunk, over every stream of the round; load average after "
        f"each pass {loads}",
    ]
    env = {k: v for k, v in command.env.items() if k != "LLAMA_API_KEY"}  # a result file holds no key
    section.data = {"sizes": asdict(sizes), "argv_bare": argv, "env": env, "loads": loads,
                    "rounds": {side: {str(n): [{"streams": r.streams, "seconds": r.seconds, "tokens": r.tokens,
                                                "tps": r.tps, "streams_detail": [asdict(s) for s in r.results]}
                                               for r in rs] for n, rs in by_n.items()}
                               for side, by_n in rounds.items()}}
    return section
