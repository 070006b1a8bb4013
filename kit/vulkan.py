"""The one place that talks to the Vulkan loader: which devices it sees, by Vulkan 1.0 calls.

Listing devices runs the host's drivers (ICDs) in this process: call it only in a probe child
(kit.gpuprobe), where a driver that crashes or hangs costs nothing. ggml's Vulkan backend leaves
out devices of type "cpu" (Mesa's lavapipe) unless GGML_VK_VISIBLE_DEVICES names them, so the kit
lists every device itself and hands ggml the one it chose by index.

The loader is the host's libvulkan.so.1; a runtime that carries one (llama_cpp/lib/vulkan/) uses
it only where the host has none.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from kit.errors import KitError
from kit.hardware import VENDOR_IDS

LOADER = "libvulkan.so.1"
# VkPhysicalDeviceType
DEVICE_TYPES = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}
_STRUCTURE_TYPE_INSTANCE_CREATE_INFO = 1
_MEMORY_HEAP_DEVICE_LOCAL = 1
_PROPERTIES_SIZE = 4096  # VkPhysicalDeviceProperties is 824 bytes; room to spare
_NAME_OFFSET, _NAME_SIZE = 20, 256  # after apiVersion, driverVersion, vendorID, deviceID, deviceType
_MEMORY_SIZE = 1024  # VkPhysicalDeviceMemoryProperties: 520 bytes
_HEAP_COUNT_OFFSET, _HEAPS_OFFSET = 260, 264  # after 32 VkMemoryType of 8 bytes; heaps 8-aligned


class VulkanError(KitError):
    hint = "the kit runs on the CPU without it; `--gpu-layers 0` skips every GPU check"


@dataclass(frozen=True)
class VulkanDevice:
    index: int  # the order the loader lists them: GGML_VK_VISIBLE_DEVICES's numbering
    name: str
    kind: str  # DEVICE_TYPES
    vendor_id: int
    device_id: int
    driver_version: int  # raw: each vendor packs it its own way (driver_text)
    api_version: int
    local_memory: int  # bytes in its largest device-local heap (for an integrated GPU, part of RAM)

    @property
    def vendor(self) -> str:
        return VENDOR_IDS.get(self.vendor_id, "other")

    @property
    def driver_text(self) -> str:
        v = self.driver_version
        if self.vendor_id == 0x10DE:  # NVIDIA: 10.8.8.6 bits
            return f"{v >> 22}.{(v >> 14) & 0xFF}.{(v >> 6) & 0xFF}"
        return f"{v >> 22}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


class _InstanceCreateInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.c_void_p), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]


def host_has_loader() -> bool:
    """Whether this host's linker knows a Vulkan loader (ldconfig's cache): nothing is opened."""
    import ctypes.util

    return ctypes.util.find_library("vulkan") is not None


def open_loader(carried: Path | None = None) -> ctypes.CDLL:
    """The host's Vulkan loader, else the runtime's own copy (`carried`), opened global so that
    ggml's Vulkan backend, loaded next, binds to the same one."""
    mode = getattr(ctypes, "RTLD_GLOBAL", 0)
    try:
        return ctypes.CDLL(LOADER, mode=mode)
    except OSError as host_error:
        if carried is None or not carried.is_file():
            raise VulkanError(f"this host has no Vulkan loader ({LOADER}: {host_error})") from None
    try:
        return ctypes.CDLL(os.fspath(carried), mode=mode)
    except OSError as exc:
        raise VulkanError(f"the runtime's own Vulkan loader did not open: {exc}") from None


def list_devices(loader: ctypes.CDLL) -> list[VulkanDevice]:
    """Every physical device the loader's drivers report, in the loader's order."""
    create, enumerate_devices = loader.vkCreateInstance, loader.vkEnumeratePhysicalDevices
    create.restype = enumerate_devices.restype = ctypes.c_int
    create.argtypes = [ctypes.POINTER(_InstanceCreateInfo), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    enumerate_devices.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    loader.vkDestroyInstance.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    for name in ("vkGetPhysicalDeviceProperties", "vkGetPhysicalDeviceMemoryProperties"):
        getattr(loader, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        getattr(loader, name).restype = None
    info = _InstanceCreateInfo(sType=_STRUCTURE_TYPE_INSTANCE_CREATE_INFO)
    instance = ctypes.c_void_p()
    result = create(ctypes.byref(info), None, ctypes.byref(instance))
    if result != 0:
        # -9 VK_ERROR_INCOMPATIBLE_DRIVER: the loader found no driver at all
        raise VulkanError("no Vulkan driver is installed" if result == -9
                          else f"the Vulkan loader could not start (VkResult {result})")
    try:
        count = ctypes.c_uint32(0)
        if enumerate_devices(instance, ctypes.byref(count), None) != 0:
            raise VulkanError("the Vulkan loader could not list devices")
        handles = (ctypes.c_void_p * count.value)()
        if count.value and enumerate_devices(instance, ctypes.byref(count), handles) not in (0, 5):  # 5: VK_INCOMPLETE
            raise VulkanError("the Vulkan loader could not list devices")
        return [_describe(loader, i, handle) for i, handle in enumerate(handles[:count.value])]
    finally:
        loader.vkDestroyInstance(instance, None)


def _describe(loader: ctypes.CDLL, index: int, handle) -> VulkanDevice:
    props = ctypes.create_string_buffer(_PROPERTIES_SIZE)
    loader.vkGetPhysicalDeviceProperties(handle, props)
    api, driver, vendor, device, kind = (int.from_bytes(props.raw[o:o + 4], "little") for o in range(0, 20, 4))
    name = props.raw[_NAME_OFFSET:_NAME_OFFSET + _NAME_SIZE].split(b"\0", 1)[0].decode("utf-8", "replace")
    memory = ctypes.create_string_buffer(_MEMORY_SIZE)
    loader.vkGetPhysicalDeviceMemoryProperties(handle, memory)
    heaps = min(16, int.from_bytes(memory.raw[_HEAP_COUNT_OFFSET:_HEAP_COUNT_OFFSET + 4], "little"))
    local = 0
    for h in range(heaps):
        at = _HEAPS_OFFSET + 16 * h
        size = int.from_bytes(memory.raw[at:at + 8], "little")
        if int.from_bytes(memory.raw[at + 8:at + 12], "little") & _MEMORY_HEAP_DEVICE_LOCAL:
            local = max(local, size)
    return VulkanDevice(index, name.strip() or f"Vulkan device {index}", DEVICE_TYPES.get(kind, "other"),
                        vendor, device, driver, api, local)
