"""5. Footprint: the frozen runtime's size on the stick and how fast it starts (`--version`)."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

from bench.common import Section, fmt, median, say, timed
from bench.context import Context

TARGET_BYTES = 100e6  # per platform, without GPU backends (issue: reach)


def du_bytes(folder: Path) -> int:
    out = subprocess.run(["du", "-sb", str(folder)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def file_count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def biggest_parts(folder: Path, top: int = 4) -> list[tuple[str, int]]:
    """The largest top-level parts of the runtime (_internal/<name>), where the megabytes go."""
    internal = folder / "_internal"
    sizes: Counter[str] = Counter()
    for p in internal.rglob("*"):
        if p.is_file() and not p.is_symlink():
            sizes[p.relative_to(internal).parts[0]] += p.stat().st_size
    return sizes.most_common(top)


def start_time(cmd: list[str]) -> float:
    return timed(lambda: subprocess.run(cmd, check=True, capture_output=True, stdin=subprocess.DEVNULL))


def run(ctx: Context) -> Section:
    platform = ctx.host.platform
    runtime = ctx.stick / "KIT" / "runtimes" / platform
    binary = runtime / "kit"
    say(f"footprint: {runtime}")
    size, count = du_bytes(runtime), file_count(runtime)
    start_time([str(binary), "--version"])  # untimed: from the page cache from here on, like a second start
    runs = [start_time([str(binary), "--version"]) for _ in range(ctx.sizes.version_runs)]

    facts = json.loads((runtime / "kit-runtime.json").read_text())
    section = Section("5. Footprint: the frozen runtime", ["measure", "value"])
    section.rows += [[f"KIT/runtimes/{platform} (du -sb)", f"{size / 1e6:.1f} MB in {count} files"
                      f" (target <= {TARGET_BYTES / 1e6:.0f} MB: {'met' if size <= TARGET_BYTES else 'MISSED'})"],
                     ["needs glibc", f"{facts.get('glibc', '-')} ({facts.get('glibc_needed_by', '-')})"],
                     [f"`kit --version`, median of {len(runs)}", f"{fmt(median(runs), 3)} s"]]
    section.rows += [[f"  of which _internal/{name}", f"{n / 1e6:.1f} MB"] for name, n in biggest_parts(runtime)]
    section.data = {"bytes": size, "files": count, "version_s": runs, "glibc": facts.get("glibc")}
    return section
