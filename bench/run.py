"""Every benchmark of the kit in one run: prints each table and every ratio with its target.

    .venv/bin/python bench/run.py            full run (~4 min quiet, 20+ busy; the first also builds llama.cpp)
    .venv/bin/python bench/run.py --quick    smoke run: same tables, fewer repeats
    .venv/bin/kit bench [--quick]            the same, from the kit's command line

Sections: overhead (kit vs llama-bench), kernels (every CPU variant, kit's and ggml's pick),
verify (hashing cost), first-token (stick launcher vs llama.cpp CLI), footprint (frozen runtime),
chat (the chat's rate on screen in a real terminal, first vs last tokens and vs kit ask),
serve (kit serve with 1, 2 and 4 streaming clients, and vs the same llama-server started bare),
pool (kit serve --pool over two kit pool workers vs alone, on loopback and behind 2 and 20 ms more delay),
knowledge (retrieval recall on the demo pack's question set, search latency at 10,000 passages, first token
with sources vs without), gpu (each Vulkan device vs the CPU kernel, and the kit's choice vs the fastest).
A missed target is reported, never an error: the exit code is 1 only when a section could not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    chat_terminal,
    first_token,
    footprint,
    gpu,
    kernel_choice,
    knowledge,
    overhead,
    pool,
    serve,
    verification,
)
from bench.common import Ratio, Section, say, table  # noqa: E402
from bench.context import QUICK, Context, Sizes  # noqa: E402

SECTIONS = {"overhead": overhead.run, "kernels": kernel_choice.run, "verify": verification.run,
            "first-token": first_token.run, "footprint": footprint.run, "chat": chat_terminal.run,
            "serve": serve.run, "pool": pool.run, "knowledge": knowledge.run, "gpu": gpu.run}


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor() or "unknown")


def machine(ctx: Context) -> dict:
    import psutil

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "physical_cores": ctx.host.physical_cores,
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "llama_cpp_python": metadata.version("llama-cpp-python"),
            "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def render_machine(info: dict) -> str:
    rows = [[k.replace("_", " "), ", ".join(map(str, v)) if isinstance(v, list) else str(v)] for k, v in info.items()]
    return "## Machine\n\n" + table(["item", "value"], rows) + "\n"


def render_summary(ratios: list[Ratio], failures: dict[str, str]) -> str:
    rows = [[r.name, f"{r.value:.3f}" if r.measured else "n/a", ("<= " if r.at_most else ">= ") + f"{r.target:g}",
             {True: "met", False: "MISSED", None: "not measured"}[r.met]] for r in ratios]
    rows += [[f"section {name}", "n/a", "-", f"FAILED: {why}"] for name, why in failures.items()]
    return "## Summary\n\n" + table(["ratio", "value", "target", "verdict"], rows) + "\n"


def run_sections(ctx: Context, names: list[str]) -> tuple[list[Section], dict[str, str]]:
    """Each section on its own: one that fails is reported and the others still run."""
    done, failures = [], {}
    for name in names:
        start = time.monotonic()
        try:
            section = SECTIONS[name](ctx)
        except Exception as exc:  # a benchmark that cannot run is a result to show, not a crash
            if os.environ.get("KIT_DEBUG"):
                traceback.print_exc()
            failures[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            say(f"{name} failed: {failures[name]}")
            continue
        section.notes.append(f"section time {time.monotonic() - start:.0f} s")
        print(section.render(), flush=True)
        done.append(section)
    return done, failures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: one or two repeats of everything")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--stick", type=Path, help="use this stick (with a frozen runtime) instead of building one")
    parser.add_argument("--variant", help="CPU kernel for sections 1 and 3 (default: the kit's choice here)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every number and sample as JSON")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context(QUICK if args.quick else Sizes(), stick=args.stick, variant=args.variant)
    info = machine(ctx)
    print(f"# Survival Kit benchmarks{' (quick)' if args.quick else ''}\n")
    print(render_machine(info), flush=True)
    sections, failures = run_sections(ctx, args.sections)
    info["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    ratios = [r for s in sections for r in s.ratios]
    print(render_summary(ratios, failures))
    print(f"load average at start {info['load_average_at_start']}, at end {info['load_average_at_end']} "
          f"({info['logical_cpus']} CPUs): above the CPU count, other programs shared the cores")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "quick": args.quick, "failures": failures,
                                         "sections": [s.to_dict() for s in sections]}, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
