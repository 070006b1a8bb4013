"""The frozen runtime (build/kit.spec via kit.builder.freeze) and importing runtimes built elsewhere.

The freeze runs once per session (~30 s); importing is tested on small hand-made runtimes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import assert_notices_complete, run_kit
from test_server_files import (
    GLIBC_LIBRARIES,
    check_server_folder,
    check_server_runs,
    resolve,
    simplest_variant,
    venv_bin,
)

from kit import __version__, ggml, integrity
from kit.builder import freeze
from kit.builder.elfglibc import glibc_floor, glibc_needs, is_elf
from kit.builder.freeze import RUNTIME_MANIFEST, RuntimeDir, import_runtime, write_runtime_manifest
from kit.errors import BuildError
from kit.hardware import detect

GLIBC_FLOOR = (2, 31)  # build/base.py freezes in Debian 11: Ubuntu 20.04, RHEL 9 and newer run it


def needed_libraries(path: Path) -> list[str]:
    """The DT_NEEDED names of an ELF file (none for other files)."""
    if not is_elf(path):
        return []
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        return [tag.needed for section in ELFFile(f).iter_sections() if isinstance(section, DynamicSection)
                for tag in section.iter_tags("DT_NEEDED")]


def base_ready() -> bool:
    base = Path(__file__).resolve().parents[1] / "build" / "base.py"
    return subprocess.run([sys.executable, str(base), "ready"]).returncode == 0


# ---------------------------------------------------------------- the real freeze (slow)


@pytest.fixture(scope="session")
def frozen(tmp_path_factory) -> RuntimeDir:
    lines: list[str] = []
    runtime = freeze.freeze_runtime(tmp_path_factory.mktemp("freeze"), report=lines.append)
    print("\n".join(lines))
    return runtime


@pytest.fixture(scope="session")
def stick_copy_of_runtime(frozen, tmp_path_factory) -> Path:
    """The runtime as it lands on a stick: every file copied, no links, no shared inodes."""
    dest = tmp_path_factory.mktemp("on-stick") / frozen.platform
    shutil.copytree(frozen.folder, dest, symlinks=False)
    return dest


def _lib_dir(folder: Path) -> Path:
    return folder / "_internal" / "llama_cpp" / "lib"


def _bin_dir(folder: Path) -> Path:
    return folder / "_internal" / "llama_cpp" / "bin"


@pytest.mark.slow
def test_frozen_version_starts(frozen):
    start = time.monotonic()
    proc = subprocess.run([str(frozen.folder / frozen.entry), "--version"], capture_output=True, text=True,
                          timeout=60)
    seconds = time.monotonic() - start
    size = sum(f.stat().st_size for f in frozen.folder.rglob("*") if f.is_file())
    print(f"frozen runtime: {size / 1e6:.0f} MB, --version in {seconds:.2f} s")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"kit {__version__}"


@pytest.mark.slow
def test_every_cpu_variant_is_frozen_and_every_library_they_need_is_bundled(frozen):
    source = {v.name for v in ggml.list_variants()}
    inside = {v.name for v in ggml.list_variants(_lib_dir(frozen.folder))}
    assert source and inside == source
    if sys.platform.startswith("linux"):  # a bare host has glibc and nothing else
        files = list(freeze.walk_regular_files(frozen.folder))
        bundled = {Path(rel).name for rel in files}
        missing = {f"{rel} needs {name}" for rel in files for name in needed_libraries(frozen.folder / rel)
                   if name not in bundled and name not in GLIBC_LIBRARIES}
        assert not missing, sorted(missing)
        # The tools run with no LD_LIBRARY_PATH: their RUNPATH ($ORIGIN, $ORIGIN/../lib and
        # $ORIGIN/../.. for libstdc++) must find each library in the runtime.
        for tool in sorted(p for p in _bin_dir(frozen.folder).iterdir() if is_elf(p)):
            mapped, missing_here = resolve(tool, GLIBC_LIBRARIES)
            outside = [str(p) for p in mapped.values() if not p.is_relative_to(frozen.folder.resolve())]
            assert not missing_here and not outside, (missing_here, outside)
            assert not [p for p in mapped.values() if p.name.startswith("libggml-cpu-")]


@pytest.mark.slow
def test_each_shared_library_is_there_once(frozen):
    """No byte-identical copies (the wheel's libggml.so / .so.0 / .so.0.25.3) and no links."""
    by_content = defaultdict(list)
    for rel in freeze.walk_regular_files(frozen.folder):  # raises on a link
        path = frozen.folder / rel
        if ".so" in path.name or path.suffix in (".dylib", ".dll"):
            by_content[integrity.hash_file(path).blake3].append(rel)
    copies = [paths for paths in by_content.values() if len(paths) > 1]
    assert not copies, f"libraries shipped more than once: {copies}"
    llama_named = [rel for paths in by_content.values() for rel in paths
                   if Path(rel).name.startswith(("libggml", "libllama", "ggml", "llama"))]
    # llama_cpp/bin: the tools' own libraries (libllama-common, libllama-server-impl) and the RPC
    # backend module only they load; no libggml, libggml-base or CPU variant
    tools_own = [rel for rel in llama_named
                 if rel.startswith(("_internal/llama_cpp/bin/libllama-", "_internal/llama_cpp/bin/libggml-rpc.so"))]
    assert all(rel.startswith("_internal/llama_cpp/lib/") for rel in llama_named if rel not in tools_own), llama_named


@pytest.mark.slow
def test_runtime_manifest_lists_every_file(frozen):
    runtime, files = freeze.read_runtime_manifest(frozen.folder)
    assert runtime == frozen
    freeze.check_runtime_files(frozen.folder, files)
    assert frozen.entry in files and any(p.startswith("_internal/llama_cpp/lib/libggml-cpu-") for p in files)
    if sys.platform.startswith("linux"):
        data = json.loads((frozen.folder / RUNTIME_MANIFEST).read_text())
        floor = glibc_floor(frozen.folder, list(files))
        assert (data["glibc"], data["glibc_needed_by"]) == (floor.text, floor.path)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is Linux's C library")
def test_no_file_of_the_runtime_asks_for_a_glibc_newer_than_the_floor(frozen):
    if not base_ready():
        pytest.fail("this runtime was frozen on the host, not in the old-glibc root: run "
                    "`python3 build/base.py ensure` as root on Debian (build/install.sh does)")
    needs = glibc_needs(frozen.folder, list(freeze.walk_regular_files(frozen.folder)))
    offenders = [f"{n.path} asks for GLIBC_{n.text}" for n in needs if n.version[:2] > GLIBC_FLOOR]
    assert needs and not offenders, offenders
    assert any(n.path.endswith("libpython3.11.so.1.0") for n in needs)  # the check reads real files


@pytest.mark.slow
def test_the_runtime_is_at_most_100_mb(frozen):
    """The CPU runtime's budget; the GPU backend (issue 17) is counted apart, and must be there."""
    sizes = {rel: (frozen.folder / rel).stat().st_size for rel in freeze.walk_regular_files(frozen.folder)}
    gpu = {rel: size for rel, size in sizes.items() if freeze.is_gpu_file(rel)}
    cpu = {rel: size for rel, size in sizes.items() if rel not in gpu}
    largest = sorted(cpu, key=cpu.get, reverse=True)[:5]
    print(f"runtime {frozen.platform}: {sum(cpu.values()) / 1e6:.1f} MB for the CPU; largest: "
          + ", ".join(f"{rel} {cpu[rel] / 1e6:.1f}" for rel in largest)
          + f"; GPU backend {sum(gpu.values()) / 1e6:.1f} MB: " + ", ".join(sorted(gpu)))
    assert sum(cpu.values()) <= 100e6
    if sys.platform.startswith("linux"):
        assert {Path(rel).name for rel in gpu} == {"libggml-vulkan.so", "libvulkan.so.1"}
        assert sum(gpu.values()) <= 40e6  # its own budget: 29.1 MB on 2026-12-06 (BENCHMARKS §5)


@pytest.mark.slow
def test_the_notices_name_a_licence_for_every_bundled_distribution_and_library(frozen):
    assert_notices_complete(frozen.folder)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="llama_cpp/bin is made on Linux only")
def test_the_server_tools_are_frozen_beside_no_cpu_variant_and_start_with_an_empty_environment(
        stick_copy_of_runtime, tmp_path):
    folder = _bin_dir(stick_copy_of_runtime)
    check_server_folder(folder)
    check_server_runs(folder, tmp_path)
    frozen_files = {p.name: p.read_bytes() for p in folder.iterdir()}
    venv_files = {p.name: p.read_bytes() for p in venv_bin().iterdir() if is_elf(p)}
    assert frozen_files == venv_files, (sorted(frozen_files), sorted(venv_files))  # the same bytes


def _mapped_paths(pid: int) -> set[str]:
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # the process has ended
        return set()
    return {line.split(None, 5)[5].strip() for line in text.splitlines() if len(line.split(None, 5)) == 6}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
@pytest.mark.parametrize("as_probe_child", [False, True], ids=["direct", "probe-child-env"])
def test_one_libggml_is_mapped_when_the_frozen_runtime_runs(stick_copy_of_runtime, gemma_path, as_probe_child):
    """docs/ARCHITECTURE.md trap 2: libllama and the CPU kernel must share one libggml.

    A frozen kit starts its `_probe` children with the bootloader's LD_LIBRARY_PATH (the runtime's
    _internal/), which wins over RUNPATH: a stray top-level libggml.so.0 would be bound there.
    """
    folder = stick_copy_of_runtime
    variant = simplest_variant(_lib_dir(folder))
    env = dict(os.environ)
    if as_probe_child:
        env["LD_LIBRARY_PATH"] = str(folder / "_internal")
    command = [str(folder / "kit"), "_probe", "--variant", str(variant.path), "--model", str(gemma_path),
               "--blake3", integrity.hash_file(gemma_path).blake3, "--threads", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen: set[str] = set()
    while proc.poll() is None:
        seen |= _mapped_paths(proc.pid)
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["gen_tps"] > 0
    ggml = sorted(p for p in seen if Path(p).name.startswith(("libggml.so", "libggml-base.so")))
    assert ggml == [str(_lib_dir(folder) / "libggml-base.so.0"), str(_lib_dir(folder) / "libggml.so.0")]
    assert str(variant.path) in seen


# ---------------------------------------------------------------- importing (fast, hand-made runtimes)


def make_runtime(folder: Path, platform: str = "linux-arm64", entry: str = "kit") -> RuntimeDir:
    """A small runtime folder with its kit-runtime.json, as freeze_runtime writes one."""
    lib = folder / "_internal" / "llama_cpp" / "lib"
    lib.mkdir(parents=True)
    (folder / entry).write_bytes(b"\x7fELF not really")
    (folder / entry).chmod(0o755)
    (lib / "libggml-cpu-armv8.0_1.so").write_bytes(b"kernel")
    (folder / "_internal" / "base_library.zip").write_bytes(b"zip" * 100)
    runtime = RuntimeDir(platform, folder, entry)
    write_runtime_manifest(runtime)
    return runtime


def make_tar(source: Path, archive: Path, extra: tarfile.TarInfo | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=source.name)
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size) if extra.isreg() else None)
    return archive


def test_import_a_folder(tmp_path):
    made = make_runtime(tmp_path / "rt")
    assert import_runtime(made.folder, tmp_path / "work") == made


def test_import_a_tar_gz_keeps_the_exec_bit(tmp_path):
    made = make_runtime(tmp_path / "linux-arm64")
    got = import_runtime(make_tar(made.folder, tmp_path / "rt.tar.gz"), tmp_path / "work")
    assert got.platform == "linux-arm64" and got.entry == "kit"
    assert got.folder.is_relative_to(tmp_path / "work")
    assert os.access(got.folder / "kit", os.X_OK)


def test_import_a_zip_without_modes_and_reimport_replaces_it(tmp_path):
    made = make_runtime(tmp_path / "win", "windows-x86_64", "kit.exe")
    archive = tmp_path / "runtime-windows.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in [*freeze.walk_regular_files(made.folder)]:
            zf.write(made.folder / rel, rel)
    first = import_runtime(archive, tmp_path / "work")
    second = import_runtime(archive, tmp_path / "work")
    assert first == second and first.entry == "kit.exe" and first.platform == "windows-x86_64"


def test_a_changed_file_is_refused(tmp_path):
    made = make_runtime(tmp_path / "rt")
    (made.folder / "_internal" / "base_library.zip").write_bytes(b"zap" * 100)  # same size
    with pytest.raises(BuildError, match="base_library.zip does not match"):
        import_runtime(made.folder, tmp_path / "work")


def test_an_unlisted_file_is_refused(tmp_path):
    made = make_runtime(tmp_path / "rt")
    (made.folder / "_internal" / "evil.so").write_bytes(b"")
    with pytest.raises(BuildError, match="evil.so, which its kit-runtime.json does not list"):
        import_runtime(made.folder, tmp_path / "work")


def test_a_missing_file_is_refused(tmp_path):
    made = make_runtime(tmp_path / "rt")
    (made.folder / "_internal" / "base_library.zip").unlink()
    with pytest.raises(BuildError, match="lacks _internal/base_library.zip"):
        import_runtime(made.folder, tmp_path / "work")


def test_a_link_in_a_folder_is_refused(tmp_path):
    made = make_runtime(tmp_path / "rt")
    (made.folder / "_internal" / "link.so").symlink_to("/etc/passwd")
    with pytest.raises(BuildError, match="is a link"):
        import_runtime(made.folder, tmp_path / "work")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_a_link_in_a_tar_is_refused(tmp_path, kind):
    made = make_runtime(tmp_path / "rt")
    link = tarfile.TarInfo("rt/_internal/link.so")
    link.type, link.linkname = kind, "/etc/passwd"
    with pytest.raises(BuildError, match="a link or special file"):
        import_runtime(make_tar(made.folder, tmp_path / "rt.tgz", link), tmp_path / "work")


@pytest.mark.parametrize("name", ["../escape", "rt/../../escape", "/etc/cron.d/evil", "C:/evil", "rt/a\\b"])
def test_paths_escaping_a_tar_are_refused(tmp_path, name):
    made = make_runtime(tmp_path / "rt")
    member = tarfile.TarInfo(name)
    member.size = 4
    with pytest.raises(BuildError, match="unsafe path"):
        import_runtime(make_tar(made.folder, tmp_path / "rt.tgz", member), tmp_path / "work")
    assert not (tmp_path / "escape").exists()


def test_a_zip_symlink_and_a_zip_escape_are_refused(tmp_path):
    made = make_runtime(tmp_path / "rt")
    link = zipfile.ZipInfo("rt/_internal/link.so")
    link.external_attr = (0o120777 << 16)
    for member, message in ((link, "holds a link"), (zipfile.ZipInfo("../escape"), "unsafe path")):
        archive = tmp_path / "rt.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("rt/kit-runtime.json", (made.folder / RUNTIME_MANIFEST).read_bytes())
            zf.writestr(member, "/etc/passwd")
        with pytest.raises(BuildError, match=message):
            import_runtime(archive, tmp_path / "work")


def test_a_name_twice_ignoring_case_is_refused(tmp_path):
    made = make_runtime(tmp_path / "rt")
    twin = tarfile.TarInfo("rt/KIT")
    twin.size = 1
    with pytest.raises(BuildError, match="twice"):
        import_runtime(make_tar(made.folder, tmp_path / "rt.tgz", twin), tmp_path / "work")


def _rewrite_manifest(folder: Path, **changes) -> None:
    path = folder / RUNTIME_MANIFEST
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize(("changes", "message"), [
    ({"platform": "linux-riscv64"}, "unknown platform"),
    ({"entry": "../kit"}, "leaves KIT|not normalised"),
    ({"entry": "missing"}, "not in its file list"),
    ({"format": 2}, "unknown format"),
    ({"files": [{"path": "/etc/passwd", "size": 1, "blake3": "0" * 64}]}, "not normalised or leaves"),
    ({"files": [{"path": "kit", "size": -1, "blake3": "0" * 64}]}, "absurd"),
    ({"kit_version": "0.0.1"}, "frozen from kit 0.0.1"),
])
def test_a_bad_runtime_manifest_is_refused(tmp_path, changes, message):
    made = make_runtime(tmp_path / "rt")
    _rewrite_manifest(made.folder, **changes)
    with pytest.raises(BuildError, match=message):
        import_runtime(made.folder, tmp_path / "work")


def test_a_folder_without_a_runtime_manifest_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="holds no kit-runtime.json"):
        import_runtime(tmp_path / "empty", tmp_path / "work")
    with pytest.raises(BuildError, match="does not exist"):
        import_runtime(tmp_path / "nowhere", tmp_path / "work")


def test_host_platform_is_spelled_like_a_stick_folder():
    assert freeze.host_platform() == detect().platform
    assert freeze.entry_name("windows-x86_64") == "kit.exe" and freeze.entry_name("macos-arm64") == "kit"


def test_links_left_by_pyinstaller_become_copies(tmp_path):
    """macOS keeps some of PyInstaller's links (files and framework folders); a stick holds none."""
    folder = tmp_path / "kit"
    (folder / "_internal" / "Python.framework" / "Versions" / "3.11").mkdir(parents=True)
    (folder / "_internal" / "Python.framework" / "Versions" / "3.11" / "Python").write_bytes(b"lib")
    (folder / "_internal" / "Python.framework" / "Versions" / "Current").symlink_to("3.11")
    (folder / "_internal" / "Python").symlink_to("Python.framework/Versions/Current/Python")
    freeze._replace_links_with_copies(folder)
    assert list(freeze.walk_regular_files(folder))  # raises on any link left
    assert (folder / "_internal" / "Python").read_bytes() == b"lib"
    assert (folder / "_internal" / "Python.framework" / "Versions" / "Current" / "Python").read_bytes() == b"lib"


def test_a_link_leaving_the_frozen_runtime_is_refused(tmp_path):
    folder = tmp_path / "kit"
    folder.mkdir()
    (folder / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(BuildError, match="outside it"):
        freeze._replace_links_with_copies(folder)


def test_the_platforms_to_freeze_are_checked_before_the_stick_is_touched(tmp_path):
    target = tmp_path / "stick"
    proc = run_kit("build", "--profile", "manifests/demo.toml", "--target", str(target), "--platform", "linux-riscv64")
    assert proc.returncode != 0 and "cannot freeze a linux-riscv64 runtime" in proc.stderr, proc.stderr
    assert "--runtime" in proc.stderr and not target.exists()
    proc = run_kit("build", "--profile", "manifests/demo.toml", "--target", str(target), "--no-freeze",
                   "--platform", "linux-x86_64")
    assert proc.returncode != 0 and "contradict" in proc.stderr and not target.exists()
