"""6. Clone: `kit clone` of the demo stick (frozen runtime included) to 1 and to 3 targets, and
`cp -a` of it to one, side by side in one run, each round from a cold cache; from the source at
this disk's speed and, as root, from the source read at a USB stick's speed (cgroup read limit).

What the kit does that `cp -a` does not: it hashes the whole source before writing anything, fsyncs
every file, and re-reads every copy from its medium to verify it. What it saves: each source file
is read once however many targets there are, so the bytes read from the source are counted twice
over: by the kit itself (its --json report: the check pass plus the copy pass) and, when the bench
runs as root, by the source's own block device (the stick on a loop-mounted ext4 image of its own,
its sectors-read counter in /sys/block), which is what a USB source actually delivers. The
USB-speed runs read that device through a cgroup that caps its reads at USB_READ (blkio v1 or io v2).

    .venv/bin/python bench/clone.py [--quick] [--stick DIR]     this section alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, Ratio, Section, child_env, compare, ensure_cache, fmt, interleave, median, say, spread
from bench.context import QUICK, Context, Sizes
from kit.units import MiB

KIT = [sys.executable, "-m", "kit"]
TARGETS = 3
USB_READ = 100 * MiB  # a good USB 3 stick's sequential read, per second
CGROUP_V1, CGROUP_V2 = Path("/sys/fs/cgroup/blkio"), Path("/sys/fs/cgroup")
Join = Callable[[], None] | None  # run in a child before it starts: join the read-limited cgroup


@dataclass(frozen=True)
class Run:
    seconds: float
    device_read: int | None  # bytes the source's block device delivered (None: no device of its own)
    kit_read: int | None  # bytes the kit read from the source (its report), None for cp
    written: int


# ---------------------------------------------------------------- the source on a device of its own

@dataclass(frozen=True)
class SourceStick:
    root: Path
    device: str | None  # "loop7": /sys/block/loop7/stat counts what was read from it

    def sectors_read(self) -> int | None:
        if self.device is None:
            return None
        return int(Path(f"/sys/block/{self.device}/stat").read_text().split()[2])


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout.strip()


@contextlib.contextmanager
def source_stick(stick: Path, work: Path) -> Iterator[SourceStick]:
    """The stick copied onto an ext4 image behind a loop device (root), else the stick where it is."""
    if os.geteuid() != 0 or shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        say("clone: not root, so the source's device counters are not read (the kit's own count still is)")
        yield SourceStick(stick, None)
        return
    image, mount = work / "source.img", work / "source"
    mount.mkdir(parents=True, exist_ok=True)
    size = sum(p.stat().st_size for p in stick.rglob("*") if p.is_file())
    with open(image, "wb") as fh:
        fh.truncate(int(size * 1.3) + (64 << 20))
    sh("mkfs.ext4", "-q", "-F", str(image))
    device = sh("losetup", "-f", "--show", str(image))
    try:
        sh("mount", device, str(mount))
        try:
            sh("cp", "-a", str(stick), str(mount / "stick"))
            shutil.rmtree(mount / "stick" / "KIT" / "state", ignore_errors=True)
            yield SourceStick(mount / "stick", Path(device).name)
        finally:
            subprocess.run(["umount", str(mount)], check=False, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def read_limit(device: str | None, bps: int) -> Iterator[Join | None]:
    """A cgroup whose processes read `device` at most `bps` bytes a second; yields what a child runs
    to join it, or None when none can be made (not root, no loop device, no blkio/io controller)."""
    if device is None:
        yield None
        return
    rdev = os.stat(f"/dev/{device}").st_rdev
    numbers = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        if (CGROUP_V1 / "blkio.throttle.read_bps_device").exists():
            group = CGROUP_V1 / "kit-bench-clone"
            group.mkdir(exist_ok=True)
            (group / "blkio.throttle.read_bps_device").write_text(f"{numbers} {bps}\n")
        elif "io" in (CGROUP_V2 / "cgroup.controllers").read_text().split():
            (CGROUP_V2 / "cgroup.subtree_control").write_text("+io\n")
            group = CGROUP_V2 / "kit-bench-clone"
            group.mkdir(exist_ok=True)
            (group / "io.max").write_text(f"{numbers} rbps={bps}\n")
        else:
            raise OSError("no blkio or io cgroup controller")
    except OSError as exc:
        say(f"clone: no read limit for the USB-speed runs ({exc})")
        yield None
        return
    try:
        yield lambda: (group / "cgroup.procs").write_text(f"{os.getpid()}\n")
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def cold(folder: Path) -> str:
    """Empty the page cache (root), else ask the kernel to drop this folder's files: reads are real."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in folder.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise"


# ---------------------------------------------------------------- the three runs

def fresh(targets: list[Path]) -> None:
    for t in targets:
        shutil.rmtree(t, ignore_errors=True)
    os.sync()  # the deletions' writeback is not the next run's


def kit_clone(src: SourceStick, targets: list[Path], methods: set[str], join: Join = None) -> Run:
    fresh(targets)
    methods.add(cold(src.root))
    before = src.sectors_read()
    start = time.perf_counter()
    proc = subprocess.run([*KIT, "clone", str(src.root), *map(str, targets), "--json"], capture_output=True,
                          text=True, env=child_env(), cwd=ROOT, stdin=subprocess.DEVNULL, timeout=1800,
                          preexec_fn=join)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"kit clone failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-2:]}")
    report = json.loads(proc.stdout)
    return Run(seconds, _device_bytes(src, before), report["checked_bytes"] + report["copy_read_bytes"],
               report["written_bytes"])


def cp_a(src: SourceStick, target: Path, methods: set[str], *, sync: bool, join: Join = None) -> Run:
    """`cp -a` alone leaves the bytes in memory; with `sync`, the clock runs until they are on the disk."""
    fresh([target])
    methods.add(cold(src.root))
    before = src.sectors_read()
    start = time.perf_counter()
    subprocess.run(["cp", "-a", str(src.root), str(target)], check=True, stdin=subprocess.DEVNULL, preexec_fn=join)
    if sync:
        os.sync()
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in (target / "KIT").rglob("*") if p.is_file())
    return Run(seconds, _device_bytes(src, before), None, written)


def _device_bytes(src: SourceStick, before: int | None) -> int | None:
    after = src.sectors_read()
    return None if before is None or after is None else (after - before) * 512


# ---------------------------------------------------------------- the section

def stick_bytes(root: Path) -> int:
    return sum(f["size"] for f in json.loads((root / "KIT" / "bundle.json").read_bytes())["files"])


RUNS = ["kit clone → 1 target", f"kit clone → {TARGETS} targets", "cp -a → 1 target (in memory)",
        "cp -a + sync → 1 target"]


def run(ctx: Context) -> Section:
    work = ensure_cache() / "clone"
    work.mkdir(parents=True, exist_ok=True)
    rounds = max(2, ctx.sizes.verify_rounds)
    methods: set[str] = set()
    one, three, copy = [work / "one"], [work / f"three-{i}" for i in range(TARGETS)], work / "cp"
    with source_stick(ctx.stick, work) as src, read_limit(src.device, USB_READ) as usb:
        size = stick_bytes(src.root)
        speeds = {"disk": None} | ({"USB": usb} if usb else {})
        say(f"clone: {rounds} rounds of kit clone to 1 and {TARGETS} targets, cp -a, cp -a + sync, source at "
            f"{' and '.join(speeds)} speed ({size / MiB:.0f} MiB, source device: {src.device or 'not its own'})")
        runs = []
        for join in speeds.values():
            runs += [lambda j=join: kit_clone(src, one, methods, j), lambda j=join: kit_clone(src, three, methods, j),
                     lambda j=join: cp_a(src, copy, methods, sync=False, join=j),
                     lambda j=join: cp_a(src, copy, methods, sync=True, join=j)]
        results = interleave(rounds, *runs)
        files = sum(1 for _ in (src.root / "KIT").rglob("*"))
    fresh([*one, *three, copy])
    out = Section("6. Clone: one read of the source, N writes",
                  ["source read at", "run", "seconds (median)", "range", "MiB/s written",
                   "read from source by the program, MiB", "read from the source device, MiB", "written, MiB"])
    for i, speed in enumerate(speeds):
        add_speed(out, speed, results[4 * i:4 * i + 4], size)
    out.notes += [
        f"the demo stick with its frozen runtime: {size / MiB:.0f} MiB in {files} files and folders; {rounds} "
        f"interleaved rounds; caches emptied before every run by {', '.join(sorted(methods))}",
        f"source: {'an ext4 image on ' + src.device + ' (loop)' if src.device else 'the stick in place'}; "
        f"USB speed: its reads capped at {USB_READ / MiB:.0f} MiB/s by a cgroup; targets: folders on the bench "
        f"cache's disk ({ensure_cache()}), not capped",
        "kit clone = check the whole source, copy (one read, every target written, fsync per file), re-read "
        "and verify each copy from its medium; cp -a = one read, one write, no check",
        f"{TARGETS} × (cp -a + sync) is three separate copies, each from a cold source: what a stick bigger "
        "than the memory costs; the kit's own copy pass also reads from memory here (the check pass left "
        "the demo stick cached), so on such a stick it reads the source twice, still not once per target",
    ]
    out.data = {"stick_bytes": size, "runs": {f"{speed}: {name}": [vars(r) for r in samples]
                                              for i, speed in enumerate(speeds)
                                              for name, samples in zip(RUNS, results[4 * i:4 * i + 4], strict=True)}}
    return out


def add_speed(out: Section, speed: str, runs: list[list[Run]], size: int) -> None:
    """The four runs from one source speed: their rows and time ratios (and, from the first speed,
    the byte counts, which do not depend on it)."""
    for name, samples in zip(RUNS, runs, strict=True):
        seconds = [r.seconds for r in samples]
        delivered = [r.device_read for r in samples if r.device_read is not None]
        kit_read = [r.kit_read for r in samples if r.kit_read is not None]
        written = samples[0].written
        out.rows.append([speed, name, fmt(median(seconds), 2), spread(seconds, 2),
                         fmt(written / median(seconds) / MiB, 0), fmt(median(kit_read) / MiB, 1) if kit_read else "-",
                         fmt(median(delivered) / MiB, 1) if delivered else "n/a", fmt(written / MiB, 1)])
    clone1, clone3, _, cp_sync = runs
    t1, t3, tsync = ([r.seconds for r in s] for s in (clone1, clone3, cp_sync))
    out.ratios += compare(f"clone at {speed} speed: {TARGETS} targets / 1 target, time", t3, t1, TARGETS, times=True)
    out.ratios += compare(f"clone at {speed} speed: kit clone / cp -a + sync, 1 target, time", t1, tsync, 3.0,
                          times=True)
    if speed == "USB":  # what one read for N writes is for: a slow source
        out.ratios += compare(f"clone at USB speed: kit clone to {TARGETS} / {TARGETS} × (cp -a + sync), time", t3,
                              [TARGETS * s for s in tsync], 1.0, times=True)
    if speed != "disk":
        return
    kit3 = median([r.kit_read for r in clone3])
    out.ratios.append(Ratio(f"clone: bytes the kit read from the source for {TARGETS} targets / one stick",
                            kit3 / size, 2.0, at_most=True, note="the check pass, then one copy pass"))
    device3 = [r.device_read for r in clone3 if r.device_read is not None]
    out.ratios.append(Ratio(f"clone: bytes the source device delivered for {TARGETS} targets / one stick",
                            median(device3) / size if device3 else None, 1.05, at_most=True,
                            note="cold cache each round" if device3 else "needs root (a loop device)"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two rounds")
    parser.add_argument("--stick", type=Path, help="a stick to clone (default: build the bench stick)")
    args = parser.parse_args()
    ctx = Context(QUICK if args.quick else Sizes(), stick=args.stick)
    load = os.getloadavg()
    print(run(ctx).render())
    print(f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
