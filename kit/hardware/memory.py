"""Memory: total and free RAM, capped by every ceiling that applies to this process.

RAM comes from /proc/meminfo (Linux), sysctl (macOS) or psutil. The ceilings are each cgroup v1/v2
level above the process (a container's limit) and RLIMIT_AS: one below the RAM there is becomes
ram_total and memory_limit, and what it still allows caps ram_available.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kit.hardware.seams import _clip, _Context, _describe, _Files, _positive

# cgroup v1 spells "no limit" as 2^63 rounded down to a page; anything this big is not a limit.
UNLIMITED = 1 << 60


@dataclass
class _Memory:
    total: int = 0
    available: int = 0
    limit: int | None = None
    physical_total: int = 0  # before any limit: what an Apple GPU shares


def _read_memory(os_name: str, ctx: _Context) -> _Memory:
    total, available = _physical_memory(os_name, ctx)
    ceilings = []
    if os_name == "linux":
        ceilings += _cgroup_ceilings(ctx.files)
    ceilings += _address_space_ceiling(os_name, ctx)
    memory = _Memory(total, available, None, total)
    for limit, headroom in ceilings:
        memory = _apply_ceiling(memory, limit, headroom)
    return memory


def _apply_ceiling(memory: _Memory, limit: int, headroom: int) -> _Memory:
    if memory.total and limit >= memory.total:
        return memory  # a limit above the RAM there is does not bind
    available = max(0, min(headroom, limit))
    if memory.available:
        available = min(memory.available, available)
    return _Memory(limit, available, limit, memory.physical_total)


def _physical_memory(os_name: str, ctx: _Context) -> tuple[int, int]:
    """(total, available) bytes before any container or process limit."""
    if os_name == "linux":
        found = _meminfo(ctx)
        if found:
            return found
    total = 0
    if os_name == "macos":
        total = _positive(ctx.sysctl("hw").get("hw.memsize")) or 0
    try:
        live_total, live_available = ctx.live.memory()
        total, available = total or int(live_total), int(live_available)
    except Exception as exc:
        ctx.notes.append(f"Could not ask psutil for memory ({_describe(exc)}).")
        available = 0
    if not total:
        ctx.notes.append("RAM size unknown.")
    elif not available:
        available = total // 2
        ctx.notes.append("Free RAM unknown; assuming half of it is free.")
    return total, min(available, total) if total else available


def _meminfo(ctx: _Context) -> tuple[int, int] | None:
    text = ctx.files.read("proc/meminfo")
    fields = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    total = fields.get("MemTotal")
    if not total:
        why = "could not be read" if text is None else "has no MemTotal"
        ctx.notes.append(f"/proc/meminfo {why}; RAM read through psutil.")
        return None
    available = fields.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = sum(fields.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return total, min(available, total)


def _cgroup_ceilings(files: _Files) -> list[tuple[int, int]]:
    """(limit, headroom) for every cgroup level above this process that has a memory limit."""
    ceilings = []
    for line in (files.read("proc/self/cgroup") or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            for mount in ("sys/fs/cgroup", "sys/fs/cgroup/unified"):
                ceilings += _cgroup_levels(files, mount, path, _cgroup_v2_level)
        elif "memory" in controllers.split(","):
            ceilings += _cgroup_levels(files, "sys/fs/cgroup/memory", path, _cgroup_v1_level)
    return ceilings


def _cgroup_levels(files: _Files, mount: str, path: str, read_level) -> list[tuple[int, int]]:
    parts = [p for p in path.split("/") if p and p != ".."]
    if not files.is_dir("/".join([mount, *parts])):
        parts = []  # a container sees its own cgroup at the mount root, not at the host's path
    found = []
    for depth in range(len(parts), -1, -1):
        level = read_level(files, "/".join([mount, *parts[:depth]]))
        if level:
            found.append(level)
    return found


def _cgroup_v2_level(files: _Files, folder: str) -> tuple[int, int] | None:
    raw = files.read(f"{folder}/memory.max")
    if raw is None or raw.strip() == "max":
        return None
    limit = _parse_limit(files, f"{folder}/memory.max", raw)
    if limit is None:
        return None
    stat = _memory_stat(files.read(f"{folder}/memory.stat"))
    used = files.read_int(f"{folder}/memory.current") or 0
    # page cache the kernel can drop is not spent memory (docker stats does the same)
    return limit, limit - max(0, used - stat.get("inactive_file", 0))


def _cgroup_v1_level(files: _Files, folder: str) -> tuple[int, int] | None:
    raw = files.read(f"{folder}/memory.limit_in_bytes")
    if raw is None:
        return None
    stat = _memory_stat(files.read(f"{folder}/memory.stat"))
    limits = [_parse_limit(files, f"{folder}/memory.limit_in_bytes", raw)]
    limits.append(stat.get("hierarchical_memory_limit"))  # covers ancestors a container hides
    limits = [x for x in limits if x and x < UNLIMITED]
    if not limits:
        return None
    used = files.read_int(f"{folder}/memory.usage_in_bytes") or 0
    inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return min(limits), min(limits) - max(0, used - inactive)


def _parse_limit(files: _Files, rel: str, raw: str) -> int | None:
    try:
        value = int(raw.strip())
    except ValueError:
        files.notes.append(f"Ignored the memory limit in /{rel}: {_clip(raw)!r} is not a number.")
        return None
    return value if 0 < value < UNLIMITED else None


def _memory_stat(text: str | None) -> dict[str, int]:
    stat = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stat[parts[0]] = int(parts[1])
    return stat


def _address_space_ceiling(os_name: str, ctx: _Context) -> list[tuple[int, int]]:
    try:
        limit = ctx.live.address_space_limit()
    except Exception as exc:
        ctx.notes.append(f"Could not read RLIMIT_AS ({_describe(exc)}).")
        return []
    if not limit or limit >= UNLIMITED:
        return []
    used = 0
    if os_name == "linux":
        match = re.search(r"^VmSize:\s+(\d+)\s+kB", ctx.files.read("proc/self/status") or "", re.M)
        used = int(match.group(1)) * 1024 if match else 0
    return [(limit, limit - used)]
