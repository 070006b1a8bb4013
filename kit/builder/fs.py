"""What the target medium is: its filesystem, and the largest file it can hold."""

from __future__ import annotations

import os
from pathlib import Path

FAT32_MAX_FILE = (4 << 30) - 1  # 4 GiB - 1: one byte more and the copy fails half-way


def filesystem_type(path: Path, mounts: Path = Path("/proc/mounts")) -> str | None:
    """The fstype of the mount holding `path` (Linux), or None when it cannot be told."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, fstype = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, parts[2]
    return fstype


def is_fat32(fstype: str | None) -> bool:
    return fstype in ("vfat", "msdos", "fat")
