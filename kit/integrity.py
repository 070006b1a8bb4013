"""Hashes and verification: streaming BLAKE3 (+ SHA-256 for the hand-check list), VerifyReport.

Reads are sequential in large blocks: a USB stick is the bottleneck, not the hash, and a
sequential read leaves the file in the page cache for llama.cpp's mmap right after.
Verification returns a report; it never prints.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import blake3

from kit import sealed
from kit.errors import NotVerifiedError, UnsafePathError
from kit.manifest import MANIFEST_COMPANIONS, STATE_DIRNAME, BundleManifest, FileEntry, open_checked

BLOCK = 8 << 20  # 8 MiB: large enough for USB throughput, small enough for smooth progress


@dataclass(frozen=True)
class Progress:
    path: str
    done: int  # bytes of this file
    total: int
    all_done: int  # bytes of the whole job
    all_total: int
    rate: float  # bytes per second over the whole job

    @property
    def eta(self) -> float | None:
        return (self.all_total - self.all_done) / self.rate if self.rate > 0 else None


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class Digest:
    size: int
    blake3: str
    sha256: str | None = None


class Hasher:
    """BLAKE3, and SHA-256 when asked, fed the same blocks: one pass gives both."""

    def __init__(self, *, sha256: bool = False):
        self.b3 = blake3.blake3()
        self.sha = hashlib.sha256() if sha256 else None
        self.size = 0

    def update(self, chunk: memoryview) -> None:
        self.b3.update(chunk)
        if self.sha is not None:
            self.sha.update(chunk)
        self.size += len(chunk)

    def digest(self) -> Digest:
        return Digest(self.size, self.b3.hexdigest(), self.sha.hexdigest() if self.sha else None)


def hashed_blocks(fh: BinaryIO, hasher: Hasher, on_block: Callable[[int], None] | None = None,
                  limit: int | None = None) -> Iterator[memoryview]:
    """The one read loop: `fh` in BLOCK-sized sequential reads, each block hashed, then yielded
    (valid until the next one) and only then counted by `on_block`, so progress means "done".
    `limit`: read at most that many bytes from the current position (None: to the end); the caller
    compares with `hasher.size` if a short file matters."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    left = limit
    while left is None or left > 0:
        n = fh.readinto(view if left is None or left >= BLOCK else view[:left])
        if not n:
            return
        if left is not None:
            left -= n
        chunk = view[:n]
        hasher.update(chunk)
        yield chunk
        if on_block:
            on_block(n)


def hash_file(path: Path, *, sha256: bool = False, on_block: Callable[[int], None] | None = None) -> Digest:
    """BLAKE3 (and SHA-256 if asked) of a file in one sequential pass."""
    hasher = Hasher(sha256=sha256)
    with open(path, "rb", buffering=0) as fh:
        for _ in hashed_blocks(fh, hasher, on_block):
            pass
    return hasher.digest()


# ---------------------------------------------------------------- verified-in-this-process registry
# The engine loads only files recorded here; the identity check catches a file swapped after hashing.
_verified: dict[str, tuple[int, int, int, int, int, str]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    # ctime too: a rewrite can put the old mtime back, but setting it moves ctime
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _key(path: Path) -> str:
    # a sealed copy's /proc/self/fd/N (or a link to it) resolves to its unique "/memfd:kit-<n>-..."
    return str(Path(path).resolve())


def _remember(path: Path, blake3_hex: str) -> None:
    _verified[_key(path)] = (*_identity(os.stat(path)), blake3_hex)


def verify_file(path: Path, blake3_hex: str, on_block: Callable[[int], None] | None = None) -> bool:
    """Hash `path`; when it matches `blake3_hex`, remember it for the engine's load check."""
    digest = hash_file(path, on_block=on_block)
    if digest.blake3 != blake3_hex:
        return False
    _remember(path, digest.blake3)
    return True


def require_verified(path: Path) -> str:
    """The BLAKE3 this process checked for `path`; raises if unchecked or changed since."""
    record = _record(path)
    _same_file(path, record, os.stat(path))
    return record[5]


def open_verified(path: Path) -> int:
    """A read-only descriptor of `path`, after its identity matched what this process verified:
    a child handed /proc/self/fd/N reads the file checked, even if the path is swapped later."""
    record = _record(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        _same_file(path, record, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _record(path: Path) -> tuple:
    record = _verified.get(_key(path))
    if record is None:
        raise NotVerifiedError(f"{path} was not verified in this process; refusing to load it")
    return record


def _same_file(path: Path, record: tuple, st: os.stat_result) -> None:
    if record[:5] != _identity(st):
        raise NotVerifiedError(f"{path} changed after it was verified; refusing to load it",
                               "the stick may be failing or was modified while in use")


def forget_verified() -> None:
    _verified.clear()


# ---------------------------------------------------------------- reports

OK, CORRUPT, MISSING, UNEXPECTED = "ok", "corrupt", "missing", "unexpected"


@dataclass(frozen=True)
class FileStatus:
    path: str
    state: str  # ok | corrupt | missing | unexpected
    detail: str = ""
    expected_size: int | None = None
    actual_size: int | None = None


@dataclass(frozen=True)
class VerifyReport:
    files: tuple[FileStatus, ...]
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(f.state == OK for f in self.files)

    def with_state(self, state: str) -> tuple[FileStatus, ...]:
        return tuple(f for f in self.files if f.state == state)

    def counts(self) -> dict[str, int]:
        return {s: len(self.with_state(s)) for s in (OK, CORRUPT, MISSING, UNEXPECTED)}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "counts": self.counts(), "bytes_hashed": self.bytes_hashed,
                "seconds": round(self.seconds, 3), "files": [asdict(f) for f in self.files]}


class ByteMeter:
    """Turns per-block byte counts into Progress values for one whole job."""

    def __init__(self, total: int, progress: ProgressFn | None):
        self.total, self.progress = total, progress
        self.done = 0
        self.start = time.monotonic()

    def file(self, path: str, size: int) -> Callable[[int], None]:
        state = {"done": 0}

        def on_block(n: int) -> None:
            state["done"] += n
            self.done += n
            if self.progress:
                elapsed = max(time.monotonic() - self.start, 1e-6)
                self.progress(Progress(path, state["done"], size, self.done, self.total, self.done / elapsed))

        return on_block


def verify_entry(kit_dir: Path, entry: FileEntry, on_block: Callable[[int], None] | None = None) -> FileStatus:
    """Check one file against its entry; a match is remembered for the engine's load check."""
    return _check_entry(kit_dir, entry, on_block, seal=False)[0]


def seal_entry(kit_dir: Path, entry: FileEntry, on_block: Callable[[int], None] | None = None
               ) -> tuple[FileStatus, SealedCopy | None]:
    """Check one file while copying it into a sealed memfd (kit.sealed); on a match the copy is
    returned and remembered for the engine's load check, else it is dropped."""
    return _check_entry(kit_dir, entry, on_block, seal=True)


def _check_entry(kit_dir: Path, entry: FileEntry, on_block: Callable[[int], None] | None, *, seal: bool
                 ) -> tuple[FileStatus, SealedCopy | None]:
    try:
        real = open_checked(kit_dir, entry.path)
    except FileNotFoundError:
        return FileStatus(entry.path, MISSING, "not on the stick", entry.size), None
    except UnsafePathError as exc:
        return FileStatus(entry.path, CORRUPT, str(exc), entry.size), None
    actual = real.stat().st_size
    if actual != entry.size:
        kind = "truncated" if actual < entry.size else "longer than it should be"
        return FileStatus(entry.path, CORRUPT, f"{kind}: {actual} bytes, expected {entry.size}",
                          entry.size, actual), None
    try:
        if seal:
            copy = _sealed_copy(real, entry.blake3, on_block)
            digest_ok = copy is not None
        else:
            copy, digest_ok = None, hash_file(real, on_block=on_block).blake3 == entry.blake3
    except SealFailed:
        raise  # memory, not the stick: the caller falls back to loading by path
    except OSError as exc:
        return FileStatus(entry.path, CORRUPT, f"cannot be read: {exc.strerror or exc}", entry.size, actual), None
    if not digest_ok:
        return FileStatus(entry.path, CORRUPT, "contents differ from the manifest (BLAKE3 mismatch)",
                          entry.size, actual), None
    if copy is None:
        _remember(real, entry.blake3)
    return FileStatus(entry.path, OK, "", entry.size, actual), copy


# ---------------------------------------------------------------- sealed copies (kit.sealed)

class SealFailed(OSError):
    """The memfd could not be made, filled or sealed (memory ran short): not the file's fault."""


@dataclass(frozen=True)
class SealedCopy:
    """A verified file's bytes in a sealed memfd: `path` is what llama.cpp opens."""

    fd: int
    source: Path

    @property
    def path(self) -> Path:
        return sealed.fd_path(self.fd)

    def close(self) -> None:
        """Forget it and free its memory (once llama.cpp unmaps it too)."""
        _verified.pop(_key(self.path), None)
        os.close(self.fd)


def _sealed_copy(path: Path, blake3_hex: str, on_block: Callable[[int], None] | None) -> SealedCopy | None:
    """Copy `path` into a new memfd while hashing it, seal it; None (copy freed) on a mismatch."""
    try:
        fd = sealed.create(path.name)
    except OSError as exc:
        raise SealFailed(exc.errno, exc.strerror) from exc
    try:
        hasher = Hasher()
        with open(path, "rb", buffering=0) as fh:
            try:
                # the pages up front, at the size seen now (a later change fails the hash)
                sealed.reserve(fd, os.fstat(fh.fileno()).st_size)
            except OSError as exc:
                raise SealFailed(exc.errno, exc.strerror) from exc
            for chunk in hashed_blocks(fh, hasher, on_block):
                try:
                    sealed.write_all(fd, chunk)
                except OSError as exc:
                    raise SealFailed(exc.errno, exc.strerror) from exc
            copied = fh.tell()
        try:
            if os.fstat(fd).st_size != copied:  # the file shrank after it was measured: the copy is what was read
                os.ftruncate(fd, copied)
            sealed.seal(fd)
        except OSError as exc:
            raise SealFailed(exc.errno, exc.strerror) from exc
    except BaseException:
        os.close(fd)
        raise
    if hasher.digest().blake3 != blake3_hex:
        os.close(fd)
        return None
    copy = SealedCopy(fd, path)
    _remember(copy.path, blake3_hex)
    return copy


def unexpected_files(kit_dir: Path, manifest: BundleManifest) -> list[str]:
    """Files under KIT/ the manifest does not name (run-time state and the manifest's companions aside)."""
    known = {f.path for f in manifest.files} | set(MANIFEST_COMPANIONS)
    found = []
    for dirpath, dirnames, filenames in os.walk(kit_dir):
        rel_dir = Path(dirpath).relative_to(kit_dir).as_posix()
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != STATE_DIRNAME]
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel not in known:
                found.append(rel)
    return sorted(found)


def verify_bundle(kit_dir: Path, manifest: BundleManifest, *, only: Iterable[str] | None = None,
                  progress: ProgressFn | None = None) -> VerifyReport:
    """Verify every file of a stick, its root files (launchers, README.txt) too; or only the named
    files under KIT/, which skips the root files and the unexpected-file scan."""
    wanted = set(only) if only is not None else None
    entries = [f for f in manifest.files if wanted is None or f.path in wanted]
    roots = list(manifest.root_files) if wanted is None else []  # beside KIT/: reported by name
    meter = ByteMeter(sum(e.size for e in entries + roots), progress)
    statuses = [verify_entry(kit_dir, e, meter.file(e.path, e.size)) for e in entries]
    statuses += [verify_entry(kit_dir.parent, e, meter.file(e.path, e.size)) for e in roots]
    if wanted is None:
        extra = unexpected_files(kit_dir, manifest)
        statuses += [FileStatus(p, UNEXPECTED, "not listed in bundle.json") for p in extra]
    return VerifyReport(tuple(statuses), meter.done, time.monotonic() - meter.start)


def sums_text(manifest: BundleManifest, algorithm: str) -> str:
    """B3SUMS / SHA256SUMS content: `<hex>  <path>` lines, as b3sum -c and sha256sum -c read them."""
    return "".join(f"{getattr(f, algorithm)}  {f.path}\n" for f in sorted(manifest.files, key=lambda f: f.path))
