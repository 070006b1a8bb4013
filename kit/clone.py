"""`kit clone` and `kit update`: a stick makes sticks, offline, each verified by its own manifest.

For every target at once:
1. The source is checked whole first (what `kit verify` checks: the signature, the rollback record,
   every file's BLAKE3): a damaged or unfinished source is refused, naming the file, before any
   target is touched.
2. Each target is checked before a byte is written: a folder of its own, writable, room on its
   filesystem (targets on one filesystem share it), no file over 4 GiB for a FAT32 one. What it
   already holds and verifies is kept: a killed clone resumes, an update copies only what differs.
3. INCOMPLETE goes on every target; an update removes the files only its old manifest listed; then
   each needed source file is read once and written to every target that needs it, hashed as it
   is read (kit.medium.copy_hashed): the source, often a USB stick, is the slow part.
4. Each target's new files are re-read from its medium and verified. Only a target that verified
   gets the root files, bundle.json's exact bytes and the source's signature, and then loses its
   INCOMPLETE marker, so a pulled or damaged target never looks finished.
"""

from __future__ import annotations

import functools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kit import medium, rollback, signing
from kit.errors import IncompleteBundleError, IntegrityError, KitError, ManifestError, describe_error
from kit.fsutil import atomic_write, leftover_temps
from kit.integrity import OK, Digest, FileStatus, unexpected_files, verify_entry
from kit.manifest import (
    MANIFEST_COMPANIONS,
    MAX_MANIFEST,
    STATE_DIRNAME,
    BundleManifest,
    FileEntry,
    open_checked,
    parse_bundle_manifest,
)
from kit.paths import KIT_DIRNAME, BundlePaths
from kit.units import MiB, human_bytes

CLONE, UPDATE = "clone", "update"
CHECK_SOURCE = "checking the source"
CHECK_TARGETS = "checking what the targets hold"
COPY = "copying"
VERIFY = "verifying the copies"
MAX_ROOT_FILE = 1 * MiB  # README.txt and the launchers are a few KiB; a bigger one is not the kit's


class CloneError(KitError):
    """A target cannot be written as asked; nothing was written."""

    hint = "give another target; nothing was written"


class SourceError(IntegrityError):
    """The source stick is damaged or unfinished: it is not copied."""

    hint = "clone from a good stick; `kit verify SRC` lists every damaged file"


class DowngradeError(rollback.RollbackError):
    hint = "update from the newer stick; to go back to an older one on purpose, add --allow-older"


# ---------------------------------------------------------------- progress

@dataclass
class Tally:
    """Bytes done of a total since `start`: one target's, or the whole job's, in one phase."""

    name: str
    total: int
    done: int = 0
    start: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-6)

    @property
    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None


@dataclass(frozen=True)
class Step:
    """What a progress display is told: the phase, the job's bytes and each target's."""

    phase: str
    job: Tally
    targets: tuple[Tally, ...]


ProgressFn = Callable[[Step], None]


class _Meter:
    """One phase's byte counts, told to `on_progress`; blocks arrive from several threads."""

    def __init__(self, phase: str, job_total: int, targets: dict[str, int], on_progress: ProgressFn | None):
        self.tallies = {name: Tally(name, total) for name, total in targets.items()}
        self.step = Step(phase, Tally("all", job_total), tuple(self.tallies.values()))
        self.on_progress = on_progress
        self.lock = threading.Lock()

    def counter(self, *targets: Target) -> Callable[[int], None]:
        """Counts a block once for the job and once for each of `targets` (one read, N writes)."""
        tallies = [self.tallies[t.name] for t in targets]

        def on_block(n: int) -> None:
            with self.lock:
                self.step.job.done += n
                for tally in tallies:
                    tally.done += n
                self._tell()

        return on_block

    def take_back(self, n: int, targets: Iterable[Target]) -> None:
        """A copy that failed on one target is redone for the others: its bytes count again."""
        with self.lock:
            for t in targets:
                self.tallies[t.name].done -= n
            self.step.job.done -= n

    def _tell(self) -> None:
        if self.on_progress:
            self.on_progress(self.step)


# ---------------------------------------------------------------- the source

@dataclass(frozen=True)
class Source:
    stick: BundlePaths
    trust: signing.Trust
    signature: dict[str, bytes]  # signer.pub and bundle.json.sig exactly as on the source; {}: unsigned
    root_files: dict[str, bytes]  # README.txt and the launchers

    @property
    def manifest(self) -> BundleManifest:
        return self.trust.manifest

    @property
    def size(self) -> int:
        return sum(f.size for f in self.manifest.files)


def open_source(stick: BundlePaths) -> Source:
    """The source's bundle.json, signature and rollback record checked (as `kit verify` does), and
    what goes beside its files: quick, so a wrong target is told before the long hashing."""
    try:
        trust = signing.check_stick(stick)
    except IncompleteBundleError:
        raise SourceError(f"the source stick {stick.root} is incomplete (its KIT/INCOMPLETE marker is there, "
                          "or it has no KIT/bundle.json): its build or copy did not finish",
                          "finish it first (run the same kit build, clone or update again), or clone from "
                          "a finished stick") from None
    rollback.check_bundle(stick, trust.raw, None, record=False)  # reads its record, writes nothing
    signature = {name: (stick.kit / name).read_bytes() for name in (signing.PUB_NAME, signing.SIG_NAME)} \
        if trust.signer else {}
    return Source(stick, trust, signature, _root_files(stick.root))


def verify_source(source: Source, on_progress: ProgressFn | None = None) -> int:
    """Every file's BLAKE3, stopping at the first damaged file, which the error names; returns the
    bytes read."""
    meter = _Meter(CHECK_SOURCE, source.size, {}, on_progress)
    for entry in source.manifest.files:
        status = verify_entry(source.stick.kit, entry, meter.counter())
        if status.state != OK:
            raise SourceError(f"the source stick is damaged: KIT/{entry.path} is {status.state} ({status.detail}); "
                              "nothing was copied")
    return meter.step.job.done


def _root_files(root: Path) -> dict[str, bytes]:
    found = {}
    for name in medium.ROOT_FILES:
        try:
            st = (root / name).lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_ROOT_FILE:
            found[name] = (root / name).read_bytes()
    return found


# ---------------------------------------------------------------- the targets

@dataclass
class Target:
    stick: BundlePaths
    old: BundleManifest | None = None  # update: the manifest the target held
    kept: list[FileStatus] = field(default_factory=list)  # already there, verified from its medium
    needs: list[FileEntry] = field(default_factory=list)
    obsolete: list[str] = field(default_factory=list)  # listed by its old manifest only
    leftovers: list[Path] = field(default_factory=list)  # temp files of killed writers
    copied: list[FileEntry] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[FileStatus] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)
    error: str | None = None
    verified: bool = False

    @property
    def name(self) -> str:
        return str(self.stick.root)

    def fail(self, err: BaseException) -> None:
        what, fix, _ = describe_error(err)
        self.error = f"{what} — {fix}"

    def dest(self, entry: FileEntry) -> Path:
        return self.stick.resolve(entry.path)


def target_stick(path: Path) -> BundlePaths:
    """Where a target goes: a folder (or a new one in a folder that exists)."""
    root = Path(path).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise CloneError(f"the target {root} is a file, not a folder", "give a folder (a mounted stick, or a new one)")
    if not root.parent.is_dir():
        raise CloneError(f"the target's folder {root.parent} does not exist",
                         "mount the stick or create the folder, then run the same command again")
    return BundlePaths(root, root / KIT_DIRNAME)


def _held_manifest(stick: BundlePaths) -> bytes | None:
    """The bundle.json bytes a target holds, finished or not (a killed update leaves its old one)."""
    try:
        st = stick.manifest.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST:
        raise CloneError(f"{stick.manifest} is not a bundle.json the kit wrote", "give an empty folder instead")
    return stick.manifest.read_bytes()


def clone_target(stick: BundlePaths, source: Source) -> Target:
    """A target for `kit clone`: empty, unfinished, or already this very stick (then only checked)."""
    held = _held_manifest(stick)
    if held is not None and held != source.trust.raw and not stick.incomplete_marker.exists():
        raise CloneError(f"{stick.root} already holds another stick",
                         f"bring it up to date with `kit update {stick.root} --from {source.stick.root}`, "
                         "or clone to an empty folder")
    return Target(stick)


def update_target(stick: BundlePaths, source: Source, *, allow_older: bool = False) -> Target:
    """A target for `kit update`: a stick (finished, or an update of it killed midway), not newer."""
    held = _held_manifest(stick)
    if held is None:
        raise CloneError(f"{stick.root} holds no stick to update (no KIT/bundle.json)",
                         f"make it one with `kit clone {source.stick.root} {stick.root}`")
    try:
        old = parse_bundle_manifest(held)
    except ManifestError as exc:
        raise CloneError(f"the stick at {stick.root} has a bundle.json this kit cannot read ({exc})",
                         f"clone onto it afresh: empty the folder, then `kit clone {source.stick.root} "
                         f"{stick.root}`") from None
    if not allow_older:
        refuse_downgrade(stick, held, source.trust.raw)
    return Target(stick, old=old)


def refuse_downgrade(stick: BundlePaths, held: bytes, new: bytes) -> None:
    """The newer stick wins: by the bundle.json the target holds and by the newest it has run."""
    try:
        rollback.check(stick.kit / STATE_DIRNAME, new, record=False)
    except rollback.RollbackError as exc:
        raise DowngradeError(f"the source stick is older than one the stick at {stick.root} has already "
                             f"run ({exc})") from None
    ours, theirs = rollback.Seen.of(new), rollback.Seen.of(held)
    if ours.schema_version < theirs.schema_version or ours.when < theirs.when:
        raise DowngradeError(f"the source stick (created {ours.created}) is older than the one at "
                             f"{stick.root} (created {theirs.created})")


def refuse_overlaps(source: BundlePaths, targets: Sequence[BundlePaths]) -> None:
    """No target is the source, inside it or around it; no target is given twice or inside another."""
    if not targets:
        raise CloneError("no target given", "name at least one folder to write the stick to")
    src = Path(os.path.realpath(source.root))
    seen: list[Path] = []
    for t in targets:
        real = Path(os.path.realpath(t.root))
        if _nested(real, src):
            raise CloneError(f"the target {t.root} is the source stick, inside it or around it",
                             "give a target outside the source stick")
        if any(_nested(real, other) for other in seen):
            raise CloneError(f"the target {t.root} is given twice, or inside another target",
                             "give each target once, each a folder of its own")
        seen.append(real)


def _nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


# ---------------------------------------------------------------- what each target needs

def survey(targets: Sequence[Target], manifest: BundleManifest, on_progress: ProgressFn | None) -> None:
    """Which files each target already holds and verify (re-read from its medium), which it needs,
    which an update removes, and the temp files killed writers left."""
    plans = {t.name: _bytes_to_check(t, manifest) for t in targets}
    meter = _Meter(CHECK_TARGETS, sum(plans.values()), plans, on_progress)

    def one(t: Target) -> None:
        on_block = meter.counter(t)
        for entry in manifest.files:
            status = _verify_on_medium(t, entry, on_block)
            if status.state == OK:
                t.kept.append(status)
            else:
                t.needs.append(entry)
        listed = {f.path for f in manifest.files}
        t.obsolete = [f.path for f in (t.old.files if t.old else ()) if f.path not in listed]
        t.leftovers = _leftovers(t, manifest)

    _each(targets, one)


def _bytes_to_check(t: Target, manifest: BundleManifest) -> int:
    total = 0
    for entry in manifest.files:
        try:
            total += entry.size if t.dest(entry).lstat().st_size == entry.size else 0
        except OSError:
            pass
    return total


def _verify_on_medium(t: Target, entry: FileEntry, on_block: Callable[[int], None]) -> FileStatus:
    """verify_entry after the file's cached pages are dropped: what the medium holds, not memory."""
    path = t.dest(entry)
    try:
        if stat.S_ISREG(path.lstat().st_mode) and path.stat().st_size == entry.size:
            medium.drop_cached(path)
    except OSError:
        pass  # missing or unreadable: verify_entry says which
    return verify_entry(t.stick.kit, entry, on_block)


def _leftovers(t: Target, manifest: BundleManifest) -> list[Path]:
    paths = [t.dest(f) for f in manifest.files] + [t.stick.resolve(p) for p in t.obsolete]
    paths += [t.stick.kit / name for name in MANIFEST_COMPANIONS] + [t.stick.incomplete_marker]
    paths += [t.stick.root / name for name in medium.ROOT_FILES]
    return [temp for p in paths for temp in leftover_temps(p)]


def check_fits(targets: Sequence[Target], source: Source) -> None:
    """Before a byte is written: each target writable, no file over 4 GiB for FAT32, and room on
    each filesystem for every target on it."""
    big = [f for f in source.manifest.files if f.size > medium.FAT32_MAX_FILE]
    groups: dict[int, list[Target]] = {}
    for t in _live(targets):
        where = medium.existing_ancestor(t.stick.root)
        if not os.access(where, os.W_OK):
            raise CloneError(f"the target {t.name} cannot be written (read-only, or not yours)",
                             "unlock the stick or choose a folder you may write to")
        if (folder := _unsafe_folder(t)) is not None:
            raise CloneError(f"{folder} on the target is a link or not a folder: the kit never writes through "
                             "links, which could lead off the stick", "remove it, or clone to an empty folder")
        if big and medium.is_fat32(medium.filesystem_type(where)):
            raise CloneError(f"the target {t.name} is FAT32, which cannot hold KIT/{big[0].path} "
                             f"({human_bytes(big[0].size)}): no file on FAT32 may reach 4 GiB",
                             "reformat the stick as exFAT (every OS reads it, and it holds big files), "
                             "then run the same command again")
        groups.setdefault(medium.device_of(t.stick.root), []).append(t)
    for group in groups.values():
        where = group[0].stick.root
        unit = medium.allocation_unit(where)
        need = sum(_bytes_to_write(t, source, unit) for t in group)
        free = medium.free_bytes(where) + sum(_bytes_freed(t) for t in group)
        if need > free:
            names = ", ".join(t.name for t in group)
            raise CloneError(f"not enough room: {names} need {human_bytes(need)}, and only {human_bytes(free)} "
                             "is free there", "use a bigger stick or free space on it; nothing was written")


def _unsafe_folder(t: Target) -> Path | None:
    """A folder the new files go into (KIT/ and below) that is there but is a link or a file."""
    folders = {t.stick.kit} | {t.stick.kit.joinpath(*e.path.split("/")[:i])
                               for e in t.needs for i in range(1, e.path.count("/") + 1)}
    for folder in sorted(folders):
        try:
            if not stat.S_ISDIR(folder.lstat().st_mode):
                return folder
        except FileNotFoundError:
            continue
    return None


def _bytes_to_write(t: Target, source: Source, unit: int) -> int:
    """The new files in whole blocks, plus bundle.json, the sums (smaller than it), the root files
    and the folders."""
    folders = {e.path.rsplit("/", 1)[0] for e in t.needs if "/" in e.path}
    metadata = 3 * len(source.trust.raw) + sum(len(b) for b in source.root_files.values()) + \
        sum(len(b) for b in source.signature.values())
    return sum(medium.allocated(e.size, unit) for e in t.needs) + metadata + (len(folders) + 8) * unit


def _bytes_freed(t: Target) -> int:
    """Removed before copying: what killed writers left and the files only the old manifest listed."""
    total = 0
    for path in [*t.leftovers, *(t.stick.resolve(p) for p in t.obsolete)]:
        try:
            total += path.lstat().st_size
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- writing

def prepare(t: Target, command: str) -> None:
    """INCOMPLETE first; then the leftovers of killed writers and the files only the old manifest
    listed go (an update can need their room)."""
    medium.begin(t.stick, command)
    for temp in t.leftovers:
        temp.unlink(missing_ok=True)
    for relpath in t.obsolete:
        if remove_listed(t.stick.kit, relpath):
            t.removed.append(relpath)
    _remove_empty_folders(t.stick.kit, t.removed)


def remove_listed(kit_dir: Path, relpath: str) -> bool:
    """Delete KIT/relpath, never through a link: a folder on the way must be a real folder."""
    folder = kit_dir
    *parents, name = relpath.split("/")
    try:
        for part in parents:
            folder = folder / part
            if not stat.S_ISDIR(folder.lstat().st_mode):
                return False
        if stat.S_ISDIR((folder / name).lstat().st_mode):
            return False
        (folder / name).unlink()
    except FileNotFoundError:
        return False
    return True


def _remove_empty_folders(kit_dir: Path, removed: Iterable[str]) -> None:
    folders = {kit_dir.joinpath(*p.split("/")[:i]) for p in removed for i in range(1, p.count("/") + 1)}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (or not ours): it stays


def copy_all(source: Source, targets: Sequence[Target], on_progress: ProgressFn | None) -> int:
    """Each needed file read once from the source, written to every target needing it; returns the
    bytes read. A target that fails a write drops out; the file is then redone for the others."""
    live = _live(targets)
    pending = {t.name: {e.path for e in t.needs} for t in live}
    wanted = [e for e in source.manifest.files if any(e.path in pending[t.name] for t in live)]
    meter = _Meter(COPY, sum(e.size for e in wanted), {t.name: sum(e.size for e in t.needs) for t in live},
                   on_progress)
    read = 0
    for entry in wanted:
        while waiting := [t for t in _live(targets) if entry.path in pending[t.name]]:
            n, done = _copy_entry(source, entry, waiting, meter)
            read += n
            if done:
                for t in waiting:
                    pending[t.name].discard(entry.path)
    return read


def _copy_entry(source: Source, entry: FileEntry, waiting: list[Target], meter: _Meter) -> tuple[int, bool]:
    """One source file to every waiting target; returns the bytes read and whether it was written to
    all of them. A target whose write fails is marked failed, and its bytes are taken back from the
    progress."""
    src = open_checked(source.stick.kit, entry.path)
    tell, read = meter.counter(*waiting), 0

    def on_block(n: int) -> None:
        nonlocal read
        read += n
        tell(n)

    try:
        medium.copy_hashed(src, [t.dest(entry) for t in waiting], expect=Digest(entry.size, entry.blake3),
                           on_block=on_block)
    except medium.WriteFailed as exc:
        next(t for t in waiting if t.dest(entry) == exc.dest).fail(exc)
        meter.take_back(read, waiting)
        return read, False
    for t in waiting:
        _copy_mode(src, t.dest(entry))
        t.copied.append(entry)
    return read, True


def _copy_mode(src: Path, dest: Path) -> None:
    """The runtime's programs and libraries stay executable."""
    if src.stat().st_mode & 0o111:
        medium.make_executable(dest)


def verify_copies(targets: Sequence[Target], on_progress: ProgressFn | None) -> None:
    """Re-read every copied file from its target's medium and check it against the manifest."""
    totals = {t.name: sum(e.size for e in t.copied) for t in _live(targets)}
    meter = _Meter(VERIFY, sum(totals.values()), totals, on_progress)

    def one(t: Target) -> None:
        on_block = meter.counter(t)
        t.problems = [s for s in (_verify_on_medium(t, e, on_block) for e in t.copied) if s.state != OK]
        if t.problems:
            first = t.problems[0]
            t.error = (f"KIT/{first.path} did not verify after the copy ({first.detail}) — the target stays "
                       "marked incomplete; run the same command again, or use another stick if it keeps failing")

    _each(targets, one)


def finish(t: Target, source: Source, *, reset_record: bool = False) -> None:
    """The root files, then kit.medium.seal: sums, bundle.json, the source's signature, marker gone;
    then bundle.json and its signature are read back: the same bytes, the same signer."""
    for name, data in source.root_files.items():
        medium.write_root_file(t.stick.root, name, data)
    medium.seal(t.stick, source.manifest, source.trust.raw,
                functools.partial(_write_signature, files=source.signature))
    back = signing.check_stick(t.stick)
    if back.raw != source.trust.raw or back.signer != source.trust.signer:
        raise IntegrityError(f"bundle.json or its signature on {t.name} does not read back as written")
    state = t.stick.kit / STATE_DIRNAME
    if reset_record and state.is_dir() and not state.is_symlink() and (state / rollback.RECORD_NAME).exists():
        # --allow-older: the stick is meant to run this older bundle now; its record would refuse it
        rollback.write_record(state, rollback.Seen.of(source.trust.raw))
    t.left_alone = unexpected_files(t.stick.kit, source.manifest)
    t.verified = True


def _write_signature(kit_dir: Path, files: dict[str, bytes]) -> None:
    if not files:
        signing.remove_signature(kit_dir)
    for name in (signing.PUB_NAME, signing.SIG_NAME):
        if name in files:
            atomic_write(kit_dir / name, files[name])


def _live(targets: Iterable[Target]) -> list[Target]:
    return [t for t in targets if t.error is None]


def _each(targets: Sequence[Target], action: Callable[[Target], None]) -> None:
    """`action` on every target still going, side by side (each target is its own device); a target
    that fails is marked so and the others go on."""
    live = _live(targets)

    def guarded(t: Target) -> None:
        try:
            action(t)
        except (OSError, KitError) as exc:
            t.fail(exc)

    if len(live) == 1:
        guarded(live[0])
        return
    with ThreadPoolExecutor(max_workers=max(len(live), 1)) as pool:
        list(pool.map(guarded, live))


# ---------------------------------------------------------------- the two commands

@dataclass(frozen=True)
class TargetResult:
    target: str
    verified: bool
    copied: tuple[str, ...]
    copied_bytes: int
    kept: int
    removed: tuple[str, ...]
    left_alone: tuple[str, ...]  # under KIT/, listed by no manifest: not the kit's to delete
    problems: tuple[FileStatus, ...]
    error: str | None

    @classmethod
    def of(cls, t: Target) -> TargetResult:
        return cls(t.name, t.verified, tuple(e.path for e in t.copied), sum(e.size for e in t.copied),
                   len(t.kept), tuple(t.removed), tuple(t.left_alone), tuple(t.problems), t.error)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CloneReport:
    command: str  # clone | update
    source: str
    created: str
    signer: str | None
    files: int
    stick_bytes: int
    checked_bytes: int  # read to check the source first
    copy_read_bytes: int  # read from the source to copy: once, however many targets
    seconds: float
    targets: tuple[TargetResult, ...]

    @property
    def ok(self) -> bool:
        return all(t.verified for t in self.targets)

    @property
    def written_bytes(self) -> int:
        return sum(t.copied_bytes for t in self.targets)

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok, "signer": self.signer or "unsigned",
                               "written_bytes": self.written_bytes}

    def summary(self) -> str:
        verb = "cloned" if self.command == CLONE else "updated from"
        copied = (f"read {human_bytes(self.copy_read_bytes)} from it once for {human_bytes(self.written_bytes)} "
                  "written") if self.copy_read_bytes else "nothing needed copying"
        lines = [f"{verb} {self.source} ({self.files} files, {human_bytes(self.stick_bytes)}, created "
                 f"{self.created}, {'signed by ' + self.signer if self.signer else 'unsigned'}) in "
                 f"{self.seconds:.1f} s: {copied}"]
        for t in self.targets:
            if t.verified:
                lines.append(f"  verified  {t.target}: {len(t.copied)} files copied, {t.kept} already there")
            else:
                lines.append(f"  FAILED    {t.target}: {t.error}")
            if t.removed:
                lines.append(f"            removed (the old stick's, no longer listed): {', '.join(t.removed)}")
            if t.left_alone:
                lines.append(f"            left alone (no manifest lists them; `kit verify` shows them as "
                             f"unexpected): {', '.join('KIT/' + p for p in t.left_alone)}")
        failed, n = sum(not t.verified for t in self.targets), len(self.targets)
        if failed:
            lines.append(f"{failed} of {n} targets did not verify: they stay marked incomplete.")
        else:
            lines.append(f"All {n} targets verified." if n > 1 else "The target verified.")
        return "\n".join(lines)


def clone(source: BundlePaths, dests: Sequence[Path], *, on_progress: ProgressFn | None = None) -> CloneReport:
    """`kit clone SRC DST [DST ...]`: quick refusals first, then the source hashed, then the writing."""
    start = time.monotonic()
    sticks = [target_stick(d) for d in dests]
    refuse_overlaps(source, sticks)
    src = open_source(source)
    targets = [clone_target(s, src) for s in sticks]
    return _write(CLONE, src, targets, start, on_progress)


def update(source: BundlePaths, dests: Sequence[Path], *, allow_older: bool = False,
           on_progress: ProgressFn | None = None) -> CloneReport:
    """`kit update DST [DST ...] --from SRC`."""
    start = time.monotonic()
    sticks = [target_stick(d) for d in dests]
    refuse_overlaps(source, sticks)
    src = open_source(source)
    targets = [update_target(s, src, allow_older=allow_older) for s in sticks]
    return _write(UPDATE, src, targets, start, on_progress, reset_record=allow_older)


def _write(command: str, src: Source, targets: list[Target], start: float, on_progress: ProgressFn | None,
           *, reset_record: bool = False) -> CloneReport:
    checked = verify_source(src, on_progress)
    survey(targets, src.manifest, on_progress)
    check_fits(targets, src)
    _each(targets, lambda t: prepare(t, command))
    read = copy_all(src, targets, on_progress)
    verify_copies(targets, on_progress)
    _each(targets, lambda t: finish(t, src, reset_record=reset_record))
    manifest = src.manifest
    return CloneReport(command, str(src.stick.root), manifest.created, src.trust.signer, len(manifest.files),
                       src.size, checked, read, time.monotonic() - start, tuple(TargetResult.of(t) for t in targets))
