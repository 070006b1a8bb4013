"""Resumable HTTP downloads for the builder (Kiwix archives, several GiB each).

The bytes grow in `<dest>.part` across attempts and across runs: each request after the first
asks for the rest (`Range: bytes=N-`). Only a file whose SHA-256 matched its pin is renamed to
`dest`; a mismatch deletes the part, so the next run starts clean. Kiwix publishes each archive's
SHA-256 beside it (`<url>.sha256`: "hex  filename"), which `kit lock` reads instead of downloading.
The builder runs on a connected machine; the runtime on the stick never imports this module.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from kit import __version__
from kit.errors import SourceError
from kit.fsutil import fsync_dir
from kit.integrity import Digest, hash_file
from kit.units import human_bytes

CHUNK = 1 << 20
TIMEOUT = 60  # seconds without a byte before an attempt gives up
ATTEMPTS = 5  # an attempt that got bytes earns another; one that got none ends the download
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NETWORK_ERRORS = (OSError, http.client.HTTPException)  # urllib.error.URLError is an OSError

Report = Callable[[str], None]


def download(url: str, dest: Path, *, sha256: str | None, report: Report = lambda s: None) -> Digest:
    """Fetch `url` into `dest` (resuming a `.part` left by an earlier attempt) and return its digest.

    With `sha256`, bytes that do not match are deleted and refused (SourceError)."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, ATTEMPTS + 1):
        before = _size(part)
        if before:
            report(f"resuming the download of {url} at {human_bytes(before)}")
        try:
            _fetch_rest(url, part, _Milestones(report))
            break
        except _NETWORK_ERRORS as exc:
            if attempt == ATTEMPTS or _size(part) == before:
                raise SourceError(f"downloading {url} stopped after {human_bytes(_size(part))} ({_reason(exc)})",
                                  "check the address and your network, then run the same command again: "
                                  "it resumes where it stopped") from None
            time.sleep(attempt)  # a dropped connection often comes back in a moment
    digest = hash_file(part, sha256=True)
    if sha256 is not None and digest.sha256 != sha256:
        part.unlink()
        raise SourceError(f"{url}: expected sha256 {sha256}, got {digest.sha256}; the download was deleted",
                          "check where the file comes from; if it changed on purpose, `kit lock` re-pins it")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return digest


def published_sha256(url: str) -> str | None:
    """The SHA-256 published beside `url` (Kiwix's `<url>.sha256`), or None when there is none."""
    try:
        with urllib.request.urlopen(_request(f"{url}.sha256"), timeout=TIMEOUT) as response:
            text = response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        if exc.code in (403, 404, 410):
            return None
        raise SourceError(f"{url}.sha256: the server answered {exc.code} {exc.reason}") from None
    except _NETWORK_ERRORS as exc:
        raise SourceError(f"{url} cannot be reached ({_reason(exc)})", "check the address and your network") from None
    fields = text.split()
    if not fields or not _SHA256.fullmatch(fields[0].lower()):
        return None
    named = PurePosixPath(fields[1].lstrip("*")).name if len(fields) > 1 else None
    if named is not None and named != PurePosixPath(urllib.parse.urlsplit(url).path).name:
        raise SourceError(f"{url}.sha256 is the hash of another file ({named})",
                          "check the url; set sha256 by hand if the server's sidecar is wrong")
    return fields[0].lower()


class _Milestones:
    """A line at every tenth of a download whose size is known: an archive can take an hour."""

    def __init__(self, report: Report):
        self.report, self.next = report, 0.1

    def __call__(self, done: int, total: int | None) -> None:
        if total and done / total >= self.next:
            self.report(f"downloaded {human_bytes(done)} of {human_bytes(total)}")
            self.next = (int(done * 10 / total) + 1) / 10


def _fetch_rest(url: str, part: Path, on_progress: Callable[[int, int | None], None]) -> None:
    """Append what `part` still lacks (everything when the server ignores the range)."""
    have = _size(part)
    try:
        response = urllib.request.urlopen(_request(url, start=have), timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after `have`: the part holds every byte already
            return
        raise
    with response:
        resuming = have > 0 and response.status == 206
        if resuming and not _range_starts_at(response.headers.get("Content-Range", ""), have):
            raise http.client.HTTPException(f"the server sent another range than bytes {have}-")
        length = response.headers.get("Content-Length", "")
        expected = int(length) if length.isdigit() else None
        start = have if resuming else 0
        received = 0
        with open(part, "ab" if resuming else "wb") as fh:
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                received += len(chunk)
                on_progress(start + received, None if expected is None else start + expected)
            fh.flush()
            os.fsync(fh.fileno())
    # http.client returns b"" when the connection drops early, so the length is checked here
    if expected is not None and received < expected:
        raise ConnectionError(f"the connection closed after {received} of {expected} bytes")


def _request(url: str, start: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": f"survival-kit/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.Request(url, headers=headers)


def _range_starts_at(content_range: str, start: int) -> bool:
    match = re.match(r"bytes (\d+)-", content_range.strip())
    return match is not None and int(match[1]) == start


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"the server answered {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", None) or exc
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__
