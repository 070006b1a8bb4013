"""The measurements that must run in a fresh process, one per call; each prints one JSON line.

    python bench/child.py engine --variant LIB --model GGUF --threads N ...   the kit's tok/s
    python bench/child.py score --variant LIB                                 ggml's own score
    python bench/child.py load --variant LIB --model GGUF --threads N [--verify]  cold start

A crash (a kernel's SIGILL) ends only this process; the parent records it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHAT_QUESTION = "List everything a family should pack in an emergency kit, with a reason for each item."


def verify(model: Path) -> None:
    """What the kit does before any load: hash the bytes, remember them for the engine's check."""
    from kit import integrity

    integrity.verify_file(model, integrity.hash_file(model).blake3)


def skip_verify(model: Path) -> None:
    """Benchmark only: let the engine load a file without hashing it (the "load alone" side)."""
    from kit import integrity

    integrity._remember(model, "not hashed: bench load-alone baseline")


# ---------------------------------------------------------------- engine: tok/s through the kit

def bench_settings(args, n_ctx: int | None = None):
    """The EngineSettings a benchmark of args' sizes runs with (the kit's one settings value)."""
    from kit import engine
    from kit.settings import EngineSettings

    return EngineSettings(n_ctx=n_ctx or engine.bench_context(args.prompt_tokens, args.gen_tokens),
                          threads=args.threads)


def engine_speed(args) -> dict:
    from kit import engine

    verify(args.model)
    engine.ensure_backend(args.variant)
    settings = bench_settings(args).with_(n_batch=args.prompt_tokens)
    result = engine.benchmark(args.model, settings, prompt_tokens=args.prompt_tokens,
                              gen_tokens=args.gen_tokens, repeats=args.repeats)
    result["decode_tps"] = decode_only_speed(args)
    if args.chat_tokens:
        result["chat_gen_tps"] = chat_decode_speed(args)
    return result


def decode_only_speed(args) -> float:
    """Generation without sampling, as llama-bench generates (it feeds tokens, it never samples):
    what the kit's Python path costs per token with the sampler's share taken out."""
    from kit.engine import LlamaEngine

    llm = LlamaEngine.load([args.model], bench_settings(args), model_id="bench", variant=args.variant).llm
    prompt = llm.tokenize(CHAT_QUESTION.encode() * 16)[:args.prompt_tokens]  # llama-bench's depth
    best = 0.0
    for _ in range(args.repeats):
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(args.gen_tokens):
            llm.eval(prompt[-1:])
        best = max(best, args.gen_tokens / (time.perf_counter() - start))
    llm.close()
    return best


def chat_decode_speed(args) -> float:
    """Generation speed of the real chat stream (template, sampling, detokenising included):
    tokens after the first over the time after the first, so the prompt is not counted. The best
    of `repeats` answers, as for the other measures."""
    from kit import engine
    from kit.engine import LlamaEngine

    # the context llama-bench gets for the same lengths (a larger KV cache makes each token dearer)
    settings = bench_settings(args, engine.bench_context(args.prompt_tokens, args.chat_tokens))
    chat = LlamaEngine.load([args.model], settings, model_id="bench",
                            chat_format_fallback=args.chat_format, variant=args.variant, seed=1)
    messages = [{"role": "user", "content": CHAT_QUESTION}]
    best = float("nan")
    for _ in range(args.repeats):
        for _ in chat.stream(messages, max_tokens=args.chat_tokens):
            pass
        stats = chat.last_stats
        if stats and stats.first_token_s is not None and stats.completion_tokens >= 2:
            rate = (stats.completion_tokens - 1) / (stats.seconds - stats.first_token_s)
            best = rate if best != best else max(best, rate)
    chat.close()
    return best


# ---------------------------------------------------------------- score: ggml's own choice

def backend_score(args) -> dict:
    """Call the variant's ggml_backend_score export, as ggml_backend_load_best does."""
    lib_dir = args.variant.parent
    ctypes.CDLL(str(lib_dir / "libggml-base.so.0"), mode=ctypes.RTLD_GLOBAL)  # its dependency
    lib = ctypes.CDLL(str(args.variant))
    lib.ggml_backend_score.restype = ctypes.c_int
    return {"score": lib.ggml_backend_score()}


# ---------------------------------------------------------------- load: cold start, verified or not

def evict(path: Path) -> str:
    """Push the file out of the page cache: drop every cache if we may, else ask for this file."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"


def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore), to prove the start really was cold."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)  # maps; reads nothing
    os.close(fd)
    try:
        if libc.mincore(addr, size, vec) != 0:
            return float("nan")
    finally:
        libc.munmap(addr, size)
    return sum(b & 1 for b in vec) / pages


def cold_load(args) -> dict:
    """Verify (or not), load, decode a few tokens (that touches every weight): the user's wait."""
    from kit import engine
    from kit.settings import EngineSettings

    engine.ensure_backend(args.variant)  # imports llama_cpp and loads the kernel before the clock
    method = evict(args.model)
    resident = resident_fraction(args.model)
    start = time.perf_counter()
    (verify if args.verify else skip_verify)(args.model)
    verified = time.perf_counter()
    settings = EngineSettings(n_ctx=512, threads=args.threads)
    loaded = engine.LlamaEngine.load([args.model], settings, model_id="bench", variant=args.variant)
    loaded.llm.eval(loaded.llm.tokenize(b"How do I purify water?"))
    end = time.perf_counter()
    loaded.close()
    return {"seconds": end - start, "verify_s": verified - start, "evicted_by": method,
            "resident_before": resident}


# ---------------------------------------------------------------- command line

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("engine")
    p.add_argument("--variant", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chat-tokens", type=int, default=0, help="also time the chat stream (0: no)")
    p.add_argument("--chat-format", default="alpaca")
    p.set_defaults(func=engine_speed)
    p = sub.add_parser("score")
    p.add_argument("--variant", type=Path, required=True)
    p.set_defaults(func=backend_score)
    p = sub.add_parser("load")
    p.add_argument("--variant", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--verify", action="store_true")
    p.set_defaults(func=cold_load)
    args = parser.parse_args()
    try:
        result = args.func(args)
    except Exception as exc:  # the parent shows it; a crash by signal never gets here
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
