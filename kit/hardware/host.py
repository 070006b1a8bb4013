"""The answer detect() gives: Host and Gpu, plain frozen data, and the OS/arch spelling it uses.

Nothing here reads the machine, so the planner, the launcher, the kernel probe and the tests can
build a Host or load one from JSON without touching the host they run on. normalise_os and
normalise_arch live here because a Host's `platform` (linux-x86_64, macos-arm64, ...) is a runtime
folder name on the stick, and kit.builder spells this machine's the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    device_index: int | None = None  # the backend's own numbering (Vulkan: kit.gpuprobe.VISIBLE_DEVICES)


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
    gpu_note: str | None = None  # why no GPU is usable, when the GPU probe said (kit.gpuprobe)

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
