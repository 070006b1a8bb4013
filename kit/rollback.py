"""Rollback: a stick never goes back to an older bundle.json than one it has already run.

The runtime keeps, in the stick's state/ (when writable), the newest (created, schema_version,
BLAKE3 of bundle.json) it has run. A bundle.json created earlier, or of a lower schema, is a
replay of an old (maybe vulnerable) stick and is refused. A read-only stick records nothing.

The record is written to a unique temp name, fsynced and renamed: two kits started from one stick
at once leave one whole record or the other, never a mix.

Part of the pure core: no printing.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import blake3

from kit.errors import IntegrityError, ManifestError
from kit.fsutil import atomic_write
from kit.manifest import STATE_DIRNAME
from kit.paths import BundlePaths

RECORD_NAME = "newest-bundle.json"
MAX_RECORD = 4096


class RollbackError(IntegrityError):
    """bundle.json is older than one this stick has already run."""

    hint = ("this is an older copy of the stick than one already run from it (a replay of an old, maybe "
            f"vulnerable, build); use the newest build. Restored it on purpose? delete KIT/state/{RECORD_NAME}")


@dataclass(frozen=True)
class Seen:
    created: str  # ISO 8601, as in bundle.json
    schema_version: int
    blake3: str  # of bundle.json's exact bytes

    @classmethod
    def of(cls, raw: bytes) -> Seen:
        """The identity of a bundle.json (already parsed and validated once by kit.manifest)."""
        try:
            data = json.loads(raw)
            created, schema = data["created"], data["schema_version"]
        except (ValueError, KeyError, TypeError):
            raise ManifestError("bundle.json has no readable created date or schema_version") from None
        if not isinstance(schema, int) or isinstance(schema, bool) or not isinstance(created, str):
            raise ManifestError("bundle.json: created must be a date string and schema_version an integer")
        _when(created, "bundle.json")
        return cls(created, schema, blake3.blake3(raw).hexdigest())

    @property
    def when(self) -> dt.datetime:
        return _when(self.created, "the record")


def _when(created: str, where: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(created)
    except ValueError:
        raise ManifestError(f"{where}: created {created!r} is not an ISO 8601 date") from None
    if moment.tzinfo is None:
        raise ManifestError(f"{where}: created {created!r} has no time zone (the kit writes UTC, ending in Z)")
    return moment


def read_record(state: Path | None) -> Seen | None:
    """The newest bundle this stick has run, or None (first run, read-only stick, unreadable record)."""
    if state is None:
        return None
    try:
        raw = (state / RECORD_NAME).read_bytes()[:MAX_RECORD]
        data = json.loads(raw)
        seen = Seen(str(data["created"]), int(data["schema_version"]), str(data["blake3"]))
        seen.when  # noqa: B018 - validates the date
        return seen
    except (OSError, ValueError, KeyError, TypeError, ManifestError):
        return None  # a damaged record protects nothing; the next run writes a good one


def write_record(state: Path, seen: Seen) -> None:
    """kit.fsutil.atomic_write: a temp name unique to this writer, fsync, rename, fsync the folder."""
    atomic_write(state / RECORD_NAME, json.dumps(asdict(seen), indent=2, sort_keys=True).encode() + b"\n")


def check(state: Path | None, raw: bytes, *, record: bool = True) -> Seen | None:
    """Refuse a bundle.json older than the newest this stick has run; then remember this one.

    Returns the record found before (None on a first run). `record=False` only checks (kit verify).
    """
    current = Seen.of(raw)
    newest = read_record(state)
    if newest is not None:
        if current.schema_version < newest.schema_version:
            raise RollbackError(f"bundle.json has schema_version {current.schema_version}, older than "
                                f"{newest.schema_version}, which this stick has already run")
        if current.when < newest.when:
            raise RollbackError(f"bundle.json was created {current.created}, before {newest.created}, "
                                "which this stick has already run")
    if record and state is not None and current != newest:
        try:
            write_record(state, current)
        except OSError:
            pass  # the stick turned read-only or full: the check still held for this run
    return newest


def check_bundle(bundle: BundlePaths, raw: bytes, state: Path | None, *, record: bool = True) -> Seen | None:
    """`check` for a stick, with `state` from kit.paths.state_dir (None: not writable). A read-only
    stick's record is still read from KIT/state, though nothing new can be written there."""
    return check(state or bundle.kit / STATE_DIRNAME, raw, record=record and state is not None)
