"""Where things are: the stick's root, its KIT/ folder, the state folder.

The one place KIT_* environment variables are read:
  KIT_BUNDLE     the stick (folder holding KIT/) or KIT/ itself
  KIT_STATE_DIR  where state goes instead of KIT/state (tests; never the host by default)
  KIT_DEBUG      show tracebacks
  KIT_LAUNCHER   the stick's launcher that started the runtime (it exports its own name)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kit.errors import BundleNotFoundError

KIT_DIRNAME = "KIT"
MANIFEST_NAME = "bundle.json"


@dataclass(frozen=True)
class BundlePaths:
    root: Path  # the stick: launchers and README.txt
    kit: Path  # root / KIT: everything bundle.json describes

    @property
    def manifest(self) -> Path:
        return self.kit / MANIFEST_NAME

    @property
    def incomplete_marker(self) -> Path:
        return self.kit / "INCOMPLETE"

    def resolve(self, relpath: str) -> Path:
        """A manifest path (already validated by kit.manifest) as a real path."""
        return self.kit.joinpath(*relpath.split("/"))


RUNTIME_MANIFEST = "kit-runtime.json"  # in each runtime folder: its platform, files and glibc floor


def runtime_glibc(runtime_folder: Path) -> str | None:
    """The newest glibc the runtime's files ask for, as its kit-runtime.json records it, if known.

    Read by the builder (README.txt) and by doctor; the launcher reads the same key with sed."""
    try:
        info = json.loads((runtime_folder / RUNTIME_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    need = info.get("glibc") if isinstance(info, dict) else None
    return need if isinstance(need, str) else None


def launcher_name() -> str | None:
    """The launcher that started this runtime, as it names itself (KIT_LAUNCHER), if any."""
    return os.environ.get("KIT_LAUNCHER") or None


def debug_enabled() -> bool:
    return os.environ.get("KIT_DEBUG", "") not in ("", "0")


def _as_bundle(path: Path) -> BundlePaths | None:
    if (path / KIT_DIRNAME).is_dir():
        return BundlePaths(root=path, kit=path / KIT_DIRNAME)
    if path.name == KIT_DIRNAME and path.is_dir():
        return BundlePaths(root=path.parent, kit=path)
    return None


def frozen_bundle() -> BundlePaths | None:
    """A frozen runtime lives at STICK/KIT/runtimes/<os>-<arch>/: the stick is found from there."""
    if not getattr(sys, "frozen", False):
        return None
    exe = Path(sys.executable).resolve()
    return _as_bundle(exe.parents[2]) if len(exe.parents) > 2 else None


def enclosing_bundle(start: Path) -> BundlePaths | None:
    """The stick a folder is in (the folder itself or one above it), as git finds its repository.
    Only a KIT/ folder with a manifest (or a build's INCOMPLETE marker) counts: any folder may
    happen to be called KIT."""
    start = start.absolute()
    for folder in (start, *start.parents):
        found = _as_bundle(folder)
        if found and (found.manifest.is_file() or found.incomplete_marker.is_file()):
            return found
    return None


def find_bundle(explicit: str | Path | None = None) -> BundlePaths:
    """The stick to use: an explicit path, else KIT_BUNDLE, else the frozen runtime's own stick,
    else the stick the working folder is in."""
    if explicit:
        origin, path = "the path given", Path(explicit)
    elif os.environ.get("KIT_BUNDLE"):
        origin, path = "KIT_BUNDLE", Path(os.environ["KIT_BUNDLE"])
    else:
        found = frozen_bundle() or _enclosing_cwd()
        if found:
            return found
        raise BundleNotFoundError("no stick given, and the current folder is not on a stick")
    found = _as_bundle(path.expanduser().absolute())
    if found:
        return found
    raise BundleNotFoundError(f"{path} ({origin}) is not a stick: it holds no {KIT_DIRNAME}/ folder")


def _enclosing_cwd() -> BundlePaths | None:
    try:
        return enclosing_bundle(Path.cwd())
    except OSError:  # the working folder was removed (a stick pulled out under a shell)
        return None


def state_dir(bundle: BundlePaths) -> Path | None:
    """Where history, probe cache and settings go: on the stick, or nowhere (memory only).

    Never the host's home: the kit leaves no trace on a borrowed laptop.
    """
    override = os.environ.get("KIT_STATE_DIR")
    target = Path(override) if override else bundle.kit / "state"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return None
    return target
