"""Split a GGUF model into shards that llama.cpp loads from the first one.

FAT32 cannot hold a file of 4 GiB or more. The shards are exactly what llama.cpp's own
tools/gguf-split writes, so `llama_model_load` opens `<stem>-00001-of-0000N.gguf` and finds the
rest by name (src/llama.cpp `llama_split_path`, "%s-%05d-of-%05d.gguf"):
- shard 1 holds every metadata key of the source, then `split.no` (u16), `split.count` (u16) and
  `split.tensors.count` (i32); the other shards hold only the split keys (the loader checks
  `split.no` in each and the tensor total against `split.tensors.count`);
- every shard holds whole tensors in the source's order, each padded to the alignment.

The header is copied as raw bytes (nothing is decoded and re-encoded, so metadata cannot drift)
and tensor data is streamed in blocks: a 5 GB model never sits in memory. Shards are written
under temp names, fsync'd and renamed, and a sidecar JSON records which are complete, so a killed
build resumes without rewriting finished shards.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGUF_MAGIC, GGUFValueType, Keys

from kit.errors import BuildError, ManifestError
from kit.fsutil import atomic_write, atomic_writer
from kit.ggufmeta import read_header

SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO
SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT
SPLIT_TENSORS = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
ALIGNMENT_KEY = Keys.General.ALIGNMENT

MAX_SHARDS = 0xFFFF  # split.count is a u16
COPY_BLOCK = 8 << 20  # bytes per read while copying tensor data
RECORD_FORMAT = 1  # bump when the shard layout changes: old records then no longer match
_FIXED_HEADER = struct.Struct("<IIQQ")  # magic, version, tensor count, kv count
_HINT = "fetch the model again; its file is damaged or not a GGUF model"


@dataclass(frozen=True)
class _Tensor:
    name: str
    info: bytes  # its header record as in the source (name, dims, type), without the offset
    n_bytes: int
    src_offset: int  # where its data starts in the source file


@dataclass(frozen=True)
class _Source:
    version: int
    kvs: tuple[bytes, ...]  # raw key/type/value records, old split keys left out
    alignment_kv: bytes | None  # the general.alignment record: every shard needs it
    alignment: int
    tensors: tuple[_Tensor, ...]


@dataclass(frozen=True)
class _Shard:
    name: str
    header: bytes  # padded to the alignment
    tensors: tuple[_Tensor, ...]
    size: int


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def shard_name(stem: str, index: int, count: int) -> str:
    """llama.cpp's name for shard `index` (0-based) of `count`."""
    return f"{stem}-{index + 1:05d}-of-{count:05d}.gguf"


# ---------------------------------------------------------------- reading the source header

def _read_source(path: Path) -> _Source:
    """The source's records as raw bytes, found by kit.ggufmeta's bounded header reader."""
    try:
        header = read_header(path, keep_bytes=True)
    except ManifestError as err:
        raise BuildError(str(err), hint=_HINT) from err
    raw = header.raw
    kvs, alignment_kv = [], None
    for k in header.keys:
        record = raw[k.start:k.end]
        if k.key == ALIGNMENT_KEY:
            if k.type != GGUFValueType.UINT32:  # llama.cpp reads it with gguf_get_val_u32
                raise BuildError(f"{path.name}: {ALIGNMENT_KEY} is not a u32", hint=_HINT)
            alignment_kv = record
        if k.key == SPLIT_COUNT and k.type == GGUFValueType.UINT16 and k.value > 1:
            raise BuildError(f"{path.name} is one shard of an already split model",
                             hint="point the profile at the whole model, or at its first shard unsplit")
        if k.key not in (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS):
            kvs.append(record)
    if not header.tensors:
        raise BuildError(f"{path.name} holds no tensors", hint=_HINT)
    # a tensor's info record without its offset (the last 8 bytes): each shard writes its own
    tensors = tuple(_Tensor(t.name, raw[t.start:t.end - 8], t.n_bytes, header.data_start + t.offset)
                    for t in header.tensors)
    return _Source(header.version, tuple(kvs), alignment_kv, header.alignment, tensors)


# ---------------------------------------------------------------- planning the shards

def _kv_record(key: str, vtype: GGUFValueType, fmt: str, value: int) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I" + fmt, vtype, value)


def _split_kvs(index: int, count: int, n_tensors: int) -> list[bytes]:
    # the same keys, types and order as gguf-split; the loader reads them with strict types
    return [_kv_record(SPLIT_NO, GGUFValueType.UINT16, "H", index),
            _kv_record(SPLIT_COUNT, GGUFValueType.UINT16, "H", count),
            _kv_record(SPLIT_TENSORS, GGUFValueType.INT32, "i", n_tensors)]


def _shard_kvs(source: _Source, index: int, count: int) -> list[bytes]:
    """Shard 1 carries all metadata; the others carry the alignment (when not the default)."""
    own = list(source.kvs) if index == 0 else [source.alignment_kv] if source.alignment_kv else []
    return own + _split_kvs(index, count, len(source.tensors))


def _header(source: _Source, index: int, count: int, tensors: tuple[_Tensor, ...]) -> bytes:
    kvs = _shard_kvs(source, index, count)
    infos, offset = [], 0
    for t in tensors:
        infos.append(t.info + struct.pack("<Q", offset))
        offset += _pad(t.n_bytes, source.alignment)
    head = _FIXED_HEADER.pack(GGUF_MAGIC, source.version, len(tensors), len(kvs)) + b"".join(kvs + infos)
    return head + bytes(_pad(len(head), source.alignment) - len(head))


class _SizeCounter:
    """The size a shard would have, grown one tensor at a time (split keys have a fixed size)."""

    def __init__(self, source: _Source, first: bool):
        self.alignment = source.alignment
        self.header = _FIXED_HEADER.size + sum(len(kv) for kv in _shard_kvs(source, 0 if first else 1, 0))
        self.data = 0
        self.tensors: list[_Tensor] = []

    def size_with(self, t: _Tensor) -> int:
        header = self.header + len(t.info) + 8
        return _pad(header, self.alignment) + self.data + _pad(t.n_bytes, self.alignment)

    def add(self, t: _Tensor) -> None:
        self.header += len(t.info) + 8
        self.data += _pad(t.n_bytes, self.alignment)
        self.tensors.append(t)


def _smallest_limit(source: _Source) -> tuple[int, str]:
    """The least max_size that can split this model, and what needs it.

    Order is kept and no shard may be empty, so shard 1 needs the metadata plus the first tensor
    and every other tensor must fit alone; with that much, filling shards in order never fails.
    """
    first, *rest = source.tensors
    needs = [(_SizeCounter(source, first=True).size_with(first), f"the metadata with tensor {first.name}")]
    needs += [(_SizeCounter(source, first=False).size_with(t), f"tensor {t.name}") for t in rest]
    return max(needs, key=lambda need: need[0])


def _group(source: _Source, max_size: int) -> list[list[_Tensor]]:
    """Fill shards in the source's order, starting a new one when the next tensor would not fit."""
    groups, current = [], _SizeCounter(source, first=True)
    for t in source.tensors:
        if current.tensors and current.size_with(t) > max_size:
            groups.append(current.tensors)
            current = _SizeCounter(source, first=False)
        current.add(t)
    groups.append(current.tensors)
    return groups


def _plan(source: _Source, stem: str, src_name: str, max_size: int) -> list[_Shard]:
    least, what = _smallest_limit(source)
    if max_size < least:
        raise BuildError(f"{src_name} cannot be split into files of {max_size:,} bytes: {what} needs "
                         f"{least:,}, the smallest possible limit",
                         hint=f"use --max-file-size {least} or more, or a stick formatted as exFAT")
    groups = _group(source, max_size)
    if len(groups) > MAX_SHARDS:
        raise BuildError(f"{src_name} would need {len(groups)} shards; llama.cpp reads at most {MAX_SHARDS}",
                         hint="raise --max-file-size")
    shards = []
    for index, tensors in enumerate(groups):
        header = _header(source, index, len(groups), tuple(tensors))
        size = len(header) + sum(_pad(t.n_bytes, source.alignment) for t in tensors)
        shards.append(_Shard(shard_name(stem, index, len(groups)), header, tuple(tensors), size))
    return shards


# ---------------------------------------------------------------- writing, with a resume record

def _copy_range(src, offset: int, length: int, out) -> None:
    src.seek(offset)
    while length:
        chunk = src.read(min(COPY_BLOCK, length))
        if not chunk:
            raise BuildError(f"{Path(src.name).name} became shorter while it was split",
                             hint="leave the model file alone during `kit build`, then run it again")
        out.write(chunk)
        length -= len(chunk)


def _write_shard(src, shard: _Shard, alignment: int, path: Path) -> None:
    with atomic_writer(path) as out:
        out.write(shard.header)
        for t in shard.tensors:
            _copy_range(src, t.src_offset, t.n_bytes, out)
            out.write(bytes(_pad(t.n_bytes, alignment) - t.n_bytes))
        if out.tell() != shard.size:  # the plan promised this size against the limit
            raise BuildError(f"{path.name}: wrote {out.tell()} bytes, planned {shard.size}")


def _record_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}.split.json"


def _identity(src: Path, max_size: int) -> dict:
    """What decides the shards' bytes: the same identity means the same shards."""
    st = src.stat()
    return {"format": RECORD_FORMAT, "source": src.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "max_size": max_size}


def _stat_entry(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _finished_shards(record: Path, identity: dict) -> dict[str, dict]:
    """Shards a previous run finished for the same source and limit ({} when anything differs)."""
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("identity") != identity or not isinstance(data.get("shards"), dict):
        return {}
    return data["shards"]


def _is_finished(path: Path, entry: dict | None, planned_size: int) -> bool:
    # our own record of size + mtime: a shard rewritten or cut short by anything else is redone
    try:
        return isinstance(entry, dict) and entry.get("size") == planned_size and _stat_entry(path) == entry
    except OSError:
        return False


def _remove_stale(out_dir: Path, stem: str, keep: set[str]) -> None:
    """Shards of another plan (another limit or source) and temp files of a killed run."""
    pattern = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.gguf")
    for path in out_dir.iterdir():
        name = path.name
        if name.startswith(".") and name.endswith(".part"):  # kit.fsutil.temp_name: .NAME.PID-HEX.part
            name = re.sub(r"\.\d+-[0-9a-f]+$", "", name[1:-len(".part")])
        if pattern.fullmatch(name) and path.name not in keep:
            path.unlink(missing_ok=True)


def split_gguf(src: Path, out_dir: Path, max_size: int) -> list[Path]:
    """Split `src` into llama.cpp shards of at most `max_size` bytes each in `out_dir`.

    Returns the shard paths in order (load the first). A source that already fits is returned
    as it is. Shards finished by an earlier run with the same source and limit are kept.
    Raises BuildError when the source is not a GGUF model or a tensor cannot fit the limit.
    """
    src, out_dir = Path(src), Path(out_dir)
    if max_size <= 0:
        raise BuildError(f"the file size limit must be positive, got {max_size}", hint="fix --max-file-size")
    identity = _identity(src, max_size)  # before reading: a source changed later is not recorded as this one
    if identity["size"] <= max_size:
        return [src]
    source = _read_source(src)
    shards = _plan(source, src.stem, src.name, max_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir, src.stem, {s.name for s in shards})
    record = _record_path(out_dir, src.stem)
    finished = _finished_shards(record, identity)
    done = {}
    with open(src, "rb") as fh:
        for shard in shards:
            path = out_dir / shard.name
            if _is_finished(path, finished.get(shard.name), shard.size):
                done[shard.name] = finished[shard.name]
                continue
            _write_shard(fh, shard, source.alignment, path)
            done[shard.name] = _stat_entry(path)
            atomic_write(record, json.dumps({"identity": identity, "shards": done}, indent=1).encode())
    return [out_dir / s.name for s in shards]
