"""GPUs: NVIDIA, AMD, Intel iGPUs, Apple Silicon, and whatever else Vulkan sees.

NVIDIA comes from NVML (LiveApis.nvidia_gpus), else nvidia-smi; AMD from rocm-smi, else sysfs;
Intel iGPUs from sysfs; an Apple GPU is Metal's share of unified memory. vulkaninfo then adds the
GPUs no vendor tool saw and names the ones sysfs only knew by PCI id, without counting one twice.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass

from kit.hardware.host import Gpu
from kit.hardware.memory import _Memory
from kit.hardware.seams import _Context, _describe, _Files, _positive
from kit.units import GiB, MiB


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
    share = ram * 2 // 3 if ram <= 36 * GiB else ram * 3 // 4
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
                vram_total=total * MiB if total else None,
                vram_free=free * MiB if free else None,
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
