"""`kit lock`: pin every model source and Kiwix archive of a profile, in place, keeping the user's
comments.

An `hf` source's branch or tag becomes the commit it points at now, and every source gets the
sha256 of its file (the Hub's LFS sha256, or the hash of the local or assembled file). A `zim`
knowledge source gets the sha256 of its archive: a local file is hashed; a url's comes from the
`.sha256` file Kiwix publishes beside each archive, else the archive is downloaded (into the cache
`kit build` reads) and hashed. The TOML is edited with tomlkit, so comments and layout survive,
and replaced atomically. Running it again on a locked profile changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, MutableMapping
from dataclasses import replace
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError

from kit.builder.cache import default_cache_dir, knowledge_cache, sources_cache
from kit.builder.download import download, published_sha256
from kit.builder.sources import HfSource, Source, compute_pin, parse_source, resolve_hf
from kit.errors import ManifestError, SourceError
from kit.fsutil import atomic_write
from kit.integrity import hash_file
from kit.manifest import ProfileKnowledge

SourceTable = MutableMapping[str, object]  # a tomlkit table: edits keep the file's comments


def lock_profile(path: Path, *, cache_dir: Path | None = None) -> list[str]:
    """Pin the profile at `path`; return one human line per model whose pins changed.

    `cache_dir` is the builder's cache (kit.builder.cache; default: the user's): what lock downloads
    or assembles to hash it lands where `kit build` looks for it, so the build reuses it. The file
    is rewritten only when something changed.
    """
    path = Path(path)
    document = _parse(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = sources_cache(root)
    lines = []
    for model_id, table in _source_tables(document, path):
        source = parse_source(table, profile_dir=path.parent, model_id=model_id)
        changes = _apply(table, source, _current_pins(source, cache))
        if changes:
            lines.append(f"{model_id}: {', '.join(changes)}")
    for entry, table in _archive_tables(document, path):
        changes = _apply(table, entry, {"sha256": _archive_pin(entry, path.parent, knowledge_cache(root))})
        if changes:
            lines.append(f"knowledge {entry.id}: {', '.join(changes)}")
    if lines:
        _write_atomically(path, tomlkit.dumps(document))
    return lines


def _parse(path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ManifestError(f"no profile at {path}", hint="pass the path of a profile .toml") from error
    except TOMLKitError as error:
        raise ManifestError(f"{path.name} is not valid TOML: {str(error).splitlines()[0]}") from error


def _source_tables(document: tomlkit.TOMLDocument, path: Path) -> Iterator[tuple[str, SourceTable]]:
    models = document.get("models")
    if not isinstance(models, list) or not models:
        raise ManifestError(f"{path.name} has no models; add a [[models]] table with an id")
    for index, model in enumerate(models, start=1):
        model_id = str(model.get("id", f"#{index}")) if isinstance(model, dict) else f"#{index}"
        source = model.get("source") if isinstance(model, dict) else None
        if not isinstance(source, dict):
            raise ManifestError(
                f"model {model_id!r} in {path.name} has no source; add [models.source] with kind"
            )
        yield model_id, source


def _archive_tables(document: tomlkit.TOMLDocument, path: Path) -> Iterator[tuple[ProfileKnowledge, SourceTable]]:
    """The profile's `[[knowledge]]` tables of kind zim (documents have nothing to pin), checked as
    `kit build` checks them."""
    entries = document.get("knowledge", [])
    if not isinstance(entries, list):
        raise ManifestError(f"{path.name}: knowledge must be a list of [[knowledge]] tables")
    for index, table in enumerate(entries, start=1):
        plain = table.unwrap() if hasattr(table, "unwrap") else table
        entry = ProfileKnowledge.parse(plain, f"{path.name} knowledge {index}")
        if entry.kind == "zim":
            yield entry, table


def _archive_pin(entry: ProfileKnowledge, profile_dir: Path, cache: Path) -> str:
    """The sha256 a zim source should be pinned to now. A url already pinned, with no published
    hash to compare with, keeps its pin: downloading gigabytes only to confirm it would change nothing."""
    if entry.path is not None:
        archive = profile_dir / entry.path
        if not archive.is_file():
            raise SourceError(f"knowledge {entry.id}: {archive} is not a file",
                              "fix `path` in the profile (relative paths start at the profile's folder)")
        return hash_file(archive, sha256=True).sha256
    published = published_sha256(entry.url)
    if published is not None or entry.sha256 is not None:
        return published or entry.sha256
    # Named by the url until its hash is known, then by the hash, where `kit build` looks for it.
    pending = cache / f"url-{hashlib.sha256(entry.url.encode()).hexdigest()[:32]}.zim"
    digest = download(entry.url, pending, sha256=None)
    os.replace(pending, cache / f"{digest.sha256}.zim")
    return digest.sha256


def _current_pins(source: Source, cache_dir: Path) -> dict[str, str]:
    """What the source's pins should say now: key in [models.source] -> value."""
    if not isinstance(source, HfSource):
        return {"sha256": compute_pin(source, cache_dir)}
    commit, lfs_sha256 = resolve_hf(source)
    if lfs_sha256 is None:  # a file kept in git, not LFS: the Hub states no sha256, so hash it
        lfs_sha256 = compute_pin(replace(source, revision=commit), cache_dir)
    return {"revision": commit, "sha256": lfs_sha256}


def _apply(table: SourceTable, source: Source | ProfileKnowledge, pins: dict[str, str]) -> list[str]:
    """Write the pins that differ into the table; describe each change for the user."""
    changes = []
    for key, new in pins.items():
        old = getattr(source, key)
        if old == new:
            continue
        table[key] = new
        if key == "sha256" and old is None:
            changes.append("sha256 set")
        else:
            changes.append(f"{key} {_short(old)} → {_short(new)}")
    return changes


def _short(value: str) -> str:
    return f"{value[:12]}…" if len(value) >= 40 else value


def _write_atomically(path: Path, text: str) -> None:
    """kit.fsutil.atomic_write, keeping the profile's permissions and the platform's line endings."""
    data = text.replace("\n", os.linesep).encode("utf-8")
    atomic_write(path, data, mode=stat.S_IMODE(path.stat().st_mode))
