"""What this host has: OS, CPU, cores, memory, GPUs. Plain data; detect() never raises.

Part of the pure core: no llama_cpp, no textual.

Everything is read through three seams, so a recorded host (tests/fixtures/hosts/) can stand in
for this one: files under `root`, commands through `run`, and the few in-process calls that
neither can replace (psutil, RLIMIT_AS, NVML, Windows APIs) through `LiveApis`.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 1024**3
MIB = 1024**2
COMMAND_TIMEOUT_S = 2.0
# cgroup v1 spells "no limit" as 2^63 rounded down to a page; anything this big is not a limit.
UNLIMITED = 1 << 60


@dataclass(frozen=True)
class Gpu:
    vendor: str  # "nvidia" | "amd" | "apple" | "intel" | "other"
    name: str
    backend: str  # what llama.cpp would drive it with: "cuda" | "rocm" | "metal" | "vulkan"
    vram_total: int | None = None  # bytes; for unified memory, the share the GPU may use
    vram_free: int | None = None  # bytes, when the driver says
    unified_memory: bool = False  # Apple Silicon, most iGPUs: VRAM is the same RAM
    driver: str | None = None
    compute_capability: str | None = None  # NVIDIA only, e.g. "8.6"


@dataclass(frozen=True)
class Host:
    os: str  # "linux" | "macos" | "windows" | other platform.system().lower()
    arch: str  # "x86_64" | "arm64" | ...
    cpu_name: str = "unknown CPU"
    # lowercase, in /proc/cpuinfo spelling (avx2, avx512f, asimddp, ...)
    cpu_flags: frozenset[str] = frozenset()
    physical_cores: int = 1
    logical_cores: int = 1
    ram_total: int = 0  # bytes, already capped by a container/cgroup limit
    ram_available: int = 0  # bytes, already capped by what the cgroup still allows
    memory_limit: int | None = None  # the cgroup/job limit when one applies, else None
    gpus: tuple[Gpu, ...] = ()
    notes: tuple[str, ...] = field(default=())  # what could not be read, in words

    @property
    def platform(self) -> str:
        """The runtime folder name on a stick: linux-x86_64, macos-arm64, ..."""
        return f"{self.os}-{self.arch}"

    def cpu_signature(self) -> str:
        """Stable key for caching per-CPU verdicts (kernel probe)."""
        import hashlib

        text = "|".join([self.os, self.arch, self.cpu_name, ",".join(sorted(self.cpu_flags))])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["cpu_flags"] = sorted(self.cpu_flags)
        data["gpus"] = [asdict(g) for g in self.gpus]
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Host:
        data = dict(data)
        data["cpu_flags"] = frozenset(data.get("cpu_flags", ()))
        data["gpus"] = tuple(Gpu(**g) for g in data.get("gpus", ()))
        data["notes"] = tuple(data.get("notes", ()))
        return cls(**data)


# --- seams ------------------------------------------------------------------------------------

Run = Callable[[Sequence[str]], "str | None"]


def default_run(argv: Sequence[str]) -> str | None:
    """stdout of a command that exits 0 within the timeout; None for anything else."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console flash
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def psutil_memory() -> tuple[int, int]:
    """(total, available) bytes from psutil."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def psutil_cpu_counts() -> tuple[int | None, int | None]:
    """(physical, logical) cores; psutil may not know the physical count."""
    try:
        import psutil

        return psutil.cpu_count(logical=False), psutil.cpu_count(logical=True)
    except Exception:  # psutil missing or broken: os still knows the logical count
        return None, os.cpu_count()


def rlimit_address_space() -> int | None:
    """The soft RLIMIT_AS in bytes, None when unlimited or not a POSIX host."""
    try:
        import resource
    except ImportError:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


class _NvmlMemory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


def _load_nvml():
    names = ["libnvidia-ml.so.1"]
    if os.name == "nt":
        system32 = Path(os.environ.get("SystemRoot", r"C:\Windows")) / "System32"
        nvsmi = Path(os.environ.get("ProgramFiles", r"C:\Program Files")) / "NVIDIA Corporation"
        names = [str(system32 / "nvml.dll"), str(nvsmi / "NVSMI" / "nvml.dll")]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def nvml_gpus(load: Callable[[], object] = _load_nvml) -> list[Gpu] | None:
    """NVIDIA GPUs through NVML (the driver's own library), None when NVML is not there."""
    lib = load()
    if lib is None or lib.nvmlInit_v2() != 0:
        return None
    try:
        driver = _nvml_text(lib.nvmlSystemGetDriverVersion)
        count = ctypes.c_uint(0)
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        return [gpu for i in range(count.value) if (gpu := _nvml_gpu(lib, i, driver))]
    finally:
        lib.nvmlShutdown()


def _nvml_gpu(lib, index: int, driver: str | None) -> Gpu | None:
    handle = ctypes.c_void_p()
    if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
        return None
    name = _nvml_text(lambda buf, size: lib.nvmlDeviceGetName(handle, buf, size))
    memory = _NvmlMemory()
    has_memory = lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    has_cc = lib.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) == 0
    return Gpu(
        vendor="nvidia",
        name=name or f"NVIDIA GPU {index}",
        backend="cuda",
        vram_total=int(memory.total) if has_memory else None,
        vram_free=int(memory.free) if has_memory else None,
        driver=driver,
        compute_capability=f"{major.value}.{minor.value}" if has_cc else None,
    )


def _nvml_text(call) -> str | None:
    buf = ctypes.create_string_buffer(96)
    if call(buf, ctypes.c_uint(len(buf))) != 0:
        return None
    return buf.value.decode(errors="replace").strip() or None


# IsProcessorFeaturePresent codes (winnt.h) -> /proc/cpuinfo spelling.
_WINDOWS_FEATURES = {
    3: ("mmx",),
    6: ("sse",),
    10: ("sse2",),
    13: ("pni",),
    14: ("cx16",),
    19: ("asimd",),
    28: ("rdrand",),
    30: ("aes", "pmull", "sha1", "sha2"),
    31: ("crc32",),
    32: ("rdtscp",),
    34: ("atomics",),
    36: ("ssse3",),
    37: ("sse4_1",),
    38: ("sse4_2",),
    39: ("avx",),
    40: ("avx2",),
    41: ("avx512f",),
    42: ("erms",),
    43: ("asimddp",),
    44: ("jscvt",),
    45: ("lrcpc",),
}


def windows_cpu() -> tuple[str | None, frozenset[str]]:
    """CPU name from the registry and features from IsProcessorFeaturePresent."""
    name = None
    try:
        import winreg

        key_path = r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key_path) as key:
            name = str(winreg.QueryValueEx(key, "ProcessorNameString")[0])
    except (ImportError, OSError):
        name = platform.processor() or None
    present = ctypes.windll.kernel32.IsProcessorFeaturePresent  # type: ignore[attr-defined]
    flags = {flag for code, names in _WINDOWS_FEATURES.items() if present(code) for flag in names}
    if "avx2" in flags:
        flags |= {"fma", "f16c"}  # Windows cannot be asked; every AVX2 CPU has both
    return name, frozenset(flags)


@dataclass(frozen=True)
class LiveApis:
    """In-process sources that a file root or a command cannot stand in for; tests swap them.

    Each may raise: detect() turns a failure into a note.
    """

    memory: Callable[[], tuple[int, int]] = psutil_memory
    cpu_counts: Callable[[], tuple[int | None, int | None]] = psutil_cpu_counts
    address_space_limit: Callable[[], int | None] = rlimit_address_space
    nvidia_gpus: Callable[[], list[Gpu] | None] = nvml_gpus
    windows_cpu: Callable[[], tuple[str | None, frozenset[str]]] = windows_cpu


# --- detect -----------------------------------------------------------------------------------


def detect(
    root: str | os.PathLike = "/",
    run: Run = default_run,
    system: str | None = None,
    machine: str | None = None,
    live: LiveApis | None = None,
) -> Host:
    """Describe this host. Never raises: what cannot be read is said in `notes`.

    root: where / is (a recorded host's fake tree in tests); run: runs a command, gives its
    stdout or None; system/machine: platform.system()/machine() of the host described;
    live: the in-process sources (psutil, RLIMIT_AS, NVML, Windows APIs).
    """
    notes: list[str] = []
    os_name = normalise_os(system if system is not None else platform.system())
    arch = normalise_arch(machine if machine is not None else platform.machine())
    ctx = _Context(_Files(Path(root), notes), _Commands(run), live or LiveApis(), notes)

    cpu = _guarded(notes, "the CPU", lambda: _read_cpu(os_name, ctx), _Cpu())
    memory = _guarded(notes, "the memory", lambda: _read_memory(os_name, ctx), _Memory())
    gpus = _guarded(notes, "the GPUs", lambda: _read_gpus(os_name, arch, memory, ctx), [])
    if os_name == "macos" and arch == "x86_64" and ctx.sysctl("hw").get("hw.optional.arm64") == "1":
        notes.append("This is an Apple Silicon Mac running x86_64 code under Rosetta 2.")
    return Host(
        os=os_name,
        arch=arch,
        cpu_name=cpu.name,
        cpu_flags=cpu.flags,
        physical_cores=cpu.physical,
        logical_cores=cpu.logical,
        ram_total=memory.total,
        ram_available=memory.available,
        memory_limit=memory.limit,
        gpus=tuple(gpus),
        notes=tuple(dict.fromkeys(notes)),  # one sentence once, in order
    )


def normalise_os(system: str) -> str:
    name = (system or "").strip().lower()
    return {"darwin": "macos", "macos": "macos", "win32": "windows"}.get(name, name or "unknown")


_ARCH_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "em64t": "x86_64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "arm64e": "arm64",
    "armv8": "arm64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "x86": "x86",
}


def normalise_arch(machine: str) -> str:
    name = (machine or "").strip().lower()
    return _ARCH_ALIASES.get(name, name or "unknown")


# --- plumbing ---------------------------------------------------------------------------------


@dataclass
class _Cpu:
    name: str = "unknown CPU"
    flags: frozenset[str] = frozenset()
    physical: int = 1
    logical: int = 1


@dataclass
class _Memory:
    total: int = 0
    available: int = 0
    limit: int | None = None
    physical_total: int = 0  # before any limit: what an Apple GPU shares


@dataclass
class _Context:
    files: _Files
    commands: _Commands
    live: LiveApis
    notes: list[str]

    def sysctl(self, subtree: str) -> dict[str, str]:
        """`sysctl <subtree>` as {name: value}; {} when it cannot be run."""
        return _parse_sysctl(self.commands.output("sysctl", subtree) or "")


class _Files:
    """Files under a root. Absent is None; unreadable is None plus a note."""

    def __init__(self, root: Path, notes: list[str]):
        self.root = root
        self.notes = notes

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, rel: str) -> str | None:
        try:
            return self.path(rel).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.notes.append(f"Could not read /{rel.lstrip('/')} ({_describe(exc)}).")
            return None

    def read_int(self, rel: str) -> int | None:
        """An integer file (sysfs, cgroup); garbage is None plus a note."""
        text = self.read(rel)
        if text is None:
            return None
        try:
            return _number(text)
        except ValueError:
            self.notes.append(f"Ignored /{rel.lstrip('/')}: {_clip(text)!r} is not a number.")
            return None

    def children(self, rel: str) -> list[str]:
        try:
            return sorted(p.name for p in self.path(rel).iterdir())
        except OSError:
            return []

    def is_dir(self, rel: str) -> bool:
        try:
            return self.path(rel).is_dir()
        except OSError:
            return False


class _Commands:
    """Runs commands through `run`, once each, never raising."""

    def __init__(self, run: Run):
        self._run = run
        self._seen: dict[tuple[str, ...], str | None] = {}

    def output(self, *argv: str) -> str | None:
        if argv not in self._seen:
            try:
                out = self._run(list(argv))
            except Exception:  # a command runner is outside code; its failure is "no answer"
                out = None
            self._seen[argv] = out if isinstance(out, str) else None
        return self._seen[argv]


def _guarded(notes: list[str], what: str, read, default):
    try:
        return read()
    except Exception as exc:  # detection must never stop the kit: say it and go on
        notes.append(f"Could not read {what} ({_describe(exc)}).")
        return default


def _describe(exc: BaseException) -> str:
    # strerror, not str(exc): the message must not carry the path of a test's fake root
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _number(text: str) -> int:
    text = text.strip().lower()
    return int(text, 16) if text.startswith("0x") else int(text)


def _clip(text: str, size: int = 40) -> str:
    text = text.strip()
    return text if len(text) <= size else text[:size] + "..."


def _positive(value) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


# --- CPU --------------------------------------------------------------------------------------


def _read_cpu(os_name: str, ctx: _Context) -> _Cpu:
    if os_name == "linux":
        cpu = _linux_cpu(ctx)
    elif os_name == "macos":
        cpu = _macos_cpu(ctx)
    elif os_name == "windows":
        cpu = _windows_cpu(ctx)
    else:
        ctx.notes.append(f"CPU model and features are not read on {os_name}.")
        cpu = _Cpu()
    return _fill_counts(cpu, ctx)


def _fill_counts(cpu: _Cpu, ctx: _Context) -> _Cpu:
    """Cores the OS-specific reader could not find come from psutil, then from each other."""
    physical, logical = cpu.physical or None, cpu.logical or None
    if physical is None or logical is None:
        try:
            live_physical, live_logical = ctx.live.cpu_counts()
        except Exception as exc:
            ctx.notes.append(f"Could not count CPU cores ({_describe(exc)}).")
            live_physical = live_logical = None
        physical = physical or _positive(live_physical)
        logical = logical or _positive(live_logical)
    if logical is None and physical is None:
        ctx.notes.append("CPU core count unknown; assuming 1.")
    elif physical is None:
        ctx.notes.append("Physical core count unknown; assuming one thread per core.")
    logical = logical or physical or 1
    physical = min(physical or logical, logical)
    return _Cpu(cpu.name, cpu.flags, physical, logical)


def _linux_cpu(ctx: _Context) -> _Cpu:
    text = ctx.files.read("proc/cpuinfo")
    blocks = _cpuinfo_blocks(text or "")
    processors = [b for b in blocks if "processor" in b]
    if not processors:
        why = "could not be read" if text is None else "lists no processor"
        ctx.notes.append(f"CPU model and features unknown: /proc/cpuinfo {why}.")
        return _Cpu(physical=0, logical=0)
    flag_sets = [set(b.get("flags", b.get("features", "")).lower().split()) for b in processors]
    # the intersection: a thread may run on any core, so only what all of them have is safe
    flags = frozenset(set.intersection(*flag_sets)) if flag_sets else frozenset()
    physical = _cores_from_cpuinfo(processors) or _cores_from_sysfs(ctx.files)
    return _Cpu(_linux_cpu_name(blocks, processors), flags, physical or 0, len(processors))


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    blocks, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def _cores_from_cpuinfo(processors: list[dict[str, str]]) -> int | None:
    pairs = {(b.get("physical id"), b.get("core id")) for b in processors}
    if any(None in pair for pair in pairs):
        return None
    return len(pairs)


def _cores_from_sysfs(files: _Files) -> int | None:
    base = "sys/devices/system/cpu"
    pairs = set()
    for name in files.children(base):
        if re.fullmatch(r"cpu\d+", name):
            package = files.read(f"{base}/{name}/topology/physical_package_id")
            core = files.read(f"{base}/{name}/topology/core_id")
            if package is None or core is None:
                return None
            pairs.add((package.strip(), core.strip()))
    return len(pairs) or None


# Arm "CPU implementer" / "CPU part" codes: arm64 /proc/cpuinfo has no model name.
_ARM_IMPLEMENTERS = {
    "0x41": "ARM",
    "0x42": "Broadcom",
    "0x43": "Cavium",
    "0x48": "HiSilicon",
    "0x4e": "NVIDIA",
    "0x51": "Qualcomm",
    "0x61": "Apple",
    "0xc0": "Ampere",
}
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4d": "Cortex-A715",
    "0xd4e": "Cortex-X3",
    "0xd4f": "Neoverse-V2",
}


def _linux_cpu_name(blocks: list[dict[str, str]], processors: list[dict[str, str]]) -> str:
    for block in processors:
        if block.get("model name"):
            return " ".join(block["model name"].split())
    cores = []
    for block in processors:
        implementer = block.get("cpu implementer", "").lower()
        part = block.get("cpu part", "").lower()
        if implementer or part:
            vendor = _ARM_IMPLEMENTERS.get(implementer, f"implementer {implementer}")
            core = (
                f"{vendor} {_ARM_PARTS.get(part, f'part {part}')}" if vendor == "ARM" else (f"{vendor} CPU part {part}")
            )
            if core not in cores:
                cores.append(core)
    # the board line (Raspberry Pi "Model", old kernels "Hardware") sits in its own block
    board = next(
        (
            b.get("model") or b.get("hardware")
            for b in blocks
            if "processor" not in b and (b.get("model") or b.get("hardware"))
        ),
        None,
    )
    name = " + ".join(cores) or "unknown CPU"
    return f"{name} ({board})" if board else name


def _parse_sysctl(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


# machdep.cpu.* feature words (x86 Macs) whose /proc/cpuinfo spelling differs.
_MAC_X86_NAMES = {
    "sse3": "pni",
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "avx1.0": "avx",
    "clfsh": "clflush",
    "htt": "ht",
    "rdwrfsgs": "fsgsbase",
    "clfsopt": "clflushopt",
    "sha": "sha_ni",
    "lahf": "lahf_lm",
    "lzcnt": "abm",
    "prefetchw": "3dnowprefetch",
    "xd": "nx",
    "em64t": "lm",
    "1gbpage": "pdpe1gb",
    "avx512vnni": "avx512_vnni",
    "avx512vbmi2": "avx512_vbmi2",
    "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512bf16": "avx512_bf16",
}
# hw.optional.* keys (Apple Silicon, and a few on x86 Macs) -> /proc/cpuinfo spelling.
_MAC_OPTIONAL_NAMES = {
    "floatingpoint": ("fp",),
    "neon": ("asimd",),
    "advsimd": ("asimd",),
    "neon_fp16": ("fphp", "asimdhp"),
    "arm.feat_fp16": ("fphp", "asimdhp"),
    "arm.feat_dotprod": ("asimddp",),
    "arm.feat_i8mm": ("i8mm",),
    "arm.feat_bf16": ("bf16",),
    "arm.feat_fhm": ("asimdfhm",),
    "armv8_2_fhm": ("asimdfhm",),
    "arm.feat_rdm": ("asimdrdm",),
    "arm.feat_lse": ("atomics",),
    "armv8_1_atomics": ("atomics",),
    "armv8_crc32": ("crc32",),
    "arm.feat_aes": ("aes",),
    "arm.feat_pmull": ("pmull",),
    "arm.feat_sha1": ("sha1",),
    "arm.feat_sha256": ("sha2",),
    "arm.feat_sha512": ("sha512",),
    "arm.feat_sha3": ("sha3",),
    "arm.feat_lrcpc": ("lrcpc",),
    "arm.feat_lrcpc2": ("ilrcpc",),
    "arm.feat_jscvt": ("jscvt",),
    "arm.feat_fcma": ("fcma",),
    "arm.feat_dpb": ("dcpop",),
    "arm.feat_dpb2": ("dcpodp",),
    "arm.feat_frintts": ("frint",),
    "arm.feat_flagm": ("flagm",),
    "arm.feat_flagm2": ("flagm2",),
    "arm.feat_sb": ("sb",),
    "arm.feat_ssbs": ("ssbs",),
    "arm.feat_bti": ("bti",),
    "arm.feat_dit": ("dit",),
    "arm.feat_sve": ("sve",),
    "arm.feat_sve2": ("sve2",),
    "arm.feat_sme": ("sme",),
    "avx1_0": ("avx",),
    "avx2_0": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "bmi1": ("bmi1",),
    "bmi2": ("bmi2",),
}


def _macos_cpu(ctx: _Context) -> _Cpu:
    cpu, hw = ctx.sysctl("machdep.cpu"), ctx.sysctl("hw")
    if not cpu and not hw:
        ctx.notes.append("CPU model and features unknown: sysctl gave no answer.")
    flags: set[str] = set()
    for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.extfeatures"):
        for word in cpu.get(key, "").lower().split():
            flags.add(_MAC_X86_NAMES.get(word, word))
    for key, value in hw.items():
        option = key.lower().removeprefix("hw.optional.")
        if key.lower().startswith("hw.optional.") and value == "1":
            if option.startswith("avx512"):  # hw.optional.avx512f etc.: same word on Linux
                flags.add(option)
            flags.update(_MAC_OPTIONAL_NAMES.get(option, ()))
    return _Cpu(
        name=" ".join(cpu.get("machdep.cpu.brand_string", "").split()) or "unknown CPU",
        flags=frozenset(flags),
        physical=_positive(hw.get("hw.physicalcpu")) or 0,
        logical=_positive(hw.get("hw.logicalcpu")) or 0,
    )


def _windows_cpu(ctx: _Context) -> _Cpu:
    try:
        name, flags = ctx.live.windows_cpu()
    except Exception as exc:
        ctx.notes.append(f"CPU model and features unknown ({_describe(exc)}).")
        name, flags = None, frozenset()
    return _Cpu(name=(name or "").strip() or "unknown CPU", flags=frozenset(flags), physical=0, logical=0)


# --- memory -----------------------------------------------------------------------------------


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


# --- GPUs -------------------------------------------------------------------------------------


@dataclass
class _Found:
    gpu: Gpu
    pci_device: int | None = None
    generic_name: bool = False  # a name made from PCI ids: Vulkan may know a better one


VENDOR_IDS = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel", 0x106B: "apple"}


def _read_gpus(os_name: str, arch: str, memory: _Memory, ctx: _Context) -> list[Gpu]:
    if os_name == "macos":
        return [_apple_gpu(ctx, memory.physical_total)] if arch == "arm64" else []
    found = _nvidia(ctx)
    found += _amd_rocm(ctx) or (_drm_cards(ctx.files, 0x1002) if os_name == "linux" else [])
    if os_name == "linux":
        found += _drm_cards(ctx.files, 0x8086)
    found = _merge_vulkan(found, _vulkan_devices(ctx.commands.output("vulkaninfo", "--summary")))
    return [f.gpu for f in found]


def _apple_gpu(ctx: _Context, ram: int) -> Gpu:
    brand = ctx.sysctl("machdep.cpu").get("machdep.cpu.brand_string", "").strip()
    # Metal's recommendedMaxWorkingSetSize heuristic: about 2/3 of RAM up to 36 GiB, 3/4 above
    share = ram * 2 // 3 if ram <= 36 * GIB else ram * 3 // 4
    return Gpu(
        vendor="apple",
        name=f"{brand} GPU" if brand else "Apple GPU",
        backend="metal",
        vram_total=share or None,
        unified_memory=True,
    )


_NVIDIA_SMI_FIELDS = "name,memory.total,memory.free,driver_version"


def _nvidia(ctx: _Context) -> list[_Found]:
    try:
        gpus = ctx.live.nvidia_gpus()
    except Exception as exc:
        ctx.notes.append(f"NVML failed ({_describe(exc)}); asking nvidia-smi.")
        gpus = None
    if gpus is not None:
        return [_Found(g) for g in gpus]
    text = ctx.commands.output(
        "nvidia-smi",
        f"--query-gpu={_NVIDIA_SMI_FIELDS},compute_cap",
        "--format=csv,noheader,nounits",
    )
    if text is None:  # drivers before 510 do not know compute_cap
        text = ctx.commands.output("nvidia-smi", f"--query-gpu={_NVIDIA_SMI_FIELDS}", "--format=csv,noheader,nounits")
    return [_Found(g) for g in parse_nvidia_smi(text or "")]


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version[,compute_cap]
    --format=csv,noheader,nounits` (MiB)."""
    gpus = []
    for row in csv.reader(text.splitlines(), skipinitialspace=True):
        if len(row) < 4 or not row[0].strip():
            continue
        cells = [None if c.strip().startswith("[") else c.strip() for c in row]  # [N/A]
        total, free = _positive(cells[1]), _positive(cells[2])
        gpus.append(
            Gpu(
                vendor="nvidia",
                name=cells[0] or "NVIDIA GPU",
                backend="cuda",
                vram_total=total * MIB if total else None,
                vram_free=free * MIB if free else None,
                driver=cells[3],
                compute_capability=cells[4] if len(cells) > 4 else None,
            )
        )
    return gpus


def _amd_rocm(ctx: _Context) -> list[_Found]:
    text = ctx.commands.output("rocm-smi", "--showmeminfo", "vram", "--showproductname", "--json")
    return [_Found(g) for g in parse_rocm_smi(text or "")]


def parse_rocm_smi(text: str) -> list[Gpu]:
    """`rocm-smi --showmeminfo vram --showproductname --json`; key spelling varies by version."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return []
    try:
        cards = json.loads(text[start : end + 1])
    except ValueError:
        return []
    gpus = []
    for card, info in sorted(cards.items()):
        if not card.lower().startswith("card") or not isinstance(info, dict):
            continue
        fields = {k.lower(): str(v).strip() for k, v in info.items()}
        total = _positive(fields.get("vram total memory (b)"))
        used = _positive(fields.get("vram total used memory (b)")) or 0
        name = fields.get("card series") or fields.get("device name") or fields.get("card model")
        gpus.append(
            Gpu(
                vendor="amd",
                name=name or f"AMD GPU {card}",
                backend="rocm",
                vram_total=total,
                vram_free=total - used if total else None,
            )
        )
    return gpus


def _drm_cards(files: _Files, vendor_id: int) -> list[_Found]:
    """PCI GPUs of one vendor from /sys/class/drm/cardN/device (AMD: VRAM; Intel: iGPU)."""
    found = []
    cards = [c for c in files.children("sys/class/drm") if re.fullmatch(r"card\d+", c)]
    for card in sorted(cards, key=lambda c: int(c[4:])):
        device = f"sys/class/drm/{card}/device"
        vendor = (files.read(f"{device}/vendor") or "").strip().lower()
        if not vendor or _hex(vendor) != vendor_id:
            continue
        pci_device = _hex((files.read(f"{device}/device") or "").strip())
        found.append(_drm_gpu(files, device, vendor_id, pci_device))
    return found


def _drm_gpu(files: _Files, device: str, vendor_id: int, pci_device: int | None) -> _Found:
    vendor = VENDOR_IDS[vendor_id]
    product = (files.read(f"{device}/product_name") or "").strip()
    generic = f"{'AMD' if vendor == 'amd' else 'Intel'} GPU"
    if pci_device is not None:
        generic += f" {pci_device:#06x}"
    name = product or generic
    if vendor == "intel":
        gpu = Gpu("intel", name, "vulkan", unified_memory=True)
    else:
        total = files.read_int(f"{device}/mem_info_vram_total")
        used = files.read_int(f"{device}/mem_info_vram_used")
        free = total - used if total and used is not None else None
        gpu = Gpu("amd", name, "vulkan", vram_total=total or None, vram_free=free)
    return _Found(gpu, pci_device, generic_name=not product)


def _hex(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None


def _vulkan_devices(text: str | None) -> list[dict[str, str]]:
    """The GPUn: sections of `vulkaninfo --summary` as {key: value}."""
    devices: list[dict[str, str]] = []
    in_devices = False
    for line in (text or "").splitlines():
        stripped = line.strip()
        if stripped.startswith("Devices:"):
            in_devices = True
        elif in_devices and re.fullmatch(r"GPU\d+:", stripped):
            devices.append({})
        elif devices and "=" in stripped:
            key, _, value = stripped.partition("=")
            devices[-1][key.strip()] = value.strip()
    return devices


def _merge_vulkan(found: list[_Found], devices: list[dict[str, str]]) -> list[_Found]:
    """Add the Vulkan GPUs no vendor tool saw; a Vulkan name replaces a PCI-id one."""
    merged, claimed, seen_uuids = list(found), set(), set()
    for device in devices:
        uuid = device.get("deviceUUID")
        if device.get("deviceType", "").endswith("_CPU") or (uuid and uuid in seen_uuids):
            continue  # llvmpipe renders on the CPU; a second driver for one GPU shares its UUID
        seen_uuids.add(uuid)
        vulkan = _vulkan_gpu(device)
        index = _same_gpu(merged, claimed, vulkan)
        if index is None:
            merged.append(vulkan)
            index = len(merged) - 1
        elif merged[index].generic_name:
            merged[index] = _Found(_renamed(merged[index].gpu, vulkan.gpu.name), vulkan.pci_device)
        claimed.add(index)
    return merged


def _vulkan_gpu(device: dict[str, str]) -> _Found:
    gpu = Gpu(
        vendor=VENDOR_IDS.get(_hex(device.get("vendorID", "")) or -1, "other"),
        name=device.get("deviceName", "").strip() or "Vulkan GPU",
        backend="vulkan",
        unified_memory=device.get("deviceType", "").endswith("INTEGRATED_GPU"),
        driver=device.get("driverInfo") or device.get("driverName"),
    )
    return _Found(gpu, _hex(device.get("deviceID", "")))


def _same_gpu(merged: list[_Found], claimed: set[int], vulkan: _Found) -> int | None:
    """The GPU a vendor tool already found that this Vulkan device is, if any."""
    for index, known in enumerate(merged):
        if index in claimed or known.gpu.vendor != vulkan.gpu.vendor:
            continue
        if None in (known.pci_device, vulkan.pci_device) or known.pci_device == vulkan.pci_device:
            return index
    return None


def _renamed(gpu: Gpu, name: str) -> Gpu:
    return Gpu(**{**asdict(gpu), "name": name})
