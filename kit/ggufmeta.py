"""GGUF header -> ModelFacts: what the planner and the memory estimate (kit.estimate) know of a model.

Part of the pure core: no llama_cpp, no textual, no printing.

The header is walked by a small bounded reader of our own instead of `gguf.GGUFReader`:
- the file comes from a stick (or a download) of unknown origin, so every count and length is
  checked against fixed limits and against the bytes the file really has *before* anything is
  allocated or iterated (GGUFReader loops `array length` times even when the file ends long
  before);
- GGUFReader builds one numpy view per vocabulary entry: 13 s for Gemma 3 270M's 262k-token
  vocabulary on the build machine, at every start. This walk skips what it does not need (< 1 s).
`read_header` is that walk, for the facts here and for kit.builder.split, which copies the
records it finds as they are. The `gguf` package still gives the format's enums and block sizes,
and the tests check this reader against GGUFReader on the real model.
"""

from __future__ import annotations

import mmap
import re
import stat
import struct
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGMLQuantizationType,
    GGUFValueType,
    LlamaFileType,
)

from kit.errors import ManifestError
from kit.units import MiB

# --- limits for a hostile header -------------------------------------------------------------

MAX_TENSORS = 100_000  # the largest real models hold a few thousand tensors
MAX_KV = 100_000  # real files hold a few dozen keys
MAX_KEY_LEN = 4096  # keys are dotted names ("gemma3.attention.head_count")
MAX_STRING_LEN = 64 * MiB  # chat templates are KBs; tokenizer.huggingface.json a few MB
MAX_ARRAY_LEN = 16 * 1024 * 1024  # vocabularies and merges are < 1M entries
MAX_TENSOR_NAME = 64  # GGML_MAX_NAME in ggml.h
MAX_DIMS = 4  # GGML_MAX_DIMS
KEEP_ARRAY_LEN = 4096  # arrays up to this length are kept (per-layer values); longer: only counted

SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit lengths
_FIXED_HEADER = 24  # magic u32, version u32, tensor_count u64, kv_count u64
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 4 + 8  # name length, 1-byte name, n_dims, type, offset

_HINT = "the model file is damaged or is not a GGUF model; copy the stick again from a good one"

_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")

_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("B", 1),
    GGUFValueType.INT8: ("b", 1),
    GGUFValueType.UINT16: ("H", 2),
    GGUFValueType.INT16: ("h", 2),
    GGUFValueType.UINT32: ("I", 4),
    GGUFValueType.INT32: ("i", 4),
    GGUFValueType.FLOAT32: ("f", 4),
    GGUFValueType.BOOL: ("?", 1),
    GGUFValueType.UINT64: ("Q", 8),
    GGUFValueType.INT64: ("q", 8),
    GGUFValueType.FLOAT64: ("d", 8),
}

# Sliding-window attention: which layers use the window, as llama.cpp decides it
# (vendor/llama.cpp/src/models/<arch>.cpp in llama-cpp-python 0.3.36 calls
# `load_swa_pattern(ml, n_pattern, dense_first)`, llama-model.cpp: a per-layer bool array in
# `<arch>.attention.sliding_window_pattern` wins, else that key as a period, else the default
# period; llama-hparams.cpp `set_swa_pattern`: dense_first=False -> layer il is SWA when
# il % n < n - 1 (Gemma 3: layers 5, 11, 17, ... are global); dense_first=True -> SWA when
# il % n != 0; n == 0 -> every layer SWA).
# arch -> (default period, dense_first, window when the key is absent (0: no SWA without it)).
# An architecture not listed is treated as full attention everywhere: the estimate can only be
# too large, never too small (e.g. phi3, whose SWA llama.cpp disables).
SWA_RULES: dict[str, tuple[int, bool, int]] = {
    "gemma2": (2, False, 4096),  # models/gemma2.cpp: n_swa defaults to 4096
    "gemma3": (6, False, 0),  # models/gemma3.cpp: only when sliding_window > 0
    "gemma3n": (5, False, 0),
    "gemma-embedding": (6, False, 0),
    "cohere2": (4, False, 0),
    "olmo2": (4, False, 0),
    "gpt-oss": (2, False, 0),  # models/openai-moe.cpp
    "plamo3": (8, False, 0),
    "mellum": (4, False, 0),
    "afmoe": (4, False, 0),
}


# --- the facts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the planner and the memory estimate need to know of one model, from its GGUF header."""

    architecture: str
    name: str
    n_params: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer (an int is expanded); 0 for layers without attention
    key_length: int
    value_length: int
    n_ctx_train: int
    vocab_size: int
    file_size: int  # all shards together
    quant: str = "unknown"  # "Q4_K_M", "F16", ...
    size_label: str | None = None  # general.size_label, e.g. "270M"
    sliding_window: int = 0  # tokens; 0 = no sliding-window attention
    swa_layers: tuple[bool, ...] = ()  # per layer: True where the layer uses the window
    chat_template: str | None = None  # text only; never rendered or executed here
    layer_bytes: tuple[int, ...] = ()  # per block: bytes of its tensors (empty: spread evenly)
    output_bytes: int = 0  # llama.cpp's "output layer": what offloading it puts in VRAM
    tied_embeddings: bool = False  # no output.weight: the output layer reuses token_embd
    n_files: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.n_head_kv, int):
            object.__setattr__(self, "n_head_kv", (self.n_head_kv,) * self.n_layers)
        else:
            object.__setattr__(self, "n_head_kv", tuple(int(n) for n in self.n_head_kv))
        swa = tuple(bool(s) for s in self.swa_layers)
        if not swa:
            swa = (False,) * self.n_layers
        object.__setattr__(self, "swa_layers", swa)
        object.__setattr__(self, "layer_bytes", tuple(int(b) for b in self.layer_bytes))
        if len(self.n_head_kv) != self.n_layers or len(self.swa_layers) != self.n_layers:
            raise ValueError("n_head_kv and swa_layers need one entry per layer")
        if self.layer_bytes and len(self.layer_bytes) != self.n_layers:
            raise ValueError("layer_bytes needs one entry per layer")

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def n_swa_layers(self) -> int:
        return sum(self.swa_layers) if self.sliding_window > 0 else 0

    @property
    def params_label(self) -> str:
        """"270M", "8.0B": the file's own size label when it has one."""
        if self.size_label:
            return self.size_label
        if self.n_params >= 1e9:
            return f"{self.n_params / 1e9:.1f}B"
        return f"{self.n_params / 1e6:.0f}M"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("n_head_kv", "swa_layers", "layer_bytes"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFacts:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LongArray:
    """An array too long to keep (a vocabulary, merges): only its element type and length."""

    type: int
    count: int


@dataclass(frozen=True)
class KeyRecord:
    """One metadata key; its record (key, value type, value) is bytes [start, end) of the file."""

    key: str
    type: int  # GGUFValueType of the value
    value: Any  # a scalar, a string, a list, or a LongArray
    start: int
    end: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header record, bytes [start, end) of the file; `offset` is its last 8 bytes."""

    name: str
    dims: tuple[int, ...]
    type: int  # GGMLQuantizationType
    offset: int  # of its data, from data_start
    n_elements: int
    n_bytes: int
    start: int
    end: int


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's header, every count, length and offset checked against the file."""

    version: int
    keys: tuple[KeyRecord, ...]  # in file order
    tensors: tuple[TensorInfo, ...]  # in file order
    alignment: int  # general.alignment, or GGUF's default 32
    data_start: int  # where tensor data begins: the header's end, padded to the alignment
    file_size: int
    raw: bytes = b""  # with keep_bytes: the header's bytes (fixed part, key records, tensor infos)

    @cached_property
    def kv(self) -> dict[str, Any]:
        return {k.key: k.value for k in self.keys}


class _Cursor:
    """Bounded little-endian reads from a buffer; any overrun is a ManifestError."""

    def __init__(self, buf: Any, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> ManifestError:
        return ManifestError(f"{self.path.name}: {what}", hint=_HINT)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file (offset {self.pos})")

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def u32(self, what: str) -> int:
        return self.unpack("I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", 8, what)

    def string(self, what: str, limit: int = MAX_STRING_LEN, keep: bool = True) -> str | None:
        n = self.u64(what)
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes (limit {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n]) if keep else None
        self.pos += n
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return cur.unpack(fmt, size, f"value of {key}")
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key}")
    if vtype == GGUFValueType.ARRAY:
        itype = cur.u32(f"array type of {key}")
        count = cur.u64(f"array length of {key}")
        if count > MAX_ARRAY_LEN:
            raise cur.fail(f"{key} claims {count} elements (limit {MAX_ARRAY_LEN})")
        if itype in _SCALARS:
            fmt, size = _SCALARS[itype]
            cur.need(count * size, f"array {key}")
            if count > KEEP_ARRAY_LEN:
                cur.pos += count * size
                return LongArray(itype, count)
            values = struct.unpack_from(f"<{count}{fmt}", cur.buf, cur.pos)
            cur.pos += count * size
            return list(values)
        if itype == GGUFValueType.STRING:
            # each string needs at least its 8-byte length
            cur.need(count * 8, f"array {key}")
            keep = count <= KEEP_ARRAY_LEN
            out = [cur.string(f"element of {key}", keep=keep) for _ in range(count)]
            return out if keep else LongArray(itype, count)
        raise cur.fail(f"{key} is an array of type {itype}, which GGUF does not allow")
    raise cur.fail(f"{key} has unknown value type {vtype}")


def read_header(path: Path, *, keep_bytes: bool = False) -> GGUFHeader:
    """The pre-check and the parse in one bounded pass over the header of one file.

    keep_bytes: also return the header's raw bytes, for a tool that copies records as they are
    (kit.builder.split). Raises ManifestError for anything that is not a sane GGUF file.
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block or never end
            raise ManifestError(f"{path.name}: not a regular file", hint=_HINT)
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < _FIXED_HEADER:
                raise ManifestError(f"{path.name}: too short to be a GGUF file", hint=_HINT)
            fh.seek(0)
            head = fh.read(_FIXED_HEADER)
            magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", head)
            if magic != b"GGUF":
                raise ManifestError(f"{path.name}: not a GGUF file (magic {magic!r})", hint=_HINT)
            if version not in SUPPORTED_VERSIONS:
                if version & 0xFFFF == 0:
                    raise ManifestError(f"{path.name}: big-endian GGUF is not supported",
                                        hint=_HINT)
                raise ManifestError(f"{path.name}: GGUF version {version} is not supported",
                                    hint=_HINT)
            if n_tensors > MAX_TENSORS:
                raise ManifestError(f"{path.name}: claims {n_tensors} tensors (limit "
                                    f"{MAX_TENSORS})", hint=_HINT)
            if n_kv > MAX_KV:
                raise ManifestError(f"{path.name}: claims {n_kv} metadata keys (limit {MAX_KV})",
                                    hint=_HINT)
            least = _FIXED_HEADER + n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES
            if least > size:
                raise ManifestError(f"{path.name}: header claims at least {least} bytes, the "
                                    f"file has {size}", hint=_HINT)
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, size, path, version, n_tensors, n_kv, keep_bytes)
    except OSError as exc:
        raise ManifestError(f"{path.name}: cannot read ({exc.strerror or exc})",
                            hint=_HINT) from exc


def _parse(buf: Any, size: int, path: Path, version: int, n_tensors: int, n_kv: int,
           keep_bytes: bool) -> GGUFHeader:
    cur = _Cursor(buf, size, path)
    cur.pos = _FIXED_HEADER
    keys: dict[str, KeyRecord] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string("a metadata key", limit=MAX_KEY_LEN)
        assert key is not None
        if key in keys:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.u32(f"type of {key}")
        value = _read_value(cur, vtype, key)
        keys[key] = KeyRecord(key, vtype, value, start, cur.pos)

    tensors: dict[str, TensorInfo] = {}
    for _ in range(n_tensors):
        start = cur.pos
        name = cur.string("a tensor name", limit=MAX_TENSOR_NAME)
        assert name is not None
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        n_dims = cur.u32(f"dimensions of {name}")
        if n_dims > MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (limit {MAX_DIMS})")
        dims = tuple(cur.u64(f"shape of {name}") for _ in range(n_dims))
        n_elements = 1
        for d in dims:
            n_elements *= d
        if n_elements >= 2**63:
            raise cur.fail(f"tensor {name!r} has an impossible shape {dims}")
        ttype = cur.u32(f"type of {name}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {name!r} has unknown type {ttype}") from None
        if dims and dims[0] % block:
            raise cur.fail(f"tensor {name!r}: rows of {dims[0]} are not whole {block}-blocks")
        offset = cur.u64(f"offset of {name}")
        n_bytes = n_elements // block * type_size
        tensors[name] = TensorInfo(name, dims, ttype, offset, n_elements, n_bytes, start, cur.pos)

    align_key = keys.get("general.alignment")
    alignment = align_key.value if align_key else GGUF_DEFAULT_ALIGNMENT
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    for t in tensors.values():
        end = data_start + t.offset + t.n_bytes
        if t.offset % alignment or end > size:
            raise cur.fail(f"tensor {t.name!r} lies outside the file (ends at {end}, file has "
                           f"{size} bytes): truncated or damaged")
    return GGUFHeader(version=version, keys=tuple(keys.values()), tensors=tuple(tensors.values()),
                      alignment=alignment, data_start=data_start, file_size=size,
                      raw=bytes(buf[: cur.pos]) if keep_bytes else b"")


# --- from header to facts ------------------------------------------------------------------------


def _int(kv: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = kv.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"metadata {key} should be an integer, got {type(value).__name__}",
                            hint=_HINT)
    return value


def _per_layer(kv: dict[str, Any], key: str, n_layers: int, default: int) -> tuple[int, ...]:
    """A hyper-parameter that is either one integer or one integer per layer."""
    value = kv.get(key, default)
    if isinstance(value, list):
        if len(value) != n_layers or not all(isinstance(v, int) for v in value):
            raise ManifestError(f"metadata {key} has {len(value)} entries for {n_layers} layers",
                                hint=_HINT)
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"metadata {key} should be an integer", hint=_HINT)
    return (value,) * n_layers


def _swa(kv: dict[str, Any], arch: str, n_layers: int) -> tuple[int, tuple[bool, ...]]:
    """(window, per-layer flags), following llama.cpp (see SWA_RULES)."""
    rule = SWA_RULES.get(arch)
    if rule is None:
        return 0, (False,) * n_layers
    period, dense_first, default_window = rule
    window = _int(kv, f"{arch}.attention.sliding_window", default_window) or 0
    if window <= 0:
        return 0, (False,) * n_layers
    pattern = kv.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == n_layers:
        return window, tuple(bool(p) for p in pattern)
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        period = pattern
    if period == 0:
        return window, (True,) * n_layers
    if dense_first:
        return window, tuple(il % period != 0 for il in range(n_layers))
    return window, tuple(il % period < period - 1 for il in range(n_layers))


def _quant_name(kv: dict[str, Any], tensors: list[TensorInfo]) -> str:
    ftype = kv.get("general.file_type")
    if isinstance(ftype, int) and not isinstance(ftype, bool):
        try:
            name = LlamaFileType(ftype).name
        except ValueError:
            name = ""
        if name and name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    # no (usable) file type: the type holding most bytes among the matrices
    by_bytes: Counter[int] = Counter()
    for t in tensors:
        if len(t.dims) >= 2:
            by_bytes[t.type] += t.n_bytes
    if not by_bytes:
        return "unknown"
    return GGMLQuantizationType(by_bytes.most_common(1)[0][0]).name


def _check_shards(paths: list[Path], headers: list[GGUFHeader]) -> None:
    count = headers[0].kv.get("split.count")
    if len(paths) == 1 and count in (None, 1, 0):
        return
    if count != len(paths):
        raise ManifestError(
            f"{paths[0].name}: the model says {count or 1} file(s), {len(paths)} were given",
            hint=_HINT,
        )
    for i, (p, h) in enumerate(zip(paths, headers, strict=True)):
        if h.kv.get("split.no", i) != i:
            raise ManifestError(f"{p.name}: is shard {h.kv.get('split.no')}, expected {i}",
                                hint=_HINT)


def read_facts(paths: list[Path]) -> ModelFacts:
    """Read a model's facts from its file, or its shards in order (metadata in the first).

    Raises ManifestError for anything that is not a sane GGUF file.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("read_facts needs at least one path")
    headers = [read_header(p) for p in paths]
    _check_shards(paths, headers)
    kv = headers[0].kv
    tensors = [t for h in headers for t in h.tensors]

    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ManifestError(f"{paths[0].name}: no general.architecture", hint=_HINT)

    def need(key: str) -> int:
        value = _int(kv, f"{arch}.{key}")
        if value is None or value < 0:
            raise ManifestError(f"{paths[0].name}: no {arch}.{key}", hint=_HINT)
        return value

    n_layers = need("block_count")
    n_embd = need("embedding_length")
    n_ctx_train = need("context_length")
    if n_layers > 10_000 or n_embd > 1_000_000:
        raise ManifestError(f"{paths[0].name}: {n_layers} layers x {n_embd} is not a real model",
                            hint=_HINT)
    heads = _per_layer(kv, f"{arch}.attention.head_count", n_layers, 0)
    n_head = max(heads, default=0)
    heads_kv = _per_layer(kv, f"{arch}.attention.head_count_kv", n_layers, -1)
    if heads_kv and heads_kv[0] == -1:  # absent: no grouped-query attention
        heads_kv = heads
    # llama.cpp: n_embd_head_k defaults to n_embd / n_head(0)
    head0 = heads[0] if heads and heads[0] else n_head
    default_head = n_embd // head0 if head0 else 0
    key_length = _int(kv, f"{arch}.attention.key_length", default_head) or 0
    value_length = _int(kv, f"{arch}.attention.value_length", default_head) or 0
    window, swa_layers = _swa(kv, arch, n_layers)

    tokens = kv.get("tokenizer.ggml.tokens")
    if isinstance(tokens, LongArray | list):
        vocab_size = tokens.count if isinstance(tokens, LongArray) else len(tokens)
    else:
        vocab_size = _int(kv, f"{arch}.vocab_size", 0) or 0
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        if not vocab_size and embd is not None and len(embd.dims) == 2:
            vocab_size = embd.dims[1]

    layer_bytes = [0] * n_layers
    output_bytes = 0
    by_name = {t.name: t for t in tensors}
    for t in tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) < n_layers:
            layer_bytes[int(m.group(1))] += t.n_bytes
        elif t.name.startswith(("output.", "output_norm.")):
            output_bytes += t.n_bytes
    tied = "output.weight" not in by_name and "token_embd.weight" in by_name
    if tied:  # offloading the output layer copies token_embd to the GPU (TENSOR_DUPLICATED)
        output_bytes += by_name["token_embd.weight"].n_bytes

    template = kv.get("tokenizer.chat_template")
    label = kv.get("general.size_label")
    name = kv.get("general.name") or kv.get("general.basename")
    if not isinstance(name, str) or not name:
        name = _SHARD_RE.sub("", paths[0].name).removesuffix(".gguf")
    return ModelFacts(
        architecture=arch,
        name=name,
        n_params=sum(t.n_elements for t in tensors),
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=heads_kv,
        key_length=key_length,
        value_length=value_length,
        n_ctx_train=n_ctx_train,
        vocab_size=vocab_size,
        file_size=sum(h.file_size for h in headers),
        quant=_quant_name(kv, tensors),
        size_label=label if isinstance(label, str) and label else None,
        sliding_window=window,
        swa_layers=swa_layers,
        chat_template=template if isinstance(template, str) and template else None,
        layer_bytes=tuple(layer_bytes),
        output_bytes=output_bytes,
        tied_embeddings=tied,
        n_files=len(paths),
    )
