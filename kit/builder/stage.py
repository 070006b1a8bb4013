"""Staging files onto the stick: copy while hashing, temp name + fsync + rename, resume.

A file already on the stick whose size and hash match its source is not copied again, so a
killed build restarts where it stopped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import blake3

from kit.fsutil import fsync_dir, temp_name
from kit.integrity import BLOCK, Digest, hash_file
from kit.manifest import FileEntry

OnBytes = Callable[[int], None]


def copy_hashed(src: Path, dest: Path, on_block: OnBytes | None = None) -> Digest:
    """Copy src to dest atomically, returning the digest of the bytes written."""
    import hashlib

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    b3, sha = blake3.blake3(), hashlib.sha256()
    size = 0
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(BLOCK):
                fout.write(chunk)
                b3.update(chunk)
                sha.update(chunk)
                size += len(chunk)
                if on_block:
                    on_block(len(chunk))
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    except BaseException:  # a full disk or a kill: give the space back, the rerun copies again
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return Digest(size, b3.hexdigest(), sha.hexdigest())


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
    digest = copy_hashed(src, dest, on_block)
    if source_digest is not None and digest != source_digest:
        dest.unlink(missing_ok=True)
        raise OSError(f"{src} changed while it was copied to the stick")
    return FileEntry(relpath, digest.size, digest.blake3, digest.sha256), True


def stage_tree(src_dir: Path, kit_dir: Path, prefix: str, on_block: OnBytes | None = None
               ) -> tuple[list[FileEntry], int]:
    """Stage every file under src_dir at KIT/prefix/...; returns entries and how many were copied.

    Links inside the tree are copied as the files they point to: a stick holds no links.
    """
    entries, copied = [], 0
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        rel = f"{prefix}/{path.relative_to(src_dir).as_posix()}"
        digest = hash_file(path, sha256=True)
        entry, did_copy = stage_file(path, kit_dir, rel, source_digest=digest, on_block=on_block)
        if os.access(path, os.X_OK):
            kit_dir.joinpath(*rel.split("/")).chmod(0o755)
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
