"""What every benchmark section shares: paths, child processes that answer in JSON, medians,
ratios with their targets, and plain-text tables.

Every number a section reports is measured in the same run as the number it is compared with,
with the two sides interleaved (A, B, A, B, ...) so that a noisy neighbour slows both alike.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / ".bench"  # llama.cpp sources and build, the bench stick, probe state
CHILD = [sys.executable, str(ROOT / "bench" / "child.py")]


def tests_module(name: str):
    """One of tests/' helpers that drive the kit as a user would (servekit, poolkit)."""
    import importlib

    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def ensure_cache() -> Path:
    """The cache folder, ignored by git whatever the root .gitignore says (like .pytest_cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    marker = CACHE / ".gitignore"
    if not marker.exists():
        marker.write_text("# made by bench/: everything here is a rebuildable cache\n*\n")
    return CACHE


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.pop("KIT_DEBUG", None)  # debug output would tear the JSON line
    return env


def run_child(*args: str, timeout: float = 600) -> dict:
    """Run bench/child.py in a fresh process; its last stdout line is JSON. A crash is data."""
    proc = subprocess.run([*CHILD, *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(), cwd=ROOT, stdin=subprocess.DEVNULL)
    if proc.returncode < 0:
        return {"crashed": -proc.returncode}
    lines = proc.stdout.strip().splitlines()
    try:
        data = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"bench child {args[0]} failed ({proc.returncode}):\n{tail}") from None
    if proc.returncode != 0 or "error" in data:
        raise RuntimeError(f"bench child {args[0]} failed: {data.get('error', proc.returncode)}")
    return data


def interleave(rounds: int, *runs: Callable[[], object]) -> list[list]:
    """Call each run once per round, in turn; returns one list of results per run."""
    results: list[list] = [[] for _ in runs]
    for _ in range(rounds):
        for out, run in zip(results, runs, strict=True):
            out.append(run())
    return results


def median(values: Sequence[float]) -> float:
    """Median of the values that were measured (NaN marks a run that could not be)."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def spread(values: Sequence[float], digits: int = 1) -> str:
    """min–max of the measured values: how noisy the machine was while they were taken."""
    kept = [v for v in values if v == v]
    return f"{min(kept):.{digits}f}–{max(kept):.{digits}f}" if kept else "-"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class Ratio:
    """One measured ratio and its target; `at_most` targets are ceilings, the others floors."""

    name: str
    value: float | None  # None when it could not be measured (the reason is in `note`)
    target: float
    at_most: bool = False
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.value is not None and self.value == self.value  # NaN: no valid sample

    @property
    def met(self) -> bool | None:
        if not self.measured:
            return None
        return self.value <= self.target if self.at_most else self.value >= self.target

    def line(self) -> str:
        op = "<=" if self.at_most else ">="
        shown = f"{self.value:.3f}" if self.measured else "n/a"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        note = f"  ({self.note})" if self.note else ""
        return f"ratio {self.name} = {shown} (target {op} {self.target:g}): {verdict}{note}"

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "target": self.target,
                "at_most": self.at_most, "met": self.met, "note": self.note}


def compare(name: str, mine: Sequence[float], theirs: Sequence[float], target: float, *,
            times: bool = False) -> list[Ratio]:
    """Two ratios of the same samples: of the medians, and of the best runs (the fastest speed,
    or the shortest time). On a busy machine the best run of each side is the least disturbed one,
    so the second ratio says more about the code and the first more about the machine."""
    kept_mine, kept_theirs = [v for v in mine if v == v], [v for v in theirs if v == v]
    best = min if times else max
    best_ratio = best(kept_mine) / best(kept_theirs) if kept_mine and kept_theirs else None
    return [Ratio(name, median(mine) / median(theirs), target, at_most=times),
            Ratio(f"{name}, best runs", best_ratio, target, at_most=times)]


def compare_paired(name: str, mine: Sequence[float], theirs: Sequence[float], target: float) -> Ratio:
    """The median of the ratios of samples taken as pairs, seconds apart (mine[i] with theirs[i]):
    a busy moment on the host hurts both sides of a pair, where the ratio of two medians lets it
    land on one side only."""
    pairs = [m / t for m, t in zip(mine, theirs, strict=True) if m == m and t == t and t]
    return Ratio(f"{name}, median of pairs", median(pairs) if pairs else None, target)


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # raw samples, for --json

    def render(self) -> str:
        out = [f"## {self.title}", "", table(self.columns, self.rows), ""]
        out += [f"- {n}" for n in self.notes]
        out += [r.line() for r in self.ratios]
        return "\n".join(out).rstrip() + "\n"

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows,
                "ratios": [r.to_dict() for r in self.ratios], "notes": self.notes, "data": self.data}


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, padded so it also reads well in a terminal."""
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c))
              for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in rows)])


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def say(message: str) -> None:
    """Progress for the person waiting; the tables go to stdout."""
    print(f"bench: {message}", file=sys.stderr, flush=True)
