"""What this host has: OS, CPU, cores, memory, GPUs. Plain data; detect() never raises.

Part of the pure core: no llama_cpp, no textual.
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


@dataclass(frozen=True)
class Host:
    os: str  # "linux" | "macos" | "windows" | other platform.system().lower()
    arch: str  # "x86_64" | "arm64" | ...
    cpu_name: str = "unknown CPU"
    cpu_flags: frozenset[str] = frozenset()  # lowercase, /proc/cpuinfo spelling (avx2, avx512f, ...)
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


def detect() -> Host:
    """Describe this host. Never raises: what cannot be read is said in `notes`."""
    raise NotImplementedError  # filled in by the hardware work
