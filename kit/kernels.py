"""CPU kernel variants: which libggml-cpu-<variant> this runtime ships, which this CPU can run,
which really work (probed in a child process, where a SIGILL is harmless), which is fastest.

ggml's own choice scores variants by CPUID and picks one that can die with SIGILL on hosts
that advertise more than they run (docs/ARCHITECTURE.md, trap 4). The kit never loads an unprobed variant.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from kit import sealed
from kit.errors import KernelError, KitError, describe_error
from kit.ggml import VARIANT_FLAGS, Variant, list_variants
from kit.hardware import Host

PROBE_TIMEOUT_S = 120
PROBE_PROMPT_TOKENS = 64
PROBE_GEN_TOKENS = 16


@dataclass(frozen=True)
class ProbeResult:
    variant: str
    state: str  # "ok" | "crashed" | "failed" | "skipped" (the CPU lacks its instructions)
    detail: str = ""
    prompt_tps: float | None = None  # prompt tokens per second (batch decode)
    gen_tps: float | None = None  # generated tokens per second
    seconds: float | None = None  # wall time of the measured work (best round); the ranking key
    score: int | None = None  # ggml_backend_score, measured in the child; None: not asked
    rounds: int = 0  # timed rounds behind the figures

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass(frozen=True)
class KernelChoice:
    chosen: str
    path: Path
    results: tuple[ProbeResult, ...]
    cached: bool

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "cached": self.cached, "results": [asdict(r) for r in self.results]}


def missing_flags(variant: Variant, flags: frozenset[str]) -> list[str]:
    return [f for f in variant.required_flags if f not in flags]


def candidates(variants: list[Variant], host: Host) -> tuple[list[Variant], list[ProbeResult]]:
    """Variants worth probing, and verdicts for those this CPU rules out by its flags."""
    keep, skipped = [], []
    for v in variants:
        if v.name not in VARIANT_FLAGS:
            skipped.append(ProbeResult(v.name, "skipped", "unknown variant: never loaded"))
            continue
        missing = missing_flags(v, host.cpu_flags) if host.cpu_flags else []
        if missing:
            skipped.append(ProbeResult(v.name, "skipped", f"CPU lacks {', '.join(missing)}"))
        else:
            keep.append(v)
    return keep, skipped


# ---------------------------------------------------------------- the probe child (`kit _probe`)

# What each answer line holds: {"error": sentence} is the other well-formed answer to any of them.
_ANSWER_KEYS = {"score": ("score",), "load": ("loaded_s",), "round": ("prompt_tps", "gen_tps", "seconds")}
_PROBE_KEYS = _ANSWER_KEYS["round"]


class _ChildBench:
    """What a probe child holds between commands: the variant, then the loaded model."""

    def __init__(self, variant_path: Path, model: Path, blake3: str, threads: int):
        self.variant_path, self.model, self.blake3, self.threads = variant_path, model, blake3, threads
        self.bench = None  # kit.engine.BenchModel, once loaded
        self.warm = False

    def score(self) -> dict:
        from kit.ggml import backend_score

        return {"score": backend_score(self.variant_path)}

    def load(self) -> dict:
        """Verify the model, register the variant, load: no computing (see round)."""
        from kit import engine, integrity
        from kit.settings import EngineSettings

        start = time.perf_counter()
        if not integrity.verify_file(self.model, self.blake3):
            raise KitError("model bytes do not match the manifest")
        settings = EngineSettings(n_ctx=engine.bench_context(PROBE_PROMPT_TOKENS, PROBE_GEN_TOKENS),
                                  threads=self.threads, n_batch=PROBE_PROMPT_TOKENS)
        engine.ensure_backend(self.variant_path)
        self.bench = engine.BenchModel.load(self.model, settings, prompt_tokens=PROBE_PROMPT_TOKENS)
        return {"loaded_s": time.perf_counter() - start}

    def round(self) -> dict:
        """One timed batch decode and greedy generation (kit.engine.BenchModel.round)."""
        if self.bench is None:
            self.load()
        bench = self.bench
        if not self.warm:
            # The whole batch once, untimed (buffers are sized on first use). Not in load():
            # children load side by side, and computing there would crowd the cores.
            bench.llm.eval(bench.tokens)
            self.warm = True
        prompt_s, gen_s = bench.round(PROBE_GEN_TOKENS)
        return {"prompt_tps": len(bench.tokens) / prompt_s, "gen_tps": PROBE_GEN_TOKENS / gen_s,
                "seconds": prompt_s + gen_s, "prompt_tokens": len(bench.tokens), "gen_tokens": PROBE_GEN_TOKENS}

    def one_shot(self) -> dict:
        """No commands given: the classic probe, best of three rounds in one line."""
        rounds = [self.round() for _ in range(3)]
        best = min(rounds, key=lambda r: r["seconds"])
        return {**best, "prompt_tps": max(r["prompt_tps"] for r in rounds),
                "gen_tps": max(r["gen_tps"] for r in rounds)}


def protocol_out():
    """A private copy of stdout for the answer lines; fd 1 then points at stderr, so that native
    chatter on stdout can never be read as an answer."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return out


def probe_child(variant_path: Path, model: Path, blake3: str, threads: int, *, serve: bool = False) -> int:
    """Body of `kit _probe`. Served (`--serve`, as ProbeChild runs it): one JSON line for each
    command read on stdin ("score", "load", "round") until EOF. Otherwise one line for the
    classic probe (load, best of three rounds). Any error becomes {"error": sentence} through the
    one error table and ends the child; a crash in the kernel kills the process, which the parent
    reads from the signal."""
    from kit import offline

    offline.go_offline()
    out = protocol_out()
    bench = _ChildBench(variant_path, model, blake3, threads)
    commands = (line.strip() for line in sys.stdin) if serve else iter(["one_shot"])
    for command in commands:
        if serve and command not in _ANSWER_KEYS:
            print(json.dumps({"error": f"unknown probe command {command!r}"}), file=out, flush=True)
            return 2
        code = answer_line(out, getattr(bench, command))
        if code:
            return code
    return 0


def answer_line(out, work) -> int:
    """One protocol line from `work()`: its answer, or {"error": sentence} through the one error
    table; the exit code the child should end with (0: go on)."""
    try:
        answer = work()
    except Exception as err:  # every failure is reported on the protocol line
        what, _fix, code = describe_error(err)
        print(json.dumps({"error": what}), file=out, flush=True)
        return code
    print(json.dumps(answer), file=out, flush=True)
    return 0


def parse_answer(line: str, keys: tuple[str, ...] = _PROBE_KEYS) -> dict | None:
    """One answer line: a dict with numbers under `keys`, or {"error": sentence}; else None."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if "error" in data:
        return {"error": str(data["error"])}
    if not all(isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool) for k in keys):
        return None
    return data


def parse_probe_line(stdout: str) -> dict | None:
    """A one-shot child's whole stdout: exactly one well-formed result line, else None."""
    lines = stdout.strip().splitlines()
    return parse_answer(lines[0]) if len(lines) == 1 else None


# ---------------------------------------------------------------- driving a probe child

def kit_command(*args: str) -> list[str]:
    """This kit run as a child: the frozen runtime runs itself; a Python install runs `python -m kit`."""
    head = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "kit"]
    return [*head, *args]


def probe_command(variant: Variant, model: Path, blake3: str, threads: int, *, serve: bool = False) -> list[str]:
    return kit_command("_probe", "--variant", str(variant.path), "--model", str(model),
                       "--blake3", blake3, "--threads", str(threads), *(["--serve"] if serve else []))


def spawn(command: list[str]) -> subprocess.Popen:
    """The one place probe children (these and kit.gpuprobe's) are started. A model given as a
    sealed copy's /proc/self/fd/N (kit.sealed) is inherited under the same number: the child
    hashes and loads the very bytes the parent verified, not the stick's file."""
    inherited = tuple(fd for fd in map(sealed.fd_of, command) if fd is not None)
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1, pass_fds=inherited)


def signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class ProbeChild:
    """One variant's `kit _probe` child, asked one command at a time. Its crash stays in it:
    `verdict` then says "crashed" (a signal) or "failed" (an error line, a timeout, bad output),
    and every later answer is None."""

    def __init__(self, variant: Variant, model: Path, blake3: str, threads: int, first: str = "score"):
        self.variant = variant
        self.verdict: ProbeResult | None = None
        self._proc = spawn(probe_command(variant, model, blake3, threads, serve=True))
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pending: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()  # a timeout that works on every OS
        self.send(first)

    def _read(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, command: str) -> None:
        if self.verdict is not None:
            return
        try:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        except OSError:  # it died already; receive() says how
            pass
        self._pending.append(command)

    def receive(self, timeout: float = PROBE_TIMEOUT_S) -> dict | None:
        """The answer to the oldest command sent, or None (and `verdict` says why)."""
        if self.verdict is not None or not self._pending:
            return None
        command = self._pending.pop(0)
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self._fail("failed", f"no answer to {command!r} within {timeout:.0f} s")
            return None
        if line is None:
            try:
                code = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # stdout closed, process hung: end it
                self._proc.kill()
                code = self._proc.wait()
            if code < 0:
                self._fail("crashed", signal_name(code))
            else:
                self._fail("failed", f"the probe gave no result line (exit code {code})")
            return None
        data = parse_answer(line, _ANSWER_KEYS[command])
        if data is None or "error" in data:
            self._fail("failed", str((data or {}).get("error", f"a malformed answer to {command!r}"))[:200])
            return None
        return data

    def ask(self, command: str, timeout: float = PROBE_TIMEOUT_S) -> dict | None:
        self.send(command)
        return self.receive(timeout)

    def _fail(self, state: str, detail: str) -> None:
        self.verdict = ProbeResult(self.variant.name, state, detail)
        self.close()

    def close(self, wait: bool = True) -> None:
        """EOF ends a healthy child; one that does not end soon is killed."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        if not wait:
            return
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def probe_variant(variant: Variant, model: Path, blake3: str, threads: int,
                  timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """One variant on its own: load, best of three rounds, in a child."""
    child = ProbeChild(variant, model, blake3, threads, first="load")
    try:
        child.receive(timeout)
        rounds = [child.ask("round", timeout) for _ in range(3)]
    finally:
        child.close()
    if child.verdict is not None:
        return child.verdict
    return summary(variant.name, rounds)


def summary(name: str, rounds: list[dict], score: int | None = None) -> ProbeResult:
    """A variant's verdict from its rounds: each figure the best seen (disturbance only slows)."""
    return ProbeResult(name, "ok", "", max(r["prompt_tps"] for r in rounds), max(r["gen_tps"] for r in rounds),
                       min(r["seconds"] for r in rounds), score=score, rounds=len(rounds))


# ---------------------------------------------------------------- the policy: which few, how many rounds

FIELD = 3  # variants timed at once: ggml's best-scored few that load
MAX_ROUNDS = 3
ROUNDS_SETTING = "KIT_PROBE_ROUNDS"


def max_rounds() -> int:
    """MAX_ROUNDS, or fewer where KIT_PROBE_ROUNDS (1-3) says so: on a very slow CPU (an emulator, an
    old netbook) a round takes many seconds; fewer rounds make a choice among close variants less sure."""
    try:
        return min(MAX_ROUNDS, max(1, int(os.environ.get(ROUNDS_SETTING, MAX_ROUNDS))))
    except ValueError:
        return MAX_ROUNDS


# From round 2 on, a variant whose best round is this much slower than the leader's best cannot
# win. Never after one round: a busy moment on a shared machine has cost one round 15x here.
DROP = 1.15
TIE = 0.03  # within this share of the fastest, ggml's higher score decides (measurement noise)
SCORE_TIMEOUT_S = 30


def by_score(scores: dict[str, int]) -> list[str]:
    """ggml's order, best first; equal scores keep the listing order."""
    return sorted(scores, key=lambda name: -scores[name])


def beaten(best: dict[str, float], margin: float = DROP) -> list[str]:
    """Those that cannot win: even their best round is `margin` times slower than the leader's
    (disturbance only adds time, and interleaving spreads it over every variant alike)."""
    leader = min(best.values())
    return [name for name, seconds in best.items() if seconds > leader * margin]


def settled(best: dict[str, float]) -> bool:
    """Every remaining variant within TIE of the leader: more rounds would not change the pick."""
    leader = min(best.values())
    return all(seconds <= leader * (1 + TIE) for seconds in best.values())


def pick(results: list[ProbeResult]) -> ProbeResult | None:
    """The fastest working variant; among those within TIE of it, ggml's top-scored one."""
    working = [r for r in results if r.ok and r.seconds]
    if not working:
        return None
    fastest = min(r.seconds for r in working)
    close = [r for r in working if r.seconds <= fastest * (1 + TIE)]
    return max(close, key=lambda r: (r.score or 0, -r.seconds))


class ProbeField:
    """One group's probe: score every candidate in its child, load the best few, time them in
    interleaved rounds (A B C, A B C) until the rest cannot win."""

    def __init__(self, group: list[Variant], model: Path, blake3: str, threads: int, on_result):
        self.children = {v.name: ProbeChild(v, model, blake3, threads) for v in group}
        self.on_result = on_result
        self.results: list[ProbeResult] = []
        self.scores: dict[str, int] = {}
        self.rounds: dict[str, list[dict]] = {}
        self.trace: list[tuple[str, str]] = []  # (variant, command) in the order asked
        self._beaten = 0

    def run(self, slots: int) -> list[ProbeResult]:
        try:
            waiting = self._score()
            active = self._load(waiting, slots)
            for round_no in range(max_rounds()):
                self._round(active)
                active += self._load(waiting, slots - len(active) - self._beaten)  # a crash's slot is refilled
                if self._decided(active, round_no):
                    break
            self._round([n for n in active if not self.rounds[n]])  # a late replacement: timed once
            for name in active:
                if self.rounds[name]:
                    self._finish(name)
            self.results += [ProbeResult(n, "skipped", "not probed: ggml scores the probed variants higher",
                                         score=self.scores[n]) for n in waiting]
        finally:
            for child in self.children.values():  # EOF to all first: they exit side by side
                child.close(wait=False)
            for child in self.children.values():
                child.close()
        return self.results

    def _round(self, active: list[str]) -> None:
        """One timed round of each, in ggml's order; a crash leaves the field."""
        for name in list(active):
            answer = self._ask(name, "round")
            if answer is None:
                active.remove(name)
            else:
                self.rounds[name].append(answer)

    def _decided(self, active: list[str], round_no: int) -> bool:
        """From round 2: drop those that cannot win; decided when one is left or the rest are tied."""
        if not active or round_no < 1 or not all(self.rounds[n] for n in active):
            return not active
        measured = {n: min(r["seconds"] for r in self.rounds[n]) for n in active}
        for name in beaten(measured):
            active.remove(name)
            self._beaten += 1
            self._finish(name)
        return len(active) <= 1 or settled({n: measured[n] for n in active})

    def _score(self) -> list[str]:
        for name, child in self.children.items():  # each was asked for its score as it started
            self.trace.append((name, "score"))
            answer = child.receive(SCORE_TIMEOUT_S)
            if answer is None:
                self._record(child.verdict)
            elif answer["score"] <= 0:
                self._record(ProbeResult(name, "skipped", "ggml scores it 0: it cannot run on this CPU", score=0))
                child.close(wait=False)
            else:
                self.scores[name] = int(answer["score"])
        return by_score(self.scores)

    def _load(self, waiting: list[str], slots: int) -> list[str]:
        """Load the next `slots` by score, side by side; one that fails gives its slot to the next."""
        loaded: list[str] = []
        while waiting and len(loaded) < slots:
            batch = [waiting.pop(0) for _ in range(min(slots - len(loaded), len(waiting)))]
            for name in batch:
                self.trace.append((name, "load"))
                self.children[name].send("load")
            for name in batch:
                if self.children[name].receive() is None:
                    self._record(self.children[name].verdict)
                else:
                    self.rounds[name] = []
                    loaded.append(name)
        return loaded

    def _ask(self, name: str, command: str) -> dict | None:
        self.trace.append((name, command))
        answer = self.children[name].ask(command)
        if answer is None:
            self._record(self.children[name].verdict)
        return answer

    def _finish(self, name: str) -> None:
        """Its verdict; the child stays idle until the end (its exit would disturb the others' rounds)."""
        self._record(summary(name, self.rounds[name], self.scores[name]))

    def _record(self, result: ProbeResult) -> None:
        if result.score is None and result.variant in self.scores:
            result = replace(result, score=self.scores[result.variant])
        self.results.append(result)
        if self.on_result:
            self.on_result(result)


def probe_slots(model: Path, host: Host) -> int:
    """How many variants may hold the model at once: each child maps it and repacks its weights
    (about twice the file); half the free memory stays free for everything else."""
    try:
        per_child = 2 * model.stat().st_size
    except OSError:
        return 1
    if not host.ram_available:
        return FIELD  # unknown: the probe model is the stick's smallest
    return max(1, min(FIELD, host.ram_available // (2 * per_child)))


def probe(group: list[Variant], model: Path, blake3: str, threads: int, *, slots: int = FIELD,
          on_result=None) -> list[ProbeResult]:
    return ProbeField(group, model, blake3, threads, on_result).run(slots)


# ---------------------------------------------------------------- choosing, with a per-CPU cache

_RESULT_FIELDS = {f.name for f in fields(ProbeResult)}
CACHE_FORMAT = "v2"  # results carry score and rounds: a runtime before them must not read them


def _cache_key(host: Host, variants: list[Variant]) -> str:
    names = ",".join(v.name for v in variants)
    return f"{CACHE_FORMAT}:{host.cpu_signature()}:{names}"


KERNEL_VERDICTS = "kernel-probe.json"
_memory_cache: dict[str, dict[str, dict]] = {}  # per file name: verdicts a read-only stick could not keep


def read_verdicts(state: Path | None, saved: Path | None = None, name: str = KERNEL_VERDICTS) -> dict[str, dict]:
    """Probe verdicts (this one and kit.gpuprobe's) from the writable state folder; on a
    read-only stick, those saved on it earlier (read, never written) plus this run's memory."""
    folder = state or saved
    data: dict = {}
    if folder is not None:
        try:
            loaded = json.loads((folder / name).read_text())
            data = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            data = {}
    return data if state is not None else {**data, **_memory_cache.get(name, {})}


def _cached_results(entry: dict) -> tuple[ProbeResult, ...] | None:
    """An entry's results, fields this version does not know dropped; None when unreadable."""
    try:
        return tuple(ProbeResult(**{k: v for k, v in r.items() if k in _RESULT_FIELDS}) for r in entry["results"])
    except (KeyError, TypeError, AttributeError):
        return None


def write_verdicts(state: Path | None, cache: dict[str, dict], name: str = KERNEL_VERDICTS) -> None:
    if state is None:
        _memory_cache.setdefault(name, {}).update(cache)
        return
    from kit.fsutil import atomic_write

    try:
        atomic_write(state / name, json.dumps(cache, indent=2).encode())
    except OSError:
        _memory_cache.setdefault(name, {}).update(cache)  # a stick that turned read-only: remember for this run only


def choose_kernel(host: Host, model: Path, blake3: str, *, state: Path | None, saved: Path | None = None,
                  variants: list[Variant] | None = None, refresh: bool = False,
                  on_result=None) -> KernelChoice:
    """The fastest variant that works here: from the cache for this CPU, else by probing."""
    variants = variants if variants is not None else list_variants()
    if not variants:
        raise KernelError("this runtime ships no CPU kernel libraries (libggml-cpu-*)",
                          "rebuild the runtime with build/install.sh; see build/llama-cpp.env")
    by_name = {v.name: v for v in variants}
    key = _cache_key(host, variants)
    cache = read_verdicts(state, saved)
    entry = cache.get(key)
    cached = _cached_results(entry) if isinstance(entry, dict) else None
    if cached is not None and not refresh and entry.get("chosen") in by_name:
        return KernelChoice(entry["chosen"], by_name[entry["chosen"]].path, cached, cached=True)

    to_probe, results = candidates(variants, host)
    threads = max(1, host.physical_cores)
    slots = probe_slots(model, host)
    # Kernels without AVX2 run 3-10x slower (docs/ARCHITECTURE.md, trap 4): probe them only when none with it works.
    fast = [v for v in to_probe if "avx2" in v.required_flags]
    slow = [v for v in to_probe if v not in fast]
    if fast:
        results += probe(fast, model, blake3, threads, slots=slots, on_result=on_result)
    if any(r.ok for r in results):
        results += [ProbeResult(v.name, "skipped", "not probed: AVX2 kernels work here and are faster")
                    for v in slow]
    elif slow:
        results += probe(slow, model, blake3, threads, slots=slots, on_result=on_result)
    chosen = pick(results)
    if chosen is None:
        raise KernelError("no CPU kernel works on this host: " +
                          "; ".join(f"{r.variant} {r.state} {r.detail}".strip() for r in results))
    cache[key] = {"chosen": chosen.variant, "results": [asdict(r) for r in results], "probed_at": time.time()}
    write_verdicts(state, cache)
    return KernelChoice(chosen.variant, by_name[chosen.variant].path, tuple(results), cached=False)
