"""The third-party notices of a frozen runtime, from what PyInstaller actually bundled.

Run by build/base.py right after the freeze, by the Python that froze (it knows the installed
distributions):

  python build/notices.py DIST/kit WORK/kit

Every bundled file (COLLECT-00.toc) and every module in the archive (PYZ-00.toc) is traced to the
component it came from: a Python distribution (its licence files), llama.cpp (its LICENSE, copied
beside the libraries by the llama step), CPython (its LICENSE.txt), this kit (LICENSE), the
PyInstaller bootloader, or a Debian package of the build root (/usr/share/doc/PKG/copyright).
A file whose licence cannot be found stops the build: a stick redistributes every one of them.
Writes THIRD-PARTY-NOTICES.txt (for people) and notices.json (component -> bundled files, for the
tests) into the runtime folder.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

KIT_ROOT = Path(__file__).resolve().parent.parent
LICENCE_NAME = re.compile(r"(^|/)(LICEN[CS]E|COPYING|NOTICE|AUTHORS)[^/]*$", re.I)
LLAMA_LICENCE = "LICENSE-llama.cpp"  # written beside the llama step's libraries (build/base.py)
VULKAN_LOADER_LICENCE = "LICENSE-vulkan-loader"  # beside the carried Vulkan loader (build/base.py)


@dataclass
class Component:
    name: str
    version: str
    licence_files: list[Path]
    files: set[str] = field(default_factory=set)

    def licence_text(self) -> str:
        return "\n\n".join(p.read_text(errors="replace").strip() for p in self.licence_files)


STRIPPED_MAP = "stripped.json"  # {stripped copy: original}, written by build/kit.spec


def read_toc(path: Path) -> list[tuple]:
    """A PyInstaller .toc file: a Python literal, optionally after a header line."""
    text = path.read_text()
    start = min(i for i in (text.find("["), text.find("(")) if i >= 0)
    value = ast.literal_eval(text[start:])
    return list(value[-1] if isinstance(value, tuple) and isinstance(value[-1], list) else value)


def _resolved(path: str | Path) -> str:
    return os.path.realpath(path)


class Tracer:
    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch  # licence texts taken from metadata are written here (the work folder)
        self.components: dict[str, Component] = {}
        self.by_file: dict[str, importlib.metadata.Distribution] = {}
        for dist in importlib.metadata.distributions():
            for f in dist.files or ():
                self.by_file.setdefault(_resolved(dist.locate_file(f)), dist)
        self.stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
        self.prefix = Path(sys.base_prefix).resolve()

    def component(self, name: str, version: str, licences: list[Path]) -> Component:
        if name not in self.components:
            self.components[name] = Component(name, version, licences)
        return self.components[name]

    def dist_component(self, dist: importlib.metadata.Distribution) -> Component:
        name = dist.metadata["Name"]
        licences = []
        for f in dist.files or ():
            if LICENCE_NAME.search(str(f)) and ".dist-info/" in f"/{f}".replace("\\", "/"):
                licences.append(Path(dist.locate_file(f)))
        if not licences:  # some wheels keep the licence only in the metadata text
            text = dist.metadata.get("License-Expression") or dist.metadata.get("License") or ""
            if text.strip():
                self.scratch.mkdir(parents=True, exist_ok=True)
                licences.append(self.scratch / f"{name}-LICENSE.txt")
                licences[-1].write_text(text)
        return self.component(name, dist.version, licences)

    def is_cpython(self, path: Path) -> bool:
        """The stdlib, its extension modules and libpython; not the system libraries beside them
        (a Debian Python's prefix is /usr: its libz is zlib's, not the PSF's)."""
        return (path.is_relative_to(self.stdlib) or path.name.startswith("libpython")
                or path.name == "base_library.zip")  # PyInstaller's archive of the stdlib's core modules

    def trace(self, source: str, typecode: str) -> Component | None:
        real = _resolved(source)
        if typecode == "EXECUTABLE":
            return self.dist_component(importlib.metadata.distribution("pyinstaller"))
        dist = self.by_file.get(real) or self.by_file.get(os.path.abspath(source))
        if dist is not None:
            return self.dist_component(dist)
        path = Path(real)
        if (path.parent / LLAMA_LICENCE).is_file():  # llama_cpp/lib: libllama.so, ggml.dll ...
            return self.component("llama.cpp / ggml", "", [path.parent / LLAMA_LICENCE])
        if (path.parent / VULKAN_LOADER_LICENCE).is_file():  # llama_cpp/lib/vulkan: the carried loader
            return self.component("Vulkan loader (Debian package libvulkan1)", "",
                                  [path.parent / VULKAN_LOADER_LICENCE])
        if path.is_relative_to(KIT_ROOT):
            return self.component("Survival Kit", "", [KIT_ROOT / "LICENSE"])
        if self.is_cpython(path):
            return self.component("CPython", sys.version.split()[0], [self.stdlib / "LICENSE.txt"])
        package = debian_package(real) or debian_package(source)
        if package:
            copyright_file = Path("/usr/share/doc") / package.split(":")[0] / "copyright"
            if copyright_file.is_file():
                return self.component(f"Debian package {package}", "", [copyright_file])
        return None


def debian_package(path: str) -> str | None:
    """The Debian package that installed path (merged /usr: try both spellings)."""
    candidates = [path]
    if path.startswith("/usr/lib/"):
        candidates.append(path[len("/usr"):])
    elif path.startswith("/lib/"):
        candidates.append("/usr" + path)
    for candidate in candidates:
        try:
            out = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0 and ":" in out.stdout:
            return out.stdout.split(": ", 1)[0].split(",")[0].strip()
    return None


def main(dist_dir: Path, work_dir: Path) -> int:
    tracer = Tracer(work_dir / "licences")
    missing = []
    # build/kit.spec bundles stripped copies of some libraries: each is traced as its original
    stripped = work_dir / STRIPPED_MAP
    originals = json.loads(stripped.read_text()) if stripped.is_file() else {}
    for dest, source, typecode in read_toc(work_dir / "COLLECT-00.toc"):
        if typecode in ("SYMLINK", "DEPENDENCY") or not source:
            continue
        found = tracer.trace(originals.get(source, source), typecode)
        if found is None or not all(p.is_file() for p in found.licence_files):
            missing.append(f"{dest} (from {source})")
        else:
            found.files.add(dest)
    for name, source, _typecode in read_toc(work_dir / "PYZ-00.toc"):
        if not source or source == "-":
            continue
        found = tracer.trace(source, "PYMODULE")
        if found is None:
            missing.append(f"module {name} (from {source})")
        else:
            found.files.add(f"module:{name}")
    if missing:
        print("notices: no licence found for:\n  " + "\n  ".join(sorted(missing)[:40]), file=sys.stderr)
        return 1
    components = sorted(tracer.components.values(), key=lambda c: c.name.lower())
    parts = ["Third-party software in this runtime, with the licence each is distributed under.",
             "Generated when the runtime was frozen, from the files actually bundled.", ""]
    for c in components:
        parts += ["=" * 78, f"{c.name} {c.version}".strip(), f"({len(c.files)} bundled files or modules)",
                  "-" * 78, c.licence_text(), ""]
    (dist_dir / "THIRD-PARTY-NOTICES.txt").write_text("\n".join(parts) + "\n")
    index = {"components": [{"name": c.name, "version": c.version, "files": sorted(c.files),
                             "licence_bytes": len(c.licence_text().encode())} for c in components]}
    (dist_dir / "notices.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"notices: {len(components)} components, THIRD-PARTY-NOTICES.txt written")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
