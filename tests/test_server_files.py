"""llama_cpp/bin of this venv (build/base.py install_llama_tools): llama-server and ggml-rpc-server
with the libraries only they use, on llama_cpp/lib's libllama and libggml and the CPU variant named
in GGML_BACKEND_PATH. tests/test_freeze.py checks the frozen runtime's copy with these helpers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kit import ggml, kernels
from kit.builder.elfglibc import is_elf
from kit.hardware import detect

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="llama_cpp/bin is made on Linux only")

SERVER_TOOLS = ("llama-server", "ggml-rpc-server")
BENCH_ONLY = ("llama-bench", "llama-completion")  # built for the bench, never in llama_cpp/bin
# What every glibc host has; anything else a runtime file needs must be in the runtime.
GLIBC_LIBRARIES = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1",
                   "libresolv.so.2", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}


def dynamic_entries(path: Path) -> tuple[list[str], list[Path]]:
    """DT_NEEDED names and DT_RUNPATH folders ($ORIGIN expanded) of an ELF file."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    needed, runpath = [], []
    with open(path, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if isinstance(section, DynamicSection):
                needed += [t.needed for t in section.iter_tags("DT_NEEDED")]
                for tag in section.iter_tags("DT_RUNPATH"):
                    runpath += [Path(p.replace("$ORIGIN", str(path.parent))) for p in tag.runpath.split(":")]
    return needed, runpath


def resolve(executable: Path, system: set[str]) -> tuple[dict[str, Path], list[str]]:
    """The libraries the loader maps for executable, following each file's own RUNPATH (no
    LD_LIBRARY_PATH), a name already mapped satisfying later needs; and 'file needs name' for each
    one found nowhere that is not in system."""
    mapped: dict[str, Path] = {}
    missing: list[str] = []
    queue = [executable]
    while queue:
        obj = queue.pop(0)
        needed, runpath = dynamic_entries(obj)
        for name in needed:
            if name in mapped or name in system:
                continue
            found = next((d / name for d in runpath if (d / name).is_file()), None)
            if found is None:
                missing.append(f"{obj.name} needs {name}")
                continue
            mapped[name] = found.resolve()
            queue.append(found)
    return mapped, missing


def simplest_variant(lib: Path) -> ggml.Variant:
    """The variant with the fewest required instructions this CPU has: it works everywhere."""
    usable, _ = kernels.candidates(ggml.list_variants(lib), detect())
    return min(usable, key=lambda v: len(v.required_flags))


def run_tool(tool: Path, variant: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """tool as the kit runs it: an empty environment (env -i) but GGML_BACKEND_PATH."""
    return subprocess.run([str(tool), *args], env={"GGML_BACKEND_PATH": str(variant)}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def check_server_folder(bin_dir: Path) -> None:
    """The tools, executable, with no CPU variant and nothing llama_cpp/lib holds."""
    names = {p.name for p in bin_dir.iterdir()}
    assert set(SERVER_TOOLS) <= names, sorted(names)
    for tool in SERVER_TOOLS:
        assert (bin_dir / tool).stat().st_mode & 0o111, f"{tool} is not executable"
    assert not names & set(BENCH_ONLY), sorted(names)
    # the RPC backend module the tools load, and no CPU variant (ggml would load it beside them)
    assert "libggml-rpc.so" in names, sorted(names)
    lib_names = ("libggml-cpu", "ggml-cpu", "libggml.", "libggml-base")
    assert not [n for n in names if n.startswith(lib_names)], sorted(names)
    elf = {p.name for p in bin_dir.iterdir() if is_elf(p)}
    assert not elf & {p.name for p in (bin_dir.parent / "lib").iterdir()}  # each library once


def check_server_runs(bin_dir: Path, tmp_path: Path) -> None:
    """--version with no LD_LIBRARY_PATH; the rpc server loads GGML_BACKEND_PATH's variant and only it."""
    variant = simplest_variant(bin_dir.parent / "lib").path
    proc = run_tool(bin_dir / "llama-server", variant, "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "version:" in proc.stdout + proc.stderr
    proc = run_tool(bin_dir / "ggml-rpc-server", variant, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = [line for line in (proc.stdout + proc.stderr).splitlines() if "loaded CPU backend" in line]
    assert loaded == [f"load_backend: loaded CPU backend from {variant}"], loaded


def venv_bin() -> Path:
    return ggml.lib_dir().parent / "bin"


def test_the_venv_has_the_server_tools_without_a_cpu_variant():
    check_server_folder(venv_bin())
    assert (venv_bin() / "LICENSE-llama.cpp").is_file()  # build/notices.py reads it beside the files


def test_every_library_the_venv_tools_need_is_found_through_their_runpath():
    package = venv_bin().parent
    for tool in sorted(p for p in venv_bin().iterdir() if is_elf(p)):
        # the host has its own libstdc++; a frozen runtime brings one (tests/test_freeze.py)
        mapped, missing = resolve(tool, GLIBC_LIBRARIES | {"libstdc++.so.6", "libgcc_s.so.1"})
        assert not missing, missing
        outside = [str(p) for p in mapped.values() if not p.is_relative_to(package.resolve())]
        assert not outside, outside
        llama = {n: p.parent for n, p in mapped.items() if n.startswith(("libllama.so", "libggml"))}
        assert set(llama.values()) <= {(package / "lib").resolve()}, llama


def test_the_venv_server_starts_with_an_empty_environment(tmp_path):
    check_server_runs(venv_bin(), tmp_path)
