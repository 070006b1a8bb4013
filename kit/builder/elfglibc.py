"""The newest glibc a set of ELF files asks for: the oldest Linux a runtime starts on.

Every dynamically linked ELF file lists, per library it needs, the symbol versions it binds to
(GLIBC_2.17, GLIBC_2.34 ...: its .gnu.version_r section). The loader refuses a file that asks for
a version the host's glibc lacks, so the highest GLIBC_x.y over all files of a runtime is its
floor. Read with pyelftools; files that are not ELF are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection

_GLIBC = re.compile(r"^GLIBC_(\d+)\.(\d+)(?:\.(\d+))?$")
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True, order=True)
class GlibcNeed:
    version: tuple[int, int, int]
    path: str  # the file asking for it, relative to the folder

    @property
    def text(self) -> str:
        major, minor, patch = self.version
        return f"{major}.{minor}" + (f".{patch}" if patch else "")


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def glibc_versions(path: Path) -> set[tuple[int, int, int]]:
    """The GLIBC_x.y versions one ELF file binds to (none for a static or non-glibc file)."""
    found = set()
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for section in elf.iter_sections():
                if not isinstance(section, GNUVerNeedSection):
                    continue
                for _library, auxiliaries in section.iter_versions():
                    for aux in auxiliaries:
                        match = _GLIBC.match(aux.name)
                        if match:
                            found.add(tuple(int(g or 0) for g in match.groups()))
    except ELFError:
        return set()
    return found


def glibc_needs(folder: Path, files: list[str]) -> list[GlibcNeed]:
    """Per ELF file under folder (relative '/'-paths), the newest glibc version it asks for."""
    needs = []
    for rel in files:
        path = folder.joinpath(*rel.split("/"))
        if is_elf(path):
            versions = glibc_versions(path)
            if versions:
                needs.append(GlibcNeed(max(versions), rel))
    return needs


def glibc_floor(folder: Path, files: list[str]) -> GlibcNeed | None:
    """The highest glibc version any file asks for, and the first file that asks for it."""
    needs = glibc_needs(folder, files)
    return min(needs, key=lambda n: (tuple(-v for v in n.version), n.path)) if needs else None
