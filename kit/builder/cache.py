"""The builder's cache folder: one function chooses it, for `kit build` and `kit lock` alike.

Inside it, sources/ holds what model sources download or assemble (sources/hf, sources/pypi):
`kit lock` hashes a file there and `kit build` then finds it instead of fetching it again. Likewise
knowledge/ holds Kiwix archives by SHA-256 (`<sha256>.zim`), their parts and the passage indexes.
The build keeps its own work beside them (freeze/, imported/, shards/).
"""

from __future__ import annotations

from pathlib import Path

import platformdirs

APP_NAME = "survival-kit"


def default_cache_dir() -> Path:
    """The user's cache folder for the kit: ~/.cache/survival-kit on Linux ($XDG_CACHE_HOME if set),
    ~/Library/Caches/survival-kit on macOS, under %LOCALAPPDATA% on Windows."""
    return Path(platformdirs.user_cache_dir(APP_NAME))


def sources_cache(cache_dir: Path) -> Path:
    """Where kit.builder.sources.fetch and compute_pin keep their files, in the cache `cache_dir`."""
    return Path(cache_dir) / "sources"


def knowledge_cache(cache_dir: Path) -> Path:
    """Where knowledge sources are downloaded, split and indexed (kit.builder.knowledge, kit lock)."""
    return Path(cache_dir) / "knowledge"
