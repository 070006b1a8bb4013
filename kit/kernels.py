"""CPU kernel variants: which libggml-cpu-<variant> this runtime ships, which this CPU can run,
which really work (probed in a child process, where a SIGILL is harmless), which is fastest.

ggml's own choice scores variants by CPUID and picks one that can die with SIGILL on hosts
that advertise more than they run (docs/ARCHITECTURE.md, trap 4). The kit never loads an unprobed variant.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kit.errors import KernelError, KitError, describe_error
from kit.ggml import VARIANT_FLAGS, Variant, list_variants, load_variant
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
    seconds: float | None = None  # wall time of the measured work; the ranking key

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


# ---------------------------------------------------------------- probing in a child

def probe_command(variant: Variant, model: Path, blake3: str, threads: int) -> list[str]:
    """The frozen runtime runs itself; a Python install runs `python -m kit`."""
    head = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "kit"]
    return head + ["_probe", "--variant", str(variant.path), "--model", str(model),
                   "--blake3", blake3, "--threads", str(threads)]


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def probe_variant(variant: Variant, model: Path, blake3: str, threads: int,
                  timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run one variant on a real batch in a child; its crash stays there.

    The protocol: the child prints exactly one JSON line on stdout, either the measurement
    ({"prompt_tps", "gen_tps", "seconds", ...}) or {"error": sentence}; its stderr is not read.
    """
    try:
        proc = subprocess.run(probe_command(variant, model, blake3, threads), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(variant.name, "failed", f"no answer within {timeout:.0f} s")
    if proc.returncode < 0:
        return ProbeResult(variant.name, "crashed", _signal_name(proc.returncode))
    data = parse_probe_line(proc.stdout)
    if data is None:
        return ProbeResult(variant.name, "failed", f"the probe gave no result line (exit code {proc.returncode})")
    if "error" in data or proc.returncode != 0:
        return ProbeResult(variant.name, "failed", str(data.get("error", f"exit code {proc.returncode}"))[:200])
    return ProbeResult(variant.name, "ok", "", data["prompt_tps"], data["gen_tps"], data["seconds"])


_PROBE_KEYS = {"prompt_tps": float, "gen_tps": float, "seconds": float}


def parse_probe_line(stdout: str) -> dict | None:
    """The child's one JSON line, or None when stdout is not exactly one well-formed result."""
    lines = stdout.strip().splitlines()
    if len(lines) != 1:
        return None
    try:
        data = json.loads(lines[0])
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if "error" in data:
        return {"error": str(data["error"])}
    if not all(isinstance(data.get(k), (int, float)) for k in _PROBE_KEYS):
        return None
    return data


def probe_child(variant_path: Path, model: Path, blake3: str, threads: int) -> int:
    """Body of `kit _probe`: print exactly one JSON line (the protocol above), return the exit code.

    Any error becomes {"error": sentence} through the one error table; a crash in the kernel
    kills the process, which the parent reads from the signal."""
    try:
        result = run_probe(variant_path, model, blake3, threads)
    except Exception as err:  # every failure is reported on the protocol line
        what, _fix, code = describe_error(err)
        result, status = {"error": what}, code
    else:
        status = 0
    print(json.dumps(result), flush=True)
    return status


def run_probe(variant_path: Path, model: Path, blake3: str, threads: int) -> dict:
    """Verify the model, load the variant, time a real batch and a few tokens."""
    from kit import engine, integrity, offline
    from kit.settings import EngineSettings

    offline.go_offline()
    if not integrity.verify_file(model, blake3):
        raise KitError("model bytes do not match the manifest")
    load_variant(variant_path)
    return engine.benchmark(model, EngineSettings(n_ctx=engine.bench_context(PROBE_PROMPT_TOKENS, PROBE_GEN_TOKENS),
                                                  threads=threads, n_batch=PROBE_PROMPT_TOKENS),
                            prompt_tokens=PROBE_PROMPT_TOKENS, gen_tokens=PROBE_GEN_TOKENS)


# ---------------------------------------------------------------- choosing, with a per-CPU cache

def _cache_key(host: Host, variants: list[Variant]) -> str:
    names = ",".join(v.name for v in variants)
    return f"{host.cpu_signature()}:{names}"


_memory_cache: dict[str, dict] = {}


def _read_cache(state: Path | None, saved: Path | None = None) -> dict[str, dict]:
    """Verdicts from the writable state folder; on a read-only stick, those saved on it earlier
    (read, never written) plus this run's memory."""
    folder = state or saved
    data: dict = {}
    if folder is not None:
        try:
            loaded = json.loads((folder / "kernel-probe.json").read_text())
            data = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            data = {}
    return data if state is not None else {**data, **_memory_cache}


def _write_cache(state: Path | None, cache: dict[str, dict]) -> None:
    if state is None:
        _memory_cache.update(cache)
        return
    from kit.fsutil import atomic_write

    try:
        atomic_write(state / "kernel-probe.json", json.dumps(cache, indent=2).encode())
    except OSError:
        _memory_cache.update(cache)  # a stick that turned read-only: remember for this run only


def rank(results: list[ProbeResult]) -> list[ProbeResult]:
    """Working variants, fastest first (least wall time for the same batch + tokens)."""
    return sorted((r for r in results if r.ok), key=lambda r: r.seconds or float("inf"))


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
    cache = _read_cache(state, saved)
    entry = cache.get(key)
    if entry and not refresh and entry.get("chosen") in by_name:
        results = tuple(ProbeResult(**r) for r in entry["results"])
        return KernelChoice(entry["chosen"], by_name[entry["chosen"]].path, results, cached=True)

    to_probe, results = candidates(variants, host)
    threads = max(1, host.physical_cores)

    def probe_all(group: list[Variant]) -> None:
        for v in group:
            result = probe_variant(v, model, blake3, threads)
            results.append(result)
            if on_result:
                on_result(result)

    # Kernels without AVX2 run 3-10x slower (docs/ARCHITECTURE.md, trap 4): probe them only when none with it works.
    fast = [v for v in to_probe if "avx2" in v.required_flags]
    slow = [v for v in to_probe if v not in fast]
    probe_all(fast)
    if any(r.ok for r in results):
        results += [ProbeResult(v.name, "skipped", "not probed: AVX2 kernels work here and are faster")
                    for v in slow]
    else:
        probe_all(slow)
    working = rank(results)
    if not working:
        raise KernelError("no CPU kernel works on this host: " +
                          "; ".join(f"{r.variant} {r.state} {r.detail}".strip() for r in results))
    chosen = working[0].variant
    cache[key] = {"chosen": chosen, "results": [asdict(r) for r in results], "probed_at": time.time()}
    _write_cache(state, cache)
    return KernelChoice(chosen, by_name[chosen].path, tuple(results), cached=False)
