"""Staging files onto the stick: copy while hashing (kit.medium.copy_hashed: temp name, fsync,
rename), and resume.

A file already on the stick whose size and hash match its source is not copied again, so a
killed build restarts where it stopped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from kit.integrity import Digest, hash_file
from kit.manifest import FileEntry
from kit.medium import copy_hashed, make_executable

OnBytes = Callable[[int], None]


def stage_file(src: Path, kit_dir: Path, relpath: str, *, source_digest: Digest | None = None,
               on_block: OnBytes | None = None) -> tuple[FileEntry, bool]:
    """Put src at KIT/relpath; returns its entry and whether bytes were copied.

    With `source_digest` known, a destination that already matches it is kept (resume).
    """
    dest = kit_dir.joinpath(*relpath.split("/"))
    if source_digest is not None and dest.is_file() and not dest.is_symlink() \
            and dest.stat().st_size == source_digest.size:
        existing = hash_file(dest, sha256=True)
        if existing == source_digest:
            if on_block:
                on_block(existing.size)
            return FileEntry(relpath, existing.size, existing.blake3, existing.sha256), False
    digest = copy_hashed(src, [dest], expect=source_digest, sha256=True, on_block=on_block)
    return FileEntry(relpath, digest.size, digest.blake3, digest.sha256), True


def stage_tree(src_dir: Path, kit_dir: Path, prefix: str) -> tuple[list[FileEntry], int]:
    """Stage every file under src_dir at KIT/prefix/...; returns entries and how many were copied.

    Links inside the tree are copied as the files they point to: a stick holds no links.
    """
    entries, copied = [], 0
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        rel = f"{prefix}/{path.relative_to(src_dir).as_posix()}"
        digest = hash_file(path, sha256=True)
        entry, did_copy = stage_file(path, kit_dir, rel, source_digest=digest)
        if os.access(path, os.X_OK):
            make_executable(kit_dir.joinpath(*rel.split("/")))
        entries.append(entry)
        copied += did_copy
    return entries, copied


def remove_stale(kit_dir: Path, keep: set[str], under: str) -> list[str]:
    """Delete files under KIT/<under> that the new manifest does not list (and leftover temps)."""
    removed = []
    base = kit_dir / under
    if not base.exists():
        return removed
    for path in sorted(base.rglob("*"), reverse=True):
        rel = path.relative_to(kit_dir).as_posix()
        if path.is_symlink() or path.is_file():
            if rel not in keep:
                path.unlink()
                removed.append(rel)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if base.is_dir() and not any(base.iterdir()):
        shutil.rmtree(base)
    return removed
