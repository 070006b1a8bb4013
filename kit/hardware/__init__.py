"""What this host has: OS, CPU, cores, memory, GPUs. Plain data; detect() never raises.

Part of the pure core: no llama_cpp, no textual.

Everything is read through three seams, so a recorded host (tests/fixtures/hosts/) can stand in
for this one: files under `root`, commands through `run`, and the few in-process calls that
neither can replace (psutil, RLIMIT_AS, NVML, Windows APIs) through `LiveApis`.

Split by concern, the way ollama's discover/ is:
  host      Host and Gpu (the answer), normalise_os, normalise_arch
  seams     the three seams (_Files, _Commands, LiveApis) and the parse helpers they share
  cpu       CPU name, feature flags and cores on Linux, macOS and Windows
  memory    RAM, cgroup v1/v2 ceilings, RLIMIT_AS
  gpu       NVIDIA, AMD, Intel, Apple and Vulkan GPUs
  here      detect(), which asks each reader in turn, and every name callers import

Import from kit.hardware, not from its modules; a name with a leading underscore is shared among
these modules only.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from kit.hardware.cpu import _Cpu, _read_cpu
from kit.hardware.gpu import VENDOR_IDS, _read_gpus, parse_nvidia_smi, parse_rocm_smi
from kit.hardware.host import Gpu, Host, normalise_arch, normalise_os
from kit.hardware.memory import UNLIMITED, _Memory, _read_memory
from kit.hardware.seams import (
    COMMAND_TIMEOUT_S,
    LiveApis,
    Run,
    _Commands,
    _Context,
    _describe,
    _Files,
    default_run,
    nvml_gpus,
    psutil_cpu_counts,
    psutil_memory,
    rlimit_address_space,
    windows_cpu,
)
from kit.units import GiB as GIB
from kit.units import MiB as MIB

__all__ = [
    "COMMAND_TIMEOUT_S",
    "GIB",
    "MIB",
    "UNLIMITED",
    "VENDOR_IDS",
    "Gpu",
    "Host",
    "LiveApis",
    "Run",
    "default_run",
    "detect",
    "normalise_arch",
    "normalise_os",
    "nvml_gpus",
    "parse_nvidia_smi",
    "parse_rocm_smi",
    "psutil_cpu_counts",
    "psutil_memory",
    "rlimit_address_space",
    "windows_cpu",
]


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

    cpu = _guarded(notes, "the CPU", lambda: _read_cpu(os_name, ctx, arch), _Cpu())
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


def _guarded(notes: list[str], what: str, read, default):
    try:
        return read()
    except Exception as exc:  # detection must never stop the kit: say it and go on
        notes.append(f"Could not read {what} ({_describe(exc)}).")
        return default


