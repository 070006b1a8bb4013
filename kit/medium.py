"""Writing a stick onto a medium: what the medium is (filesystem, room, the FAT32 limit), the
hashed copy (one read of the source, every target written from it), and the order that keeps a
half-written stick saying so (INCOMPLETE first, bundle.json last).

`kit build` (kit.builder) and `kit clone` / `kit update` (kit.clone) both write sticks through
this module. It sits in the pure core because the stick's own frozen runtime, which leaves
kit.builder out, clones sticks too.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

from kit import __version__
from kit.errors import IntegrityError
from kit.fsutil import atomic_write, atomic_writer, leftover_temps
from kit.integrity import Digest, Hasher, hashed_blocks, sums_text
from kit.manifest import MANIFEST_COMPANIONS, ROOT_FILE_NAMES, BundleManifest
from kit.paths import BundlePaths

OnBytes = Callable[[int], None]

# ---------------------------------------------------------------- the stick's root

README_NAME = "README.txt"
# The launchers beside KIT/ and the line ending each needs whatever the checkout did: cmd.exe
# misreads labels in LF-only batch files, and a CR in a shell script's first line breaks it.
LAUNCHERS = {"START-linux.sh": "\n", "START-macos.command": "\n", "START-windows.bat": "\r\n"}
ROOT_FILES = ROOT_FILE_NAMES  # the manifest's list of them (kit.manifest: the path rules)


def write_root_file(root: Path, name: str, data: bytes) -> None:
    """README.txt or a launcher at the stick's root, atomically; a shell launcher made executable."""
    dest = root / name
    atomic_write(dest, data)
    if LAUNCHERS.get(name) == "\n":
        make_executable(dest)


def make_executable(path: Path) -> None:
    try:
        path.chmod(0o755)
    except OSError:  # FAT and exFAT hold no modes: the README explains how to start it anyway
        pass


# ---------------------------------------------------------------- the medium

FAT32_MAX_FILE = (4 << 30) - 1  # 4 GiB - 1: one byte more and the copy fails half-way
MOUNTS = Path("/proc/mounts")


def filesystem_type(path: Path) -> str | None:
    """The fstype of the mount holding `path` (Linux), or None when it cannot be told."""
    try:
        lines = MOUNTS.read_text().splitlines()
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


def existing_ancestor(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists: where a new stick folder would go."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def device_of(path: Path) -> int:
    """Which filesystem `path` (or the folder it would be made in) is on: targets on one share its room."""
    return os.stat(existing_ancestor(path)).st_dev


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def allocation_unit(path: Path) -> int:
    """The filesystem's block (an exFAT cluster can be 128 KiB): every file takes whole ones."""
    try:
        return max(os.statvfs(existing_ancestor(path)).f_frsize, 512)
    except (OSError, AttributeError):  # Windows has no statvfs
        return 4096


def allocated(size: int, unit: int) -> int:
    return max(1, -(-size // unit)) * unit


def drop_cached(path: Path) -> None:
    """Ask the kernel to forget `path`'s cached pages (synced ones), so that the next read comes from
    the medium itself and not from memory: a verify after a copy checks what the stick holds."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the hashed copy

class WriteFailed(OSError):
    """Writing one destination failed (full, pulled out, read-only); `dest` says which one."""

    def __init__(self, dest: Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), str(dest))
        self.dest = Path(dest)


class SourceChanged(IntegrityError):
    """The bytes read while copying are not the ones expected."""

    hint = ("the source changed, or cannot be read reliably; what was copied so far is kept: run the same "
            "command again (check a source stick with `kit verify`)")


def copy_hashed(src: Path, dests: Sequence[Path], *, expect: Digest | None = None, sha256: bool = False,
                on_block: OnBytes | None = None) -> Digest:
    """Read `src` once and write every block to each of `dests`, hashing what was read.

    Each destination is written under its own temp name and renamed over its final name only when
    the whole file is written and synced and the digest matches `expect`: a failure, a kill or a
    mismatch changes no destination. A failed write raises WriteFailed naming that destination;
    `on_block` hears each block's size once, however many destinations it went to.
    """
    hasher = Hasher(sha256=sha256)
    with ExitStack() as stack:
        fin = stack.enter_context(open(src, "rb", buffering=0))
        outs = [(Path(d), stack.enter_context(_destination(Path(d)))) for d in dests]
        for chunk in hashed_blocks(fin, hasher, on_block):
            for dest, fh in outs:
                try:
                    fh.write(chunk)
                except OSError as exc:
                    raise WriteFailed(dest, exc) from exc
        digest = hasher.digest()
        if expect is not None and digest != expect:
            raise SourceChanged(f"{src} changed while it was copied: its bytes no longer match")
    return digest


@contextmanager
def _destination(dest: Path) -> Iterator[BinaryIO]:
    """kit.fsutil.atomic_writer, with its own failures (making the folder and the temp file; flush,
    fsync, rename) named by `dest`; a failure raised by the copy itself passes through unchanged."""
    copying = False
    try:
        with atomic_writer(dest) as fh:
            copying = True
            yield fh
            copying = False
    except WriteFailed:
        raise
    except OSError as exc:
        if copying:
            raise
        raise WriteFailed(dest, exc) from exc


# ---------------------------------------------------------------- the order of a stick's writing

def utc_now() -> str:
    """The stamp bundle.json's `created` and the INCOMPLETE marker carry: UTC to the second, 'Z'."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def begin(stick: BundlePaths, what: str) -> None:
    """The first write to a stick: the INCOMPLETE marker, so that a kill from here on leaves a stick
    the runtime and `kit verify` refuse as unfinished, never one that looks finished."""
    stick.kit.mkdir(parents=True, exist_ok=True)
    atomic_write(stick.incomplete_marker, f"{what} started {utc_now()} by kit {__version__}\n".encode())


def seal(stick: BundlePaths, manifest: BundleManifest, raw: bytes,
         write_signature: Callable[[Path], object]) -> None:
    """The last writes, in order: the hand-check sums, bundle.json's exact bytes, then
    `write_signature(KIT/)` (bundle.json.sig and signer.pub, or their removal), and only then the
    INCOMPLETE marker goes. A writer killed half way left temp files beside these, the marker and
    the root files: remove them first, or the finished stick would carry files its manifest does
    not list."""
    ours = [stick.kit / name for name in (*MANIFEST_COMPANIONS, stick.incomplete_marker.name)]
    for path in ours + [stick.root / name for name in ROOT_FILE_NAMES]:
        for temp in leftover_temps(path):
            temp.unlink(missing_ok=True)
    atomic_write(stick.kit / "B3SUMS", sums_text(manifest, "blake3").encode())
    atomic_write(stick.kit / "SHA256SUMS", sums_text(manifest, "sha256").encode())
    atomic_write(stick.manifest, raw)
    write_signature(stick.kit)
    stick.incomplete_marker.unlink()
