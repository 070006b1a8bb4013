"""Where a ZIM archive may be cut into parts for FAT32 without breaking its search.

libzim reads a split archive (NAME.zimaa, NAME.zimab, ...) as one, except its two search indexes:
the full-text and the title index are Xapian databases stored whole inside the archive, which
libzim hands Xapian as (file, offset) — an index cut in two is unusable, and search then finds
nothing (measured: a 60 KB archive cut every 20 KB lost both). So the cuts go before such an item
when one would fall inside it. The items are found by reading the archive's own structures
(openzim's format: header, path pointer list, dirents, cluster pointers, blob offsets), with a
binary search over the sorted paths: a few dozen small reads even for Wikipedia.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

MAGIC = 72173914
# The Xapian databases libzim opens by offset (namespace X in the "new namespace" scheme).
INDEX_ITEMS = ((b"X", b"fulltext/xapian"), (b"X", b"title/xapian"))
_UNCOMPRESSED = (0, 1)
_EXTENDED = 0x10
_REDIRECT_TYPES = (0xFFFF, 0xFFFE, 0xFFFD)


class ZimFormatError(ValueError):
    """The file is not a ZIM archive this reader understands."""


def _read(fh: BinaryIO, offset: int, size: int) -> bytes:
    fh.seek(offset)
    data = fh.read(size)
    if len(data) != size:
        raise ZimFormatError(f"archive ends at {offset + len(data)}, inside a structure")
    return data


def _dirent_key(fh: BinaryIO, offset: int) -> tuple[tuple[bytes, bytes], int, int, int]:
    """((namespace, path), mimetype, cluster, blob) of the dirent at `offset`."""
    head = _read(fh, offset, 16)
    mimetype, _param_len, namespace = struct.unpack_from("<HB1s", head)
    fixed = 12 if mimetype in _REDIRECT_TYPES else 16
    cluster, blob = (0, 0) if mimetype in _REDIRECT_TYPES else struct.unpack_from("<II", head, 8)
    fh.seek(offset + fixed)
    tail = fh.read(4096)  # a path is far shorter; near the end of the file, what is left
    if b"\0" not in tail:
        raise ZimFormatError(f"the entry at {offset} has no end to its path")
    path = tail.split(b"\0", 1)[0]
    return (namespace, path), mimetype, cluster, blob


def index_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the archive's search indexes (none when it has none)."""
    with open(path, "rb") as fh:
        header = _read(fh, 0, 80)
        magic, _major, _minor = struct.unpack_from("<IHH", header)
        if magic != MAGIC:
            raise ZimFormatError("not a ZIM archive (bad magic number)")
        entries, clusters = struct.unpack_from("<II", header, 24)
        path_ptr, _title_ptr, cluster_ptr = struct.unpack_from("<QQQ", header, 32)
        ranges = []
        for key in INDEX_ITEMS:
            found = _find(fh, path_ptr, entries, key)
            if found is None:
                continue
            mimetype, cluster, blob = found
            if mimetype in _REDIRECT_TYPES or cluster >= clusters:
                continue
            blob_range = _blob_range(fh, cluster_ptr, cluster, blob)
            if blob_range is not None:
                ranges.append(blob_range)
        return sorted(ranges)


def _find(fh: BinaryIO, path_ptr: int, entries: int, key: tuple[bytes, bytes]):
    low, high = 0, entries
    while low < high:
        middle = (low + high) // 2
        (offset,) = struct.unpack("<Q", _read(fh, path_ptr + 8 * middle, 8))
        found, mimetype, cluster, blob = _dirent_key(fh, offset)
        if found == key:
            return mimetype, cluster, blob
        if found < key:
            low = middle + 1
        else:
            high = middle
    return None


def _blob_range(fh: BinaryIO, cluster_ptr: int, cluster: int, blob: int) -> tuple[int, int] | None:
    """Where blob `blob` of cluster `cluster` lies in the file, for an uncompressed cluster."""
    (start,) = struct.unpack("<Q", _read(fh, cluster_ptr + 8 * cluster, 8))
    info = _read(fh, start, 1)[0]
    if info & 0x0F not in _UNCOMPRESSED:
        return None  # compressed: libzim reads it through its cache, never by offset
    width = 8 if info & _EXTENDED else 4
    code = "Q" if width == 8 else "I"
    data_start = start + 1
    (first,) = struct.unpack("<" + code, _read(fh, data_start, width))
    count = first // width - 1
    if not 0 <= blob < count:
        return None
    begin, end = struct.unpack("<" + code * 2, _read(fh, data_start + width * blob, 2 * width))
    return data_start + begin, data_start + end


def cut_points(size: int, max_part: int, keep_whole: list[tuple[int, int]]) -> list[int]:
    """Offsets where the parts begin (after the first), each part at most `max_part` bytes; a cut
    that would fall inside a range of `keep_whole` moves back to that range's start when the part
    before it stays non-empty. A range longer than a part cannot be kept whole."""
    if max_part <= 0:
        raise ValueError("a part must hold at least one byte")
    cuts, start = [], 0
    while size - start > max_part:
        cut = start + max_part
        for begin, end in keep_whole:
            if begin < cut < end and begin > start and end - begin <= max_part:
                cut = begin
        cuts.append(cut)
        start = cut
    return cuts


def broken_ranges(cuts: list[int], keep_whole: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges a cut falls inside (an index bigger than a part): its search will not work."""
    return [(b, e) for b, e in keep_whole if any(b < c < e for c in cuts)]
