"""Sealed in-memory copies of model files (Linux memfd): the bytes llama.cpp maps are the bytes
hashed, nobody can change them afterwards, and the stick can go once they are loaded.

A memfd is anonymous shared memory with a file descriptor. Filled, then sealed with
F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL, it refuses every write (EPERM), every
resize and any new seal, for this process too. llama.cpp opens it as `/proc/self/fd/N` and its
read-only MAP_SHARED mapping shares the memfd's pages: no second copy. The pages are shmem, never
evicted or written back: the plan counts them (kit.estimate.sealed_ram).

Standard library only (os, fcntl; tempfile for split models' names); the hashing loop is
kit.integrity's, which also registers the copies for the engine's load check.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

SEALS = ("F_SEAL_WRITE", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_SEAL")
# Where the private folder of shard names goes: RAM filesystems only, never the host's disk.
LINK_ROOTS = ("/dev/shm", "/run/shm")
_serial = iter(range(1, 1 << 62))  # memfd names are unique in a process: the registry keys on them


def unsupported() -> str | None:
    """Why sealed copies cannot be made here, or None when they can (one throwaway memfd tried)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
        return f"memfd is Linux-only (this is {sys.platform})"
    if fcntl is None or not all(hasattr(fcntl, s) for s in ("F_ADD_SEALS", *SEALS)):
        return "this Python has no file sealing (fcntl.F_ADD_SEALS)"
    try:
        fd = create("probe")
    except OSError as exc:  # an old kernel, or a sandbox (seccomp) that forbids memfd_create
        return f"memfd_create failed: {exc.strerror or exc}"
    try:
        seal(fd)
    except OSError as exc:
        return f"memfd sealing failed: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return None


def create(name: str) -> int:
    """A new, empty, sealable memfd (close-on-exec: a child gets it only through pass_fds)."""
    return os.memfd_create(f"kit-{next(_serial)}-{name}"[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def reserve(fd: int, size: int) -> None:
    """Take the memfd's pages up front: memory that is short fails here, before a byte is copied,
    and the pages come in one run, which the model's reads liked a little better than pages taken
    one write at a time (docs/BENCHMARKS.md §8)."""
    if size > 0:
        os.posix_fallocate(fd, 0, size)


def write_all(fd: int, chunk: memoryview) -> None:
    while chunk:
        chunk = chunk[os.write(fd, chunk):]


def seal(fd: int) -> None:
    """No more writes, resizes or seals, for anyone, from now on."""
    flags = 0
    for name in SEALS:
        flags |= getattr(fcntl, name)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, flags)


def is_sealed(fd: int) -> bool:
    flags = 0
    for name in SEALS:
        flags |= getattr(fcntl, name)
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & flags == flags


def fd_path(fd: int) -> Path:
    """The name llama.cpp (or a child given the descriptor) opens the memfd by."""
    return Path(f"/proc/self/fd/{fd}")


def fd_of(path: str | Path) -> int | None:
    """The descriptor a fd_path names (a child inherits it under the same number), else None."""
    head, _, number = str(path).rpartition("/")
    return int(number) if head == "/proc/self/fd" and number.isdigit() else None


@contextmanager
def shard_names(paths: Sequence[Path], names: Sequence[str]) -> Iterator[list[Path]]:
    """`paths` reachable under `names` in one private folder, for as long as the block runs.

    llama.cpp opens the other shards of a split GGUF by names derived from the first one's
    (llama_split_prefix: strip "-00001-of-0000N.gguf"; llama_split_path: add "-0000k-of-0000N.gguf"),
    so `/proc/self/fd/N` alone works for one file only. The folder holds symlinks to the
    descriptors, is made 0700 on a RAM filesystem, and goes as soon as the load has opened every
    shard (llama.cpp keeps its own descriptors). One file needs no folder."""
    if len(paths) == 1:
        yield [Path(paths[0])]
        return
    with ram_folder("shards") as folder:
        links = []
        for target, name in zip(paths, names, strict=True):
            link = folder / name
            link.symlink_to(target)
            links.append(link)
        yield links


@contextmanager
def ram_folder(purpose: str) -> Iterator[Path]:
    """A private (0700) folder on a RAM filesystem for as long as the block runs: files the kit
    must hand a native tool by name (shard links, the served page) never touch the host's disk."""
    root = next((r for r in LINK_ROOTS if os.access(r, os.W_OK | os.X_OK)), None)
    if root is None:
        raise OSError(f"no RAM folder ({', '.join(LINK_ROOTS)}) for the {purpose}")
    folder = Path(tempfile.mkdtemp(prefix=f"kit-{purpose}-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
