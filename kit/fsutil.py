"""Atomic file writes: temp name in the same folder, fsync, rename, fsync the folder.

A reader (or a killed build) sees the old file or the new one, never half of one. The one
mechanism (as huggingface_hub's `_download_to_tmp_and_move`), in three forms:

  atomic_write(path, data)         bytes already in memory
  with atomic_writer(path) as fh:  a stream written block by block (a copy, a download)
  with atomic_path(path) as tmp:   a writer that needs a path (a child process writes `tmp`)

`mode` creates the temp file with exactly those permission bits, whatever the umask, so a private
key is never readable by others, not even for a moment. Every writer has its own temp name, so two
kits writing one file each finish their own temp and the last rename wins.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# O_EXCL|O_NOFOLLOW: never write through a file or link someone put at the temp name; O_BINARY:
# Windows would otherwise turn every "\n" into "\r\n".
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def fsync_dir(path: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder for fsync; rename is durable enough there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """Unique per writer: two kits writing one file each finish their own temp, the last rename wins."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")


def leftover_temps(path: Path) -> list[Path]:
    """Temp files of `path` (temp_name's) whose writer process is gone: a killed writer's leftovers.

    A live writer's temp is never listed, so removing these cannot break a write in progress on
    this machine.
    """
    import psutil

    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)-[0-9a-f]{8}\.part")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names):
        match = pattern.fullmatch(name)
        if match and not psutil.pid_exists(int(match[1])):
            found.append(path.parent / name)
    return found


@contextmanager
def _renamed_into_place(path: Path) -> Iterator[Path]:
    """The shared core: a temp name beside `path`, renamed over it when the block ends cleanly (then
    the folder is fsynced); removed when it fails, so a full disk or a kill gives the space back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_writer(path: Path, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new bytes into; they replace `path` when the block ends."""
    with _renamed_into_place(Path(path)) as tmp:
        fd = os.open(tmp, _CREATE, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(fd, mode)  # os.open's mode passes through the umask; this does not
            yield fh
            fh.flush()
            os.fsync(fd)


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    with atomic_writer(path, mode=mode) as fh:
        fh.write(data)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path for a writer that takes a path; what it wrote there replaces `path` when the block
    ends (a missing temp fails the block: the writer wrote nothing)."""
    with _renamed_into_place(Path(path)) as tmp:
        yield tmp
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows flushes only what it may write
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
