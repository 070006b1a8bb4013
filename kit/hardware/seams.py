"""The three seams every reader goes through, so a recorded host can stand in for this one.

- commands through `run` (default_run, _Commands): sysctl, nvidia-smi, rocm-smi, vulkaninfo
- in-process calls that neither a file nor a command can replace (LiveApis): psutil, RLIMIT_AS,
  NVML and the Windows APIs; the only ctypes and psutil in kit.hardware
- files under a root (_Files): /proc and /sys, or a test's fake tree standing in for /

_Context hands all three, and the notes, to the CPU, memory and GPU readers; the small parse
helpers they share are here too. Nothing here decides what the host has: it only fetches.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kit.hardware.host import Gpu

COMMAND_TIMEOUT_S = 2.0


# --- commands ---------------------------------------------------------------------------------

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


# --- in-process calls (LiveApis) --------------------------------------------------------------


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


# --- files, and the context every reader is handed --------------------------------------------


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
        return self._guarded(rel, lambda path: path.read_text(encoding="utf-8", errors="replace"))

    def read_bytes(self, rel: str) -> bytes | None:
        return self._guarded(rel, Path.read_bytes)

    def _guarded(self, rel: str, reader):
        try:
            return reader(self.path(rel))
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


# --- parse helpers the readers share ----------------------------------------------------------


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


def _parse_sysctl(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values
