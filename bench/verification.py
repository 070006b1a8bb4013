"""3. Verification: what hashing costs. BLAKE3 through kit.integrity.hash_file vs a plain
sequential read of the same file vs sha256sum (and b3sum when installed), from the page cache;
then the user's real wait, verify + load vs load alone, from a cold cache.

The cold runs use a private copy of the model: drop_caches cannot evict pages that another
process has mapped, and on a shared machine someone may be running the same model. Each cold
child reports how much of the file was still cached when its clock started (mincore).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench.common import Section, compare, ensure_cache, fmt, interleave, median, run_child, say, timed
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
    section.data = {"rates_gb_s": rates, "cold_disk_gb_s": disk, "verify_load": verified, "load_alone": alone}
    return section
