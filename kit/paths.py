"""Where things are: the stick's root, its KIT/ folder, the state folder.

The one place KIT_* environment variables are read:
  KIT_BUNDLE     the stick (folder holding KIT/) or KIT/ itself
  KIT_STATE_DIR  where state goes instead of KIT/state (tests; never the host by default)
  KIT_DEBUG      show tracebacks
"""

from __future__ import annotations

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


def find_bundle(explicit: str | Path | None = None) -> BundlePaths:
    """The stick to use: an explicit path, else KIT_BUNDLE, else the frozen runtime's own stick."""
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("the path given", Path(explicit)))
    elif os.environ.get("KIT_BUNDLE"):
        candidates.append(("KIT_BUNDLE", Path(os.environ["KIT_BUNDLE"])))
    else:
        found = frozen_bundle()
        if found:
            return found
    for origin, path in candidates:
        found = _as_bundle(path.expanduser().absolute())
        if found:
            return found
        raise BundleNotFoundError(f"{path} ({origin}) is not a stick: it holds no {KIT_DIRNAME}/ folder")
    raise BundleNotFoundError("no stick given")


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
