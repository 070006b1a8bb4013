"""The runtime that goes on a stick: frozen here with PyInstaller, or imported from CI.

A runtime folder carries kit-runtime.json: its platform, its executable, the kit version it was
frozen from and every file's size and BLAKE3, written right after the freeze. PyInstaller cannot
build for another OS, so this host freezes its own platform and, on x86_64 Linux, linux-arm64 (in
an arm64 root run by qemu-user: build/base.py); other platforms' runtimes come from the CI matrix
(.github/workflows/runtimes.yml) as folders or archives; one is accepted only when its files match
that list exactly: no links, no path leaving the folder, nothing missing, nothing extra.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import blake3

from kit import __version__, ggml, paths
from kit.builder.elfglibc import glibc_floor
from kit.errors import BuildError, KernelError, ManifestError
from kit.fsutil import atomic_write
from kit.hardware import normalise_arch, normalise_os
from kit.integrity import hash_file
from kit.manifest import RuntimeEntry, check_relpath
from kit.units import human_bytes

RUNTIME_MANIFEST = paths.RUNTIME_MANIFEST
RUNTIME_FORMAT = 1
SPEC = Path(__file__).resolve().parents[2] / "build" / "kit.spec"
BASE = SPEC.parent / "base.py"  # freezes in the old-glibc build root when there is one
MAX_RUNTIME_BYTES = 4 << 30  # a runtime is ~130 MB; an archive claiming more is broken or hostile
MAX_RUNTIME_MANIFEST_BYTES = 16 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_IMPORT_HINT = "use the runtime exactly as CI built it (.github/workflows/runtimes.yml), from this kit's commit"

Report = Callable[[str], None]


@dataclass(frozen=True)
class RuntimeDir:
    platform: str  # linux-x86_64, linux-arm64, macos-arm64, windows-x86_64
    folder: Path  # holds the executable, _internal/ and kit-runtime.json
    entry: str  # the executable, relative to folder: "kit" or "kit.exe"


@dataclass(frozen=True)
class RuntimeFile:
    path: str  # relative to the runtime folder, '/'-separated
    size: int
    blake3: str


def host_platform() -> str:
    """This machine as a runtime folder name, spelled as kit.hardware spells a Host."""
    return f"{normalise_os(platform.system())}-{normalise_arch(platform.machine())}"


def entry_name(platform_name: str) -> str:
    return "kit.exe" if platform_name.startswith("windows-") else "kit"


def freezable_platforms() -> list[str]:
    """The platforms this host freezes runtimes for (build/base.py's targets)."""
    host = host_platform()
    return [host, "linux-arm64"] if host == "linux-x86_64" else [host]


def check_can_freeze(platform_name: str) -> None:
    """Before a build touches the stick: platform_name is one this host freezes, and for another
    CPU its build root is ready and this process may enter it."""
    if platform_name not in freezable_platforms():
        raise BuildError(f"this computer cannot freeze a {platform_name} runtime (it freezes "
                         f"{', '.join(freezable_platforms())})",
                         "import one built by .github/workflows/runtimes.yml with --runtime PATH")
    if platform_name != host_platform():
        _base("ready", "--platform", platform_name)


# ---------------------------------------------------------------- freezing for this host

def freeze_runtime(work_dir: Path, report: Report = print, platform_name: str | None = None) -> RuntimeDir:
    """Freeze the runtime for this host, or for platform_name (one of freezable_platforms()), into
    work_dir/dist/kit (work_dir is reused between builds)."""
    platform_name = platform_name or host_platform()
    check_can_freeze(platform_name)
    across = platform_name != host_platform()
    source_variants = _base_variants(platform_name) if across else _require_variants()
    dist, log = work_dir / "dist", work_dir / "pyinstaller.log"
    work_dir.mkdir(parents=True, exist_ok=True)
    report(f"freezing the {platform_name} runtime with PyInstaller "
           f"({'several minutes under qemu-user' if across else 'about a minute'}; log: {log})")
    start = time.monotonic()
    _run_pyinstaller(work_dir, log, platform_name)
    runtime = RuntimeDir(platform_name, dist / "kit", entry_name(platform_name))
    _replace_links_with_copies(runtime.folder)
    _check_variants_frozen(source_variants, runtime.folder)
    files = write_runtime_manifest(runtime)
    size = sum(f.size for f in files)
    gpu = sum(f.size for f in files if is_gpu_file(f.path))
    report(f"runtime {runtime.platform} frozen in {time.monotonic() - start:.0f} s: "
           f"{len(files)} files, {human_bytes(size)}"
           + (f" ({human_bytes(size - gpu)} for the CPU, {human_bytes(gpu)} the GPU backend)" if gpu else "")
           + _floor_text(runtime.folder))
    return runtime


GPU_FILES = re.compile(r"(^|/)llama_cpp/lib/((lib)?ggml-(vulkan|cuda|hip|metal)\.(so|dll|dylib)|vulkan/.*)$")


def is_gpu_file(rel: str) -> bool:
    """A runtime file only a GPU uses (the backend module, the carried Vulkan loader): counted apart
    from the CPU runtime's size budget."""
    return bool(GPU_FILES.search(rel))


def _require_variants() -> list[str]:
    """The CPU variants this Python's llama_cpp has; a build without them would be useless on a stick."""
    try:
        names = [v.name for v in ggml.list_variants()]
    except KernelError as exc:  # llama_cpp is not installed
        raise BuildError(f"cannot freeze a runtime: {exc}", "install the kit with build/install.sh") from None
    if not names:
        raise BuildError("this Python's llama_cpp has no CPU variant libraries (libggml-cpu-*)",
                         "install llama-cpp-python with build/install.sh (portable build, every variant)")
    return names


def _base_variants(platform_name: str) -> list[str]:
    """The CPU variants build/base.py's llama step made for platform_name (another CPU's libraries,
    listed by name: they do not load here)."""
    folder = Path(_base("llama-dir", "--platform", platform_name).stdout.strip())
    prefix, suffix = "libggml-cpu-", ".so"
    names = sorted(p.name[len(prefix):-len(suffix)] for p in folder.glob(f"{prefix}*{suffix}"))
    if not names:
        raise BuildError(f"the {platform_name} llama.cpp build in {folder} has no CPU variant libraries",
                         f"run `python3 build/base.py ensure --platform {platform_name}` as root")
    return names


def _base(*args: str) -> subprocess.CompletedProcess:
    """build/base.py ARGS (the runtime's native build and freeze); its one-line error becomes a BuildError."""
    if not SPEC.is_file() or not BASE.is_file():
        raise BuildError(f"the runtime spec {SPEC} is missing", "freeze from a source checkout of the kit")
    proc = subprocess.run([sys.executable, str(BASE), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=SPEC.parent.parent)
    if proc.returncode != 0:  # base.py's last line says what went wrong and what to do
        said = (proc.stderr or "no output").strip().splitlines()[-1:] or ["no output"]
        raise BuildError(said[0].removeprefix("base: ")[:300])
    return proc


def _run_pyinstaller(work_dir: Path, log: Path, platform_name: str) -> None:
    """build/base.py freezes: in the build root of platform_name when it is ready, else (this host's
    platform only) with this Python."""
    log.unlink(missing_ok=True)  # a log left by an earlier freeze must not explain this one
    across = [] if platform_name == host_platform() else ["--platform", platform_name]
    try:
        _base("freeze", str(work_dir), sys.executable, *across)
    except BuildError:
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        if not lines:  # base.py stopped before PyInstaller ran: its own sentence says why
            raise
        raise BuildError(f"PyInstaller failed: {lines[-1][:200]}",
                         f"read {log}; `pip install pyinstaller` if it is missing") from None


def _replace_links_with_copies(folder: Path) -> None:
    """A stick holds no links (exFAT/FAT cannot): turn each link into a copy of its target.

    The spec drops PyInstaller's links on Linux; macOS keeps some (its library path rewriting
    expects them) and they become copies here, as they would on the stick.
    """
    inside = folder.resolve()
    for link in _links_under(folder):
        target = link.resolve()
        if not target.is_relative_to(inside) or not (target.is_file() or target.is_dir()):
            raise BuildError(f"the frozen runtime holds a link {link} to {target}, outside it or dangling",
                             "check build/kit.spec")
        link.unlink()
        if target.is_dir():  # macOS framework layout: Versions/Current -> 3.11
            shutil.copytree(target, link, symlinks=False)
        else:
            shutil.copy2(target, link)


def _links_under(folder: Path) -> list[Path]:
    """Links to files and to folders, without following any; outermost first."""
    links = []
    for dirpath, dirnames, filenames in os.walk(folder):
        links += [Path(dirpath, name) for name in dirnames + filenames if Path(dirpath, name).is_symlink()]
    return links


def _check_variants_frozen(source_variants: list[str], folder: Path) -> None:
    lib = folder / "_internal" / "llama_cpp" / "lib"
    frozen = {v.name for v in ggml.list_variants(lib)} if lib.is_dir() else set()
    missing = sorted(set(source_variants) - frozen)
    if missing:
        raise BuildError(f"the frozen runtime lacks CPU variants: {', '.join(missing)}",
                         "check collect_dynamic_libs('llama_cpp') in build/kit.spec")


def describe_files(folder: Path) -> list[RuntimeFile]:
    """Every regular file under folder (kit-runtime.json aside) with its size and BLAKE3."""
    files = []
    for rel in sorted(walk_regular_files(folder)):
        if rel == RUNTIME_MANIFEST:
            continue
        digest = hash_file(folder.joinpath(*rel.split("/")))
        files.append(RuntimeFile(rel, digest.size, digest.blake3))
    return files


def write_runtime_manifest(runtime: RuntimeDir) -> list[RuntimeFile]:
    files = describe_files(runtime.folder)
    data = {"format": RUNTIME_FORMAT, "platform": runtime.platform, "entry": runtime.entry,
            "kit_version": __version__,
            "files": [{"path": f.path, "size": f.size, "blake3": f.blake3} for f in files]}
    floor = glibc_floor(runtime.folder, [f.path for f in files]) if runtime.platform.startswith("linux-") else None
    if floor:
        data["glibc"] = floor.text
        data["glibc_needed_by"] = floor.path
    atomic_write(runtime.folder / RUNTIME_MANIFEST, (json.dumps(data, indent=1) + "\n").encode())
    return files


def _floor_text(folder: Path) -> str:
    """", needs glibc >= 2.31 (libfoo.so)" for a Linux runtime: the oldest Linux it starts on."""
    data = json.loads((folder / RUNTIME_MANIFEST).read_text())
    if not data.get("glibc"):
        return ""
    return f"; needs glibc >= {data['glibc']} ({data.get('glibc_needed_by', '?')})"


def walk_regular_files(folder: Path) -> Iterator[str]:
    """Relative paths of the regular files under folder; a link or a special file is refused."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink():
                raise BuildError(f"{entry.path} is a link; a runtime holds no links", _IMPORT_HINT)
            if entry.is_dir(follow_symlinks=False):
                yield from (f"{entry.name}/{rel}" for rel in walk_regular_files(Path(entry.path)))
            elif entry.is_file(follow_symlinks=False):
                yield entry.name
            else:
                raise BuildError(f"{entry.path} is not a regular file (device, FIFO or socket)", _IMPORT_HINT)


# ---------------------------------------------------------------- importing one frozen elsewhere

def import_runtime(path: Path, work_dir: Path) -> RuntimeDir:
    """A runtime folder or archive (.tar.gz, .tgz, .zip) from CI, checked against its kit-runtime.json."""
    path = Path(path)
    if path.is_dir():
        folder = path
    elif path.is_file():
        folder = _unpack(path, work_dir / _unpack_name(path))
    else:
        raise BuildError(f"runtime {path} does not exist", "pass the folder or archive CI built")
    root = _runtime_root(folder)
    runtime, files = read_runtime_manifest(root)
    check_runtime_files(root, files)
    if not runtime.platform.startswith("windows-"):  # archives made on Windows or by zip lose modes
        (root / runtime.entry).chmod(0o755)
    return runtime


def _unpack_name(archive: Path) -> str:
    """A folder per archive: its name, and a tag of its full path so two `kit.zip` do not collide."""
    tag = blake3.blake3(str(archive.resolve()).encode()).hexdigest()[:8]
    return f"{archive.name}-{tag}"


def _unpack(archive: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    name = archive.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        _unpack_tar(archive, dest)
    elif name.endswith(".zip"):
        _unpack_zip(archive, dest)
    else:
        raise BuildError(f"runtime {archive} is not a folder, .tar.gz or .zip", _IMPORT_HINT)
    return dest


def safe_member_name(name: str, archive: Path) -> str | None:
    """An archive member's path, relative and inside the archive; None for the archive's root."""
    clean = name[2:] if name.startswith("./") else name
    clean = clean.rstrip("/")
    if clean in ("", "."):
        return None
    parts = PurePosixPath(clean).parts
    unsafe = (clean.startswith("/") or "\\" in clean or "\x00" in clean or re.match(r"^[A-Za-z]:", clean)
              or ".." in parts or "." in parts or "" in parts)
    if unsafe:
        raise BuildError(f"runtime {archive.name} holds an unsafe path {name!r}", _IMPORT_HINT)
    return clean


class _Extraction:
    """Writes members under dest, refusing duplicates (also by case, as exFAT folds it) and giant totals."""

    def __init__(self, archive: Path, dest: Path):
        self.archive, self.dest = archive, dest
        self.seen: set[str] = set()
        self.total = 0

    def target(self, rel: str) -> Path:
        key = rel.casefold()
        if key in self.seen:
            raise BuildError(f"runtime {self.archive.name} holds {rel!r} twice", _IMPORT_HINT)
        self.seen.add(key)
        return self.dest.joinpath(*rel.split("/"))

    def add_bytes(self, size: int) -> None:
        self.total += size
        if self.total > MAX_RUNTIME_BYTES:
            raise BuildError(f"runtime {self.archive.name} unpacks to more than {MAX_RUNTIME_BYTES >> 30} GiB",
                             _IMPORT_HINT)

    def write(self, rel: str, source, size: int, executable: bool) -> None:
        self.add_bytes(size)
        path = self.target(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as out:
            shutil.copyfileobj(source, out, 8 << 20)
        path.chmod(0o755 if executable else 0o644)


def _unpack_tar(archive: Path, dest: Path) -> None:
    extraction = _Extraction(archive, dest)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                rel = safe_member_name(member.name, archive)
                if rel is None:
                    continue
                if member.isdir():
                    extraction.target(rel).mkdir(parents=True, exist_ok=True)
                elif member.isreg():
                    with tar.extractfile(member) as source:
                        extraction.write(rel, source, member.size, bool(member.mode & 0o111))
                else:
                    raise BuildError(f"runtime {archive.name} holds {member.name!r}, a link or special file",
                                     _IMPORT_HINT)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BuildError(f"runtime {archive.name} is not a readable .tar.gz: {exc}", _IMPORT_HINT) from None


def _unpack_zip(archive: Path, dest: Path) -> None:
    extraction = _Extraction(archive, dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = safe_member_name(info.filename, archive)
                mode = info.external_attr >> 16  # Unix mode when made on Unix, else 0
                if rel is None:
                    continue
                if stat.S_ISLNK(mode):
                    raise BuildError(f"runtime {archive.name} holds a link {info.filename!r}", _IMPORT_HINT)
                if info.is_dir():
                    extraction.target(rel).mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(info) as source:
                    extraction.write(rel, source, info.file_size, bool(mode & 0o111))
    except (zipfile.BadZipFile, OSError) as exc:
        raise BuildError(f"runtime {archive.name} is not a readable .zip: {exc}", _IMPORT_HINT) from None


def _runtime_root(folder: Path) -> Path:
    """The folder holding kit-runtime.json: the one given, or its only sub-folder (an archive's top)."""
    if (folder / RUNTIME_MANIFEST).exists():
        return folder
    children = list(folder.iterdir())
    if len(children) == 1 and children[0].is_dir() and not children[0].is_symlink() \
            and (children[0] / RUNTIME_MANIFEST).exists():
        return children[0]
    raise BuildError(f"runtime {folder} holds no {RUNTIME_MANIFEST}", _IMPORT_HINT)


def read_runtime_manifest(root: Path) -> tuple[RuntimeDir, dict[str, RuntimeFile]]:
    """kit-runtime.json, completely validated: every path is one bundle.json will accept."""
    path = root / RUNTIME_MANIFEST
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RUNTIME_MANIFEST_BYTES:
        raise BuildError(f"{path} is not a regular file of sensible size", _IMPORT_HINT)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(data, dict) or data.get("format") != RUNTIME_FORMAT:
            raise ManifestError(f"unknown format {data.get('format') if isinstance(data, dict) else data!r}")
        platform_name, entry = data.get("platform"), data.get("entry")
        if not isinstance(entry, str):
            raise ManifestError(f"'entry' must be a string, got {entry!r}")
        RuntimeEntry.parse({"platform": platform_name, "entry": f"runtimes/{platform_name}/{entry}"}, "runtime")
        files = _parse_runtime_files(data.get("files"), platform_name)
    except (UnicodeDecodeError, json.JSONDecodeError, ManifestError) as exc:
        raise BuildError(f"{path} is malformed: {exc}", _IMPORT_HINT) from None
    if data.get("kit_version") != __version__:
        raise BuildError(f"runtime {platform_name} was frozen from kit {data.get('kit_version')}, "
                         f"this builder is kit {__version__}", _IMPORT_HINT)
    if entry not in files:
        raise BuildError(f"{path}: the entry {entry!r} is not in its file list", _IMPORT_HINT)
    return RuntimeDir(platform_name, root, entry), files


def _parse_runtime_files(items, platform_name: str) -> dict[str, RuntimeFile]:
    if not isinstance(items, list) or not items:
        raise ManifestError("'files' must be a non-empty list")
    files: dict[str, RuntimeFile] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"path", "size", "blake3"}:
            raise ManifestError(f"file {i + 1} must be {{path, size, blake3}}")
        rel, size, digest = item["path"], item["size"], item["blake3"]
        check_relpath(f"runtimes/{platform_name}/{rel}", f"file {i + 1}")
        if type(size) is not int or not 0 <= size <= MAX_RUNTIME_BYTES:
            raise ManifestError(f"file {rel}: size {size!r} is absurd")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise ManifestError(f"file {rel}: blake3 must be 64 lowercase hex digits")
        if rel in files:
            raise ManifestError(f"file {rel} appears twice")
        files[rel] = RuntimeFile(rel, size, digest)
    return files


def check_runtime_files(root: Path, files: dict[str, RuntimeFile]) -> None:
    """The folder holds exactly the listed files, byte for byte."""
    found = set(walk_regular_files(root)) - {RUNTIME_MANIFEST}
    extra, missing = sorted(found - set(files)), sorted(set(files) - found)
    if missing:
        more = f" and {len(missing) - 1} more files" if len(missing) > 1 else ""
        raise BuildError(f"runtime at {root} lacks {missing[0]}{more}", _IMPORT_HINT)
    if extra:
        raise BuildError(f"runtime at {root} holds {extra[0]}, which its {RUNTIME_MANIFEST} does not list",
                         _IMPORT_HINT)
    for rel, expected in sorted(files.items()):
        real = root.joinpath(*rel.split("/"))
        if real.stat().st_size != expected.size or hash_file(real).blake3 != expected.blake3:
            raise BuildError(f"runtime file {rel} does not match its {RUNTIME_MANIFEST} (size or BLAKE3)",
                             _IMPORT_HINT)
