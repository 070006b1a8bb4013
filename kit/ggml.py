"""The one place that touches ggml's shared libraries: their names and folder, the CPU variants
and GPU backend modules a runtime ships, and registering one of them with the right libggml.

Below kit.engine (which imports llama_cpp) and kit.kernels (which decides which variant to trust);
no llama_cpp import here, so listing the libraries costs nothing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kit.errors import KernelError

# The instruction sets each variant is compiled for (vendor/llama.cpp/ggml/src/CMakeLists.txt,
# ggml_add_cpu_backend_variant), in /proc/cpuinfo spelling. AVX512 there means F, CD, VL, DQ, BW.
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
VARIANT_FLAGS: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _HASWELL,
    "skylakex": _HASWELL + _AVX512,
    "cannonlake": _HASWELL + _AVX512 + ("avx512vbmi",),
    "cascadelake": _HASWELL + _AVX512 + ("avx512_vnni",),
    "icelake": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni"),
    "cooperlake": _HASWELL + _AVX512 + ("avx512_vnni", "avx512_bf16"),
    "zen4": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": _HASWELL + ("avx_vnni",),
    "sapphirerapids": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
    "armv8.0_1": (),
    "armv8.2_1": ("asimddp",),
    "armv8.2_2": ("asimddp", "asimdhp"),
    "armv8.2_3": ("asimddp", "asimdhp", "sve"),
    "armv8.6_1": ("asimddp", "asimdhp", "sve", "i8mm"),
    "armv8.6_2": ("asimddp", "asimdhp", "sve", "i8mm", "sve2"),
    "armv9.2_1": ("asimddp", "asimdhp", "sve", "i8mm", "sme"),
    "armv9.2_2": ("asimddp", "asimdhp", "sve", "i8mm", "sve2", "sme"),
    "apple_m1": ("asimddp",),
    "apple_m2_m3": ("asimddp", "i8mm"),
    "apple_m4": ("asimddp", "i8mm", "sme"),
}

# How each OS names the shared libraries: variant prefix and suffix, libggml (the one libllama
# links against) and libggml-base (every variant's dependency).
_LIB_NAMES = {
    "linux": ("libggml-cpu-", ".so", "libggml.so.0", "libggml-base.so.0"),
    "macos": ("libggml-cpu-", ".so", "libggml.0.dylib", "libggml-base.0.dylib"),
    "windows": ("ggml-cpu-", ".dll", "ggml.dll", "ggml-base.dll"),
}
# GPU backends built as loadable modules beside the CPU variants (GGML_BACKEND_DL).
_GPU_MODULES = {"cuda": "cuda", "rocm": "hip", "metal": "metal", "vulkan": "vulkan"}


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path

    @property
    def required_flags(self) -> tuple[str, ...]:
        return VARIANT_FLAGS.get(self.name, ())


def os_key() -> str:
    return {"darwin": "macos", "win32": "windows"}.get(sys.platform, "linux")


def lib_dir() -> Path:
    """llama_cpp/lib of this installation or frozen runtime, found without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise KernelError("llama_cpp is not installed in this runtime",
                          "install the kit with build/install.sh")
    return Path(spec.origin).parent / "lib"


def server_dir() -> Path:
    """llama_cpp/bin: llama-server and rpc-server with their own libraries and no CPU variant, so
    that ggml's search beside the executable finds none and loads only GGML_BACKEND_PATH's."""
    return lib_dir().parent / "bin"


def tool_path(name: str) -> Path:
    """A llama.cpp tool of this runtime ("llama-server", "ggml-rpc-server")."""
    return server_dir() / (f"{name}.exe" if os_key() == "windows" else name)


def list_variants(directory: Path | None = None) -> list[Variant]:
    prefix, suffix, *_ = _LIB_NAMES[os_key()]
    directory = directory or lib_dir()
    found = []
    for path in sorted(directory.glob(f"{prefix}*{suffix}")):
        name = path.name[len(prefix): -len(suffix)]
        found.append(Variant(name, path))
    return found


def gpu_backend_libs(directory: Path | None = None) -> dict[str, Path]:
    """The GPU backends this runtime can drive: {"cuda": path, ...}; empty for a CPU-only build."""
    prefix, suffix, *_ = _LIB_NAMES[os_key()]
    directory = directory or lib_dir()
    base = prefix.removesuffix("cpu-")
    found = {}
    for backend, module in _GPU_MODULES.items():
        path = directory / f"{base}{module}{suffix}"
        if path.is_file():
            found[backend] = path
    return found


def runtime_backends() -> frozenset[str]:
    """Names of the GPU backends this runtime ships; none when llama_cpp is not installed."""
    try:
        return frozenset(gpu_backend_libs())
    except KernelError:
        return frozenset()


def _runtime_lib(which: int) -> ctypes.CDLL:
    """This runtime's libggml (2: the file libllama links) or libggml-base (3), by _LIB_NAMES index,
    opened global so that a backend module loaded next resolves against them."""
    return ctypes.CDLL(str(lib_dir() / _LIB_NAMES[os_key()][which]), mode=getattr(ctypes, "RTLD_GLOBAL", 0))


def load_variant(path: Path) -> None:
    """Register a backend module with the libggml that libllama uses (docs/ARCHITECTURE.md, trap 2).

    libllama links libggml by soname (libggml.so.0 on Linux); opening that exact file gives the
    same instance. llama_cpp._ggml opens libggml.so, a second copy, which llama never sees.
    """
    ggml = _runtime_lib(2)
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not ggml.ggml_backend_load(os.fsencode(path)):
        raise KernelError(f"ggml could not load the backend {path.name}")


def backend_score(path: Path) -> int:
    """ggml's own verdict on a variant for this CPU, as ggml_backend_load_best ranks them: higher
    is better, 0 means "cannot run here". Opening the library runs its constructors, which may
    die on this CPU: call it only in a probe child (kit.kernels), never in the kit's own process.
    """
    # its dependency first, from this runtime: a variant copied elsewhere still finds it
    _runtime_lib(3)
    score = getattr(ctypes.CDLL(str(path)), "ggml_backend_score", None)
    if score is None:
        raise KernelError(f"{path.name} is not a ggml CPU backend (it exports no ggml_backend_score)")
    score.restype = ctypes.c_int
    score.argtypes = []
    return int(score())


# ggml.h's struct ggml_threadpool_params (GGML_MAX_N_THREADS 512), checked against the pinned
# source by tests/test_engine.py; ggml_threadpool_params_init fills in the defaults.
class _ThreadpoolParams(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


# llama.cpp's own default polling level (common's cpuparams, llama-bench --poll): after a graph a
# worker spins 1024 * 128 * poll pause loops for the next one (ggml-cpu.c; tens of ms to ~0.3 s
# by CPU), then sleeps, so an idle chat costs nothing.
THREADPOOL_POLL = 50
_CPU_DEVICE = 0  # GGML_BACKEND_DEVICE_TYPE_CPU


@dataclass
class Threadpool:
    """A ggml CPU threadpool: `handle` goes to llama_attach_threadpool; free it after the context."""

    handle: int
    _free: object

    def free(self) -> None:
        if self.handle:
            self._free(self.handle)
            self.handle = 0


def new_threadpool(n_threads: int, poll: int = THREADPOOL_POLL) -> Threadpool | None:
    """ggml's CPU threadpool for one model's life, as llama.cpp's tools keep one (llama-bench, and
    llama-server through common). Without one, ggml makes and joins new threads for every graph,
    that is every generated token, and none of them waits for the next: docs/BENCHMARKS.md §1.
    None when no CPU backend is registered or its libraries cannot be opened: then ggml's
    per-graph threads are used, slower but the same answers."""
    try:
        ggml, base = _runtime_lib(2), _runtime_lib(3)  # the registry libllama uses (load_variant)
    except OSError:
        return None
    for name, restype, argtypes in (("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int]),
                                    ("ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
                                    ("ggml_backend_reg_get_proc_address", ctypes.c_void_p,
                                     [ctypes.c_void_p, ctypes.c_char_p])):
        getattr(ggml, name).restype, getattr(ggml, name).argtypes = restype, argtypes
    base.ggml_threadpool_params_init.restype = None
    base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_ThreadpoolParams), ctypes.c_int]
    device = ggml.ggml_backend_dev_by_type(_CPU_DEVICE)
    if not device:
        return None
    reg = ggml.ggml_backend_dev_backend_reg(device)
    # the CPU backend is a loaded module: its functions come from its registry, as llama-bench gets them
    new_address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new")
    free_address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free")
    if not (new_address and free_address):
        return None
    new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ThreadpoolParams))(new_address)
    free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(free_address)
    params = _ThreadpoolParams()
    base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
    params.poll = poll
    handle = new(ctypes.byref(params))  # ggml aborts rather than return NULL; kept as a guard
    return Threadpool(handle, free) if handle else None


@dataclass(frozen=True)
class GpuDevice:
    """A GPU device a loaded backend registered with ggml, as llama.cpp will see it."""

    name: str  # ggml's ("Vulkan0")
    description: str  # the driver's name for it
    integrated: bool
    free: int  # bytes
    total: int


_GPU_TYPES = {1: False, 2: True}  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU -> integrated


def gpu_devices() -> list[GpuDevice]:
    """The GPU devices registered in this process's ggml (a GPU backend loaded first)."""
    ggml = _runtime_lib(2)
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(ggml, name).restype, getattr(ggml, name).argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype, ggml.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
    ggml.ggml_backend_dev_memory.restype = None
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_size_t)]
    found = []
    for i in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(i)
        kind = ggml.ggml_backend_dev_type(device)
        if kind not in _GPU_TYPES:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        found.append(GpuDevice(ggml.ggml_backend_dev_name(device).decode(errors="replace"),
                               (ggml.ggml_backend_dev_description(device) or b"").decode(errors="replace"),
                               _GPU_TYPES[kind], free.value, total.value))
    return found


def carried_vulkan_loader(directory: Path | None = None) -> Path | None:
    """The runtime's own Vulkan loader, used only on a host that has none (kit.vulkan); None when
    this runtime carries none."""
    path = (directory or lib_dir()) / "vulkan" / "libvulkan.so.1"
    return path if path.is_file() else None
