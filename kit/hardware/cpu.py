"""The CPU: model name, feature flags (in /proc/cpuinfo spelling), physical and logical cores.

Linux reads /proc/cpuinfo and the sysfs topology (arm64 cpuinfo has no model name, hence the Arm
implementer/part tables; arm64 features come from the process's own hardware capabilities, as
ggml reads them), macOS reads sysctl, Windows asks LiveApis.windows_cpu. A core count the
OS reader could not find comes from psutil, then from the other count.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace

from kit.hardware.seams import _Context, _describe, _Files, _positive


@dataclass
class _Cpu:
    name: str = "unknown CPU"
    flags: frozenset[str] = frozenset()
    physical: int = 1
    logical: int = 1


def _read_cpu(os_name: str, ctx: _Context, arch: str = "") -> _Cpu:
    if os_name == "linux":
        cpu = _linux_cpu(ctx)
        if arch == "arm64":
            cpu = _with_arm_hwcaps(cpu, ctx)
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


# arm64 AT_HWCAP and AT_HWCAP2 bits (Linux arch/arm64/include/uapi/asm/hwcap.h), named as
# /proc/cpuinfo's Features line names them.
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_ARM_HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc"
              " dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
_ARM_HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm"
               " svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32"
               " smef16f32 smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16 cssc rprfm sve2p1 sme2 sme2p1").split()


def _with_arm_hwcaps(cpu: _Cpu, ctx: _Context) -> _Cpu:
    """The features the kernel grants this process (the auxiliary vector), which ggml's ARM variants
    test too. /proc/cpuinfo names the same on a real ARM machine, but under an emulator (qemu-user)
    it shows the host's CPU, not the emulated one."""
    if struct.calcsize("P") != 8:  # a 32-bit process's auxiliary vector has 32-bit words
        return cpu
    words = _auxv(ctx.files.read_bytes("proc/self/auxv") or b"")
    if _AT_HWCAP not in words:
        return cpu
    flags = {name for bit, name in enumerate(_ARM_HWCAP) if words[_AT_HWCAP] >> bit & 1}
    flags |= {name for bit, name in enumerate(_ARM_HWCAP2) if words.get(_AT_HWCAP2, 0) >> bit & 1}
    return replace(cpu, flags=frozenset(flags))


def _auxv(data: bytes) -> dict[int, int]:
    """A 64-bit auxiliary vector's (type, value) pairs, up to AT_NULL."""
    words = {}
    for kind, value in struct.iter_unpack("=QQ", data[: len(data) // 16 * 16]):
        if kind == 0:
            break
        words[kind] = value
    return words


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
