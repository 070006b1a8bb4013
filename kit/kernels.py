"""CPU kernel variants: which libggml-cpu-<variant> this runtime ships, which this CPU can run,
which really work (probed in a child process, where a SIGILL is harmless), which is fastest.

ggml's own choice scores variants by CPUID and picks one that can die with SIGILL on hosts
that advertise more than they run (DESIGN.md). The kit never loads an unprobed variant.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kit.errors import KernelError
from kit.hardware import Host

# The instruction sets each variant is compiled for (vendor/llama.cpp/ggml/src/CMakeLists.txt,
# ggml_add_cpu_backend_variant), in /proc/cpuinfo spelling. AVX512 there means F, CD, VL, DQ, BW.
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
VARIANT_FLAGS: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _HASWELL,
    "skylakex": _HASWELL + _AVX512,
    "cannonlake": _HASWELL + _AVX512 + ("avx512vbmi",),
    "cascadelake": _HASWELL + _AVX512 + ("avx512_vnni",),
    "icelake": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni"),
    "cooperlake": _HASWELL + _AVX512 + ("avx512_vnni", "avx512_bf16"),
    "zen4": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": _HASWELL + ("avx_vnni",),
    "sapphirerapids": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
    "armv8.0_1": (),
    "armv8.2_1": ("asimddp",),
    "armv8.2_2": ("asimddp", "asimdhp"),
    "armv8.2_3": ("asimddp", "asimdhp", "sve"),
    "armv8.6_1": ("asimddp", "asimdhp", "sve", "i8mm"),
    "armv8.6_2": ("asimddp", "asimdhp", "sve", "i8mm", "sve2"),
    "armv9.2_1": ("asimddp", "asimdhp", "sve", "i8mm", "sme"),
    "armv9.2_2": ("asimddp", "asimdhp", "sve", "i8mm", "sve2", "sme"),
    "apple_m1": ("asimddp",),
    "apple_m2_m3": ("asimddp", "i8mm"),
    "apple_m4": ("asimddp", "i8mm", "sme"),
}

# How each OS names the shared libraries (libggml is the one libllama links against).
_LIB_NAMES = {
    "linux": ("libggml-cpu-", ".so", "libggml.so.0"),
    "macos": ("libggml-cpu-", ".so", "libggml.0.dylib"),
    "windows": ("ggml-cpu-", ".dll", "ggml.dll"),
}
PROBE_TIMEOUT_S = 120
PROBE_PROMPT_TOKENS = 64
PROBE_GEN_TOKENS = 16


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path

    @property
    def required_flags(self) -> tuple[str, ...]:
        return VARIANT_FLAGS.get(self.name, ())


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


def _os_key() -> str:
    return {"darwin": "macos", "win32": "windows"}.get(sys.platform, "linux")


def lib_dir() -> Path:
    """llama_cpp/lib of this installation or frozen runtime, found without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise KernelError("llama_cpp is not installed in this runtime",
                          "install the kit with build/install.sh")
    return Path(spec.origin).parent / "lib"


def list_variants(directory: Path | None = None) -> list[Variant]:
    prefix, suffix, _ = _LIB_NAMES[_os_key()]
    directory = directory or lib_dir()
    found = []
    for path in sorted(directory.glob(f"{prefix}*{suffix}")):
        name = path.name[len(prefix): -len(suffix)]
        found.append(Variant(name, path))
    return found


# GPU backends built as loadable modules beside the CPU variants (GGML_BACKEND_DL).
_GPU_MODULES = {"cuda": "cuda", "rocm": "hip", "metal": "metal", "vulkan": "vulkan"}


def gpu_backend_libs(directory: Path | None = None) -> dict[str, Path]:
    """The GPU backends this runtime can drive: {"cuda": path, ...}; empty for a CPU-only build."""
    prefix, suffix, _ = _LIB_NAMES[_os_key()]
    directory = directory or lib_dir()
    base = prefix.removesuffix("cpu-")
    found = {}
    for backend, module in _GPU_MODULES.items():
        path = directory / f"{base}{module}{suffix}"
        if path.is_file():
            found[backend] = path
    return found


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


# ---------------------------------------------------------------- loading into this process

def load_variant(path: Path) -> None:
    """Register a backend module with the libggml that libllama uses (DESIGN.md, trap 2).

    libllama links libggml by soname (libggml.so.0 on Linux); opening that exact file gives the
    same instance. llama_cpp._ggml opens libggml.so, a second copy, which llama never sees.
    """
    ggml = ctypes.CDLL(str(lib_dir() / _LIB_NAMES[_os_key()][2]), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not ggml.ggml_backend_load(os.fsencode(path)):
        raise KernelError(f"ggml could not load the backend {path.name}")


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
    """Run one variant on a real batch in a child; its crash stays there."""
    try:
        proc = subprocess.run(probe_command(variant, model, blake3, threads), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(variant.name, "failed", f"no answer within {timeout:.0f} s")
    if proc.returncode < 0:
        return ProbeResult(variant.name, "crashed", _signal_name(proc.returncode))
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    try:
        data = json.loads(last[0])
    except json.JSONDecodeError:
        lines = proc.stderr.strip().splitlines()
        # the CLI's error sentence ("kit: ..."), not the "what to do" line after it
        said = next((ln for ln in lines if ln.startswith("kit: ")), lines[-1] if lines else "")
        return ProbeResult(variant.name, "failed", (said or f"exit code {proc.returncode}")[:200])
    if proc.returncode != 0 or "seconds" not in data:
        return ProbeResult(variant.name, "failed", str(data.get("error", proc.returncode))[:200])
    return ProbeResult(variant.name, "ok", "", data["prompt_tps"], data["gen_tps"], data["seconds"])


def run_probe_child(variant_path: Path, model: Path, blake3: str, threads: int) -> dict:
    """Body of `kit _probe`: verify the model, load the variant, time a real batch and a few tokens."""
    from kit import engine, integrity, offline

    offline.go_offline()
    digest = integrity.hash_file(model)
    if digest.blake3 != blake3:
        return {"error": "model bytes do not match the manifest"}
    integrity._remember(model, digest.blake3)
    load_variant(variant_path)
    return engine.benchmark(model, threads=threads, prompt_tokens=PROBE_PROMPT_TOKENS,
                            gen_tokens=PROBE_GEN_TOKENS)


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

    # Kernels without AVX2 run 3-10x slower (DESIGN.md): probe them only when none with it works.
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
