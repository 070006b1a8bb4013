"""GGUF header -> ModelFacts, and what a model needs in memory at a given context.

Part of the pure core: no llama_cpp, no textual, no printing.

The header is walked by a small bounded reader of our own instead of `gguf.GGUFReader`:
- the file comes from a stick of unknown origin, so every count and length is checked against
  fixed limits and against the bytes the file really has *before* anything is allocated or
  iterated (GGUFReader loops `array length` times even when the file ends long before);
- GGUFReader builds one numpy view per vocabulary entry: 13 s for Gemma 3 270M's 262k-token
  vocabulary on the build machine, at every start. This walk skips what it does not need (< 1 s).
The `gguf` package still gives the format's enums and block sizes, and the tests check this reader
against GGUFReader on the real model.
"""

from __future__ import annotations

import mmap
import re
import stat
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFValueType,
    LlamaFileType,
)

from kit.errors import ManifestError

# --- limits for a hostile header -------------------------------------------------------------

MAX_TENSORS = 100_000  # the largest real models hold a few thousand tensors
MAX_KV = 100_000  # real files hold a few dozen keys
MAX_KEY_LEN = 4096  # keys are dotted names ("gemma3.attention.head_count")
MAX_STRING_LEN = 64 * 1024 * 1024  # chat templates are KBs; tokenizer.huggingface.json a few MB
MAX_ARRAY_LEN = 16 * 1024 * 1024  # vocabularies and merges are < 1M entries
MAX_TENSOR_NAME = 64  # GGML_MAX_NAME in ggml.h
MAX_DIMS = 4  # GGML_MAX_DIMS
KEEP_ARRAY_LEN = 4096  # arrays up to this length are kept (per-layer values); longer: only counted

SUPPORTED_VERSIONS = (2, 3)
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
    """What the planner needs to know about one model, read from its GGUF header."""

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

    def kv_bytes_per_token(self, kv_bytes_per_element: float = 2) -> int:
        """KV bytes one context cell costs over all layers (SWA layers ignored)."""
        per = sum(self.n_head_kv) * (self.key_length + self.value_length)
        return int(per * kv_bytes_per_element)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("n_head_kv", "swa_layers", "layer_bytes"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFacts:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- estimate ----------------------------------------------------------------------------------

# llama.cpp pads the context (llama-context.cpp: cparams.n_ctx = GGML_PAD(n_ctx, 256)) and the
# SWA cache (llama-kv-cache-iswa.cpp) to 256 cells.
KV_PAD = 256
DEFAULT_N_BATCH = 512  # llama-cpp-python's Llama(n_batch=512, n_ubatch=512)

# Compute buffers, calibrated with bench/memory_estimate.py (context filled, then 32 tokens) on
# the real Gemma 3 270M (4 heads, 262k vocabulary, SWA) and a random-weight llama written by the
# bench (32 heads, 32k vocabulary), 512..8192 cells, n_ubatch 512 and 128, with and without
# flash attention.
# - llama.cpp *reserves* the worst-case graph of one ubatch (llama-context.cpp graph_reserve):
#   max(logits n_vocab x n_ubatch f32, KQ scores n_head x n_ubatch x n_ctx f32) plus a little;
#   its log said 514 MiB for Gemma at every context (the logits) and 550 MiB for the llama at
#   8192 (the scores). A GPU backend allocates that for real: VRAM gets the reserved size.
# - On the CPU most of a reserve is never touched (the chat asks logits of one token); what
#   becomes *resident* grows by 1.43 x the KQ scores per cell on both models (the scores, the
#   softmax in place, and the f16 copy the KQ x V product converts them to in the CPU backend's
#   work buffer), plus the KQ mask (n_ubatch x n_ctx f32; two for models with SWA layers),
#   plus ~240 bytes per vocabulary entry (sampler and logits copies) and a few MiB.
# - Flash attention (Llama(flash_attn=True)) never materialises the scores: only the masks grow.
# Estimate vs measured peak, without the UI allowance below: +0 % .. +7 % on all 17 points.
COMPUTE_KQ_FACTOR = 1.5
COMPUTE_ACT_FACTOR = 3  # activations: x n_embd x n_ubatch f32
COMPUTE_VOCAB_BYTES = 240
COMPUTE_FIXED = 8 * 1024 * 1024
# Python + llama_cpp + ggml + the CPU variant: 48 MiB RSS measured after imports; Textual and its
# widgets +16 MiB measured at import; +32 MiB allowance for the running UI and chat history.
RUNTIME_OVERHEAD = 96 * 1024 * 1024
# llama.cpp keeps the vocabulary in RAM once loaded (token text, scores, maps, piece cache):
# measured 180 bytes per token for Gemma 3 (262,144 tokens), 230 for the 32k llama.
VOCAB_BYTES_PER_TOKEN = 240


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs to run at n_ctx; `ram` + `vram` == `total`."""

    n_ctx: int
    gpu_layers: int
    weights: int
    kv_cache: int
    compute: int
    overhead: int
    total: int
    ram: int
    vram: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _pad(n: int, to: int = KV_PAD) -> int:
    return (n + to - 1) // to * to


def kv_cache_bytes(
    facts: ModelFacts,
    n_ctx: int,
    *,
    kv_bytes_per_element: float = 2,
    n_batch: int = DEFAULT_N_BATCH,
    swa_full: bool = True,
    layers: range | None = None,
) -> int:
    """KV cache bytes for `layers` (default all) at n_ctx.

    Full-attention layers hold PAD(n_ctx, 256) cells. Sliding-window layers, as
    llama-kv-cache-iswa.cpp sizes them: PAD(min(n_ctx, n_swa + n_ubatch), 256) cells — but only
    with swa_full=False. llama.cpp's llama_context_default_params() sets swa_full=true
    (llama-context.cpp) and llama-cpp-python 0.3.36 keeps that unless Llama(swa_full=False) is
    passed; then SWA layers are as big as the others. The default here follows that default.
    """
    cells = _pad(n_ctx)
    n_ubatch = min(n_ctx, n_batch)
    swa_cells = _pad(min(cells, facts.sliding_window + n_ubatch))
    total = 0.0
    for il in layers if layers is not None else range(facts.n_layers):
        per_cell = facts.n_head_kv[il] * (facts.key_length + facts.value_length)
        use_swa = not swa_full and facts.sliding_window > 0 and facts.swa_layers[il]
        total += (swa_cells if use_swa else cells) * per_cell * kv_bytes_per_element
    return int(total)


def compute_bytes(facts: ModelFacts, n_ctx: int, *, n_batch: int = DEFAULT_N_BATCH,
                  reserved: bool = False, flash_attn: bool = False) -> int:
    """llama.cpp's compute buffer at n_ctx: resident on the CPU, or `reserved` (what a GPU
    backend allocates). See the COMPUTE_* constants for the calibration."""
    n_ubatch = min(n_ctx, n_batch)
    cells = _pad(n_ctx)
    scores = facts.n_head * n_ubatch * cells * 4
    masks = (2 if facts.n_swa_layers else 1) * n_ubatch * cells * 4
    act = COMPUTE_ACT_FACTOR * facts.n_embd * n_ubatch * 4
    if reserved:
        attn = masks if flash_attn else scores + masks
        return max(facts.vocab_size * n_ubatch * 4, attn) + act
    kq = 0 if flash_attn else int(COMPUTE_KQ_FACTOR * scores)
    return kq + masks + act + COMPUTE_VOCAB_BYTES * facts.vocab_size + COMPUTE_FIXED


def _layer_weights(facts: ModelFacts) -> tuple[list[int], int]:
    """(bytes per block, output layer bytes)."""
    if facts.layer_bytes:
        return list(facts.layer_bytes), facts.output_bytes
    # facts without a tensor table: spread the file over the blocks and the output layer
    share = facts.file_size // (facts.n_layers + 1)
    return [share] * facts.n_layers, facts.output_bytes or share


def estimate_memory(
    facts: ModelFacts,
    n_ctx: int,
    *,
    gpu_layers: int = 0,
    kv_bytes_per_element: float = 2,
    n_batch: int = DEFAULT_N_BATCH,
    swa_full: bool = True,
    flash_attn: bool = False,
) -> MemoryEstimate:
    """What running `facts` at `n_ctx` needs, split between RAM and VRAM.

    `gpu_layers` is llama.cpp's n_gpu_layers: it offloads the *last* gpu_layers of the
    n_layers + 1 layers, where the extra one is the output layer (llama-model.cpp:
    i_gpu_start = n_layer + 1 - n_gpu_layers). So 1 moves only the output layer and
    n_layers + 1 moves everything; the token embeddings always stay in RAM. With offload_kqv
    (llama-cpp-python's default) an offloaded block's KV cache lives in VRAM too.
    """
    if n_ctx < 1:
        raise ValueError("n_ctx must be >= 1")
    gpu_layers = max(0, min(gpu_layers, facts.n_layers + 1))
    per_layer, output = _layer_weights(facts)
    first_gpu = facts.n_layers + 1 - gpu_layers  # index among blocks (n_layers = output)

    gpu_blocks = range(min(first_gpu, facts.n_layers), facts.n_layers)
    cpu_blocks = range(0, min(first_gpu, facts.n_layers))
    kv_args = {"kv_bytes_per_element": kv_bytes_per_element, "n_batch": n_batch,
               "swa_full": swa_full}
    kv_gpu = kv_cache_bytes(facts, n_ctx, layers=gpu_blocks, **kv_args) if gpu_layers else 0
    kv_cpu = kv_cache_bytes(facts, n_ctx, layers=cpu_blocks, **kv_args)

    weights = facts.file_size
    w_gpu = sum(per_layer[i] for i in gpu_blocks) + (output if gpu_layers else 0)
    compute = compute_bytes(facts, n_ctx, n_batch=n_batch, flash_attn=flash_attn)
    overhead = RUNTIME_OVERHEAD + facts.vocab_size * VOCAB_BYTES_PER_TOKEN

    if gpu_layers:
        # The GPU backend allocates its reserved compute buffer for real; the CPU keeps the
        # resident one for the blocks it still runs, or only the fixed part when all moved.
        c_gpu = compute_bytes(facts, n_ctx, n_batch=n_batch, reserved=True,
                              flash_attn=flash_attn)
        c_cpu = compute if cpu_blocks else (COMPUTE_FIXED
                                            + COMPUTE_VOCAB_BYTES * facts.vocab_size)
        # Offloaded tensors leave RAM: the last blocks lie at the file's end, and
        # llama-model-loader.cpp unmaps the mapped range no CPU tensor uses ("unmap offloaded
        # tensors and metadata"). A tied output layer is a copy of the token embeddings, which
        # stay in RAM.
        w_cpu = weights - w_gpu + (output if facts.tied_embeddings else 0)
    else:
        c_gpu, c_cpu, w_cpu = 0, compute, weights
    ram = w_cpu + kv_cpu + c_cpu + overhead
    vram = w_gpu + kv_gpu + c_gpu
    return MemoryEstimate(
        n_ctx=n_ctx,
        gpu_layers=gpu_layers,
        weights=weights,
        kv_cache=kv_cpu + kv_gpu,
        compute=c_cpu + c_gpu,
        overhead=overhead,
        total=ram + vram,
        ram=ram,
        vram=vram,
    )


# --- reading -----------------------------------------------------------------------------------


@dataclass
class _Big:
    """An array too long to keep: only its element type and length."""

    type: int
    count: int


@dataclass
class _Tensor:
    name: str
    dims: tuple[int, ...]
    type: int
    offset: int
    n_elements: int
    n_bytes: int


@dataclass
class _Header:
    version: int
    kv: dict[str, Any] = field(default_factory=dict)
    tensors: list[_Tensor] = field(default_factory=list)
    data_start: int = 0
    file_size: int = 0


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
                return _Big(itype, count)
            values = struct.unpack_from(f"<{count}{fmt}", cur.buf, cur.pos)
            cur.pos += count * size
            return list(values)
        if itype == GGUFValueType.STRING:
            # each string needs at least its 8-byte length
            cur.need(count * 8, f"array {key}")
            keep = count <= KEEP_ARRAY_LEN
            out = [cur.string(f"element of {key}", keep=keep) for _ in range(count)]
            return out if keep else _Big(itype, count)
        raise cur.fail(f"{key} is an array of type {itype}, which GGUF does not allow")
    raise cur.fail(f"{key} has unknown value type {vtype}")


def _walk(path: Path) -> _Header:
    """The pre-check and the parse in one bounded pass over the header."""
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
                return _parse(mm, size, path, version, n_tensors, n_kv)
    except OSError as exc:
        raise ManifestError(f"{path.name}: cannot read ({exc.strerror or exc})",
                            hint=_HINT) from exc


def _parse(buf: Any, size: int, path: Path, version: int, n_tensors: int, n_kv: int) -> _Header:
    cur = _Cursor(buf, size, path)
    cur.pos = _FIXED_HEADER
    hdr = _Header(version=version, file_size=size)
    for _ in range(n_kv):
        key = cur.string("a metadata key", limit=MAX_KEY_LEN)
        assert key is not None
        if key in hdr.kv:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.u32(f"type of {key}")
        hdr.kv[key] = _read_value(cur, vtype, key)

    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string("a tensor name", limit=MAX_TENSOR_NAME)
        assert name is not None
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
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
        hdr.tensors.append(_Tensor(name, dims, ttype, offset, n_elements, n_bytes))

    alignment = hdr.kv.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    hdr.data_start = _pad(cur.pos, alignment)
    for t in hdr.tensors:
        end = hdr.data_start + t.offset + t.n_bytes
        if t.offset % alignment or end > size:
            raise cur.fail(f"tensor {t.name!r} lies outside the file (ends at {end}, file has "
                           f"{size} bytes): truncated or damaged")
    return hdr


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


def _quant_name(kv: dict[str, Any], tensors: list[_Tensor]) -> str:
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


def _check_shards(paths: list[Path], headers: list[_Header]) -> None:
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
    headers = [_walk(p) for p in paths]
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
    if isinstance(tokens, _Big | list):
        vocab_size = tokens.count if isinstance(tokens, _Big) else len(tokens)
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
