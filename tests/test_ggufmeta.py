"""kit.ggufmeta: the bounded GGUF header reader and ModelFacts (real Gemma 3 270M, small written
models, hostile files). The memory estimate is tested in tests/test_estimate.py."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

from kit.errors import ManifestError
from kit.estimate import kv_cache_bytes
from kit.ggufmeta import MAX_ARRAY_LEN, LongArray, ModelFacts, read_facts, read_header
from kit.settings import EngineSettings
from kit.units import MiB


@pytest.fixture(scope="session")
def gemma(gemma_path: Path) -> ModelFacts:
    return read_facts([gemma_path])


def assert_header_matches(path: Path, reader: GGUFReader) -> None:
    """read_header against GGUFReader: every record's bytes (what kit.builder.split copies),
    every tensor's data offset, and where the data section starts."""
    header = read_header(path, keep_bytes=True)
    assert header.alignment == reader.alignment and header.data_start == reader.data_offset
    assert header.file_size == path.stat().st_size
    records = {k.key: header.raw[k.start:k.end] for k in header.keys}
    assert records == {name: b"".join(p.tobytes() for p in f.parts)
                       for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert [(t.name, header.raw[t.start:t.end], header.data_start + t.offset, t.n_bytes)
            for t in header.tensors] == [
        (t.name, b"".join(p.tobytes() for p in t.field.parts), t.data_offset, t.n_bytes)
        for t in reader.tensors]
    assert read_header(path).raw == b""  # only kept when asked


# --- the real model ---------------------------------------------------------------------------


def test_gemma_facts(gemma: ModelFacts, gemma_path: Path):
    assert gemma.architecture == "gemma3"
    assert gemma.name == "Gemma 3 270m"
    assert gemma.size_label == "270M" and gemma.params_label == "270M"
    assert gemma.n_params == 268_098_176
    assert (gemma.n_layers, gemma.n_embd, gemma.n_head) == (18, 640, 4)
    assert gemma.n_head_kv == (1,) * 18
    assert (gemma.key_length, gemma.value_length) == (256, 256)
    assert gemma.n_ctx_train == 32768
    assert gemma.vocab_size == 262_144
    assert gemma.quant == "Q4_K_M"
    assert gemma.file_size == gemma_path.stat().st_size
    assert not gemma.has_chat_template  # a base model: no chat template in its metadata
    assert gemma.tied_embeddings  # no output.weight: the output layer reuses token_embd
    assert gemma.n_files == 1


def test_gemma_sliding_window_follows_llama_cpp(gemma: ModelFacts):
    # models/gemma3.cpp: load_swa_pattern(ml, 6) -> every 6th layer (5, 11, 17) is global
    assert gemma.sliding_window == 512
    assert [il for il, swa in enumerate(gemma.swa_layers) if not swa] == [5, 11, 17]
    assert gemma.n_swa_layers == 15


def test_gemma_facts_match_gguf_reader(gemma: ModelFacts, gemma_path: Path):
    """Our bounded walk against the gguf package's own reader (13 s for this file)."""
    reader = GGUFReader(gemma_path)

    def field(key):
        return reader.fields[key].contents()

    assert gemma.architecture == field("general.architecture")
    assert gemma.n_layers == field("gemma3.block_count")
    assert gemma.n_ctx_train == field("gemma3.context_length")
    assert gemma.sliding_window == field("gemma3.attention.sliding_window")
    assert gemma.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert gemma.n_params == sum(int(t.n_elements) for t in reader.tensors)
    assert sum(gemma.layer_bytes) == sum(
        int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk."))
    assert LlamaFileType(field("general.file_type")).name == "MOSTLY_Q4_K_M"
    assert_header_matches(gemma_path, reader)
    # the vocabulary is counted, not kept
    tokens = read_header(gemma_path).kv["tokenizer.ggml.tokens"]
    assert tokens == LongArray(GGUFValueType.STRING, 262_144)


def test_reading_is_fast(gemma_path: Path):
    start = time.perf_counter()
    read_facts([gemma_path])
    assert time.perf_counter() - start < 2.0  # GGUFReader: 13 s (it wraps every token)


def test_truncated_real_model_is_refused(gemma_path: Path, tmp_path: Path):
    cut = tmp_path / "cut.gguf"
    with open(gemma_path, "rb") as src:
        cut.write_bytes(src.read(50 * MiB))
    with pytest.raises(ManifestError, match="outside the file"):
        read_facts([cut])


def test_facts_round_trip_through_json(gemma: ModelFacts):
    again = ModelFacts.from_dict(json.loads(json.dumps(gemma.to_dict())))
    assert again == gemma


# --- small models written with gguf.GGUFWriter ------------------------------------------------


def write_model(path: Path, arch: str = "llama", *, n_layers: int = 4, n_embd: int = 64,
                n_head: int = 4, n_head_kv: int | list[int] = 2, vocab: int = 96,
                ctx: int = 4096, extra=None, split_max_tensors: int = 0,
                file_type: int | None = LlamaFileType.ALL_F32, tied: bool = False) -> list[Path]:
    w = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    w.add_name(f"Tiny {arch}")
    w.add_block_count(n_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    if extra:
        extra(w)
    rng = np.random.default_rng(0)

    def t(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape[::-1], dtype=np.float32))

    t("token_embd.weight", n_embd, vocab)
    for il in range(n_layers):
        kv = n_head_kv[il] if isinstance(n_head_kv, list) else n_head_kv
        t(f"blk.{il}.attn_q.weight", n_embd, n_embd)
        t(f"blk.{il}.attn_k.weight", n_embd, max(kv, 1) * (n_embd // n_head))
        t(f"blk.{il}.attn_norm.weight", n_embd)
    t("output_norm.weight", n_embd)
    if not tied:
        t("output.weight", n_embd, vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    return [path]


def test_written_model(tmp_path: Path):
    [p] = write_model(tmp_path / "m.gguf", extra=lambda w: w.add_chat_template(
        "{% for m in messages %}{{ m.content }}{% endfor %}"))
    f = read_facts([p])
    assert (f.architecture, f.name, f.n_layers, f.n_embd, f.n_head) == ("llama", "Tiny llama",
                                                                       4, 64, 4)
    assert f.n_head_kv == (2, 2, 2, 2)
    assert (f.key_length, f.value_length) == (16, 16)  # default: n_embd / n_head
    assert f.vocab_size == 96 and f.n_ctx_train == 4096
    assert f.quant == "F32"
    # stored as text, never rendered here
    assert f.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert f.n_params == 64 * 96 * 2 + 4 * (64 * 64 + 64 * 32 + 64) + 64
    assert f.sliding_window == 0 and f.n_swa_layers == 0
    assert not f.tied_embeddings and f.output_bytes == (64 * 96 + 64) * 4
    assert f.layer_bytes == ((64 * 64 + 64 * 32 + 64) * 4,) * 4
    assert f.params_label == "0M"  # no size label: from the count


def test_header_records_of_a_written_model(tmp_path: Path):
    def extra(w):
        w.add_custom_alignment(64)
        w.add_array("llama.per_layer", [1, 2, 3, 4])

    [p] = write_model(tmp_path / "m.gguf", extra=extra)
    assert_header_matches(p, GGUFReader(p))
    header = read_header(p)
    assert header.alignment == 64 and header.kv["llama.per_layer"] == [1, 2, 3, 4]
    align = next(k for k in header.keys if k.key == "general.alignment")
    assert (align.type, align.value) == (GGUFValueType.UINT32, 64)


def test_head_count_kv_per_layer(tmp_path: Path):
    [p] = write_model(tmp_path / "m.gguf", n_head_kv=[4, 2, 0, 1])
    f = read_facts([p])
    assert f.n_head_kv == (4, 2, 0, 1)
    # KV = n_ctx x sum over layers (n_kv_heads x (key + value)) x 2 bytes, n_ctx padded to 256
    assert kv_cache_bytes(f, EngineSettings(1000)) == 1024 * (4 + 2 + 0 + 1) * (16 + 16) * 2


def test_explicit_key_value_length_and_guessed_quant(tmp_path: Path):
    def extra(w):
        w.add_key_length(32)
        w.add_value_length(8)

    [p] = write_model(tmp_path / "m.gguf", extra=extra, file_type=None)
    f = read_facts([p])
    assert (f.key_length, f.value_length) == (32, 8)
    assert f.quant == "F32"  # no general.file_type: the type holding most bytes


def test_gemma3_swa_rules(tmp_path: Path):
    def window(w):
        w.add_sliding_window(1024)

    [p] = write_model(tmp_path / "a.gguf", "gemma3", n_layers=12, extra=window)
    f = read_facts([p])
    assert f.sliding_window == 1024
    assert [il for il, s in enumerate(f.swa_layers) if not s] == [5, 11]

    def period(w):  # an explicit period overrides the default 6
        w.add_sliding_window(1024)
        w.add_uint32("gemma3.attention.sliding_window_pattern", 4)

    [p] = write_model(tmp_path / "b.gguf", "gemma3", n_layers=8, extra=period)
    assert [il for il, s in enumerate(read_facts([p]).swa_layers) if not s] == [3, 7]

    def flags(w):  # a per-layer array wins
        w.add_sliding_window(1024)
        w.add_array("gemma3.attention.sliding_window_pattern", [True, False] * 4)

    [p] = write_model(tmp_path / "c.gguf", "gemma3", n_layers=8, extra=flags)
    assert read_facts([p]).swa_layers == (True, False) * 4

    [p] = write_model(tmp_path / "d.gguf", "gemma3", n_layers=6)  # no window key: no SWA
    f = read_facts([p])
    assert f.sliding_window == 0 and f.n_swa_layers == 0

    def llama_window(w):  # architectures llama.cpp gives no SWA are full attention
        w.add_sliding_window(1024)

    [p] = write_model(tmp_path / "e.gguf", "llama", extra=llama_window)
    assert read_facts([p]).n_swa_layers == 0


def test_split_shards(tmp_path: Path):
    paths = write_model(tmp_path / "big.gguf", split_max_tensors=5)
    assert [p.name for p in paths] == ["big-00001-of-00003.gguf", "big-00002-of-00003.gguf",
                                       "big-00003-of-00003.gguf"]
    f = read_facts(paths)
    [single] = write_model(tmp_path / "one.gguf")
    one = read_facts([single])
    assert f.n_params == one.n_params and f.layer_bytes == one.layer_bytes
    assert f.file_size == sum(p.stat().st_size for p in paths)
    assert f.n_files == 3 and f.name == "Tiny llama"
    with pytest.raises(ManifestError, match="says 3 file"):
        read_facts(paths[:2])
    with pytest.raises(ManifestError, match="expected 1"):
        read_facts([paths[0], paths[2], paths[1]])


# --- hostile files ------------------------------------------------------------------------------


def gstr(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", GGUFValueType.UINT32, value)


def raw(n_tensors: int = 0, n_kv: int = 0, body: bytes = b"", version: int = 3,
        magic: bytes = b"GGUF", pad: int = 0) -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv) + body + b"\0" * pad


def refuse(tmp_path: Path, data: bytes, match: str) -> None:
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(ManifestError, match=match) as info:
        read_facts([p])
    # every error carries the reader's one-line fix, not ManifestError's default about profiles
    assert "not a GGUF model" in info.value.hint


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (b"GGUF\x03\x00", "too short"),
        (raw(magic=b"GGML", pad=64), "not a GGUF file"),
        (raw(version=1, pad=64), "version 1"),
        (raw(version=99, pad=64), "version 99"),
        (raw(version=3 << 24, pad=64), "big-endian"),
        (raw(n_tensors=100_001, pad=64), "100001 tensors"),
        (raw(n_kv=100_001, pad=64), "100001 metadata keys"),
        (raw(n_tensors=2**63, pad=64), "tensors"),
        (raw(n_kv=1000, pad=200), "header claims at least"),
        (raw(n_tensors=10, n_kv=10, pad=100), "header claims at least"),
    ],
)
def test_fixed_header_is_checked_first(tmp_path: Path, data: bytes, match: str):
    refuse(tmp_path, data, match)


def test_huge_string_length(tmp_path: Path):
    body = struct.pack("<Q", 2**40) + b"general.name"
    refuse(tmp_path, raw(n_kv=1, body=body, pad=64), "claims 1099511627776 bytes")


def test_string_past_end_of_file(tmp_path: Path):
    body = gstr("general.name") + struct.pack("<I", GGUFValueType.STRING) + struct.pack(
        "<Q", 10_000) + b"abc"
    refuse(tmp_path, raw(n_kv=1, body=body), "runs past the end")


def test_huge_array_length(tmp_path: Path):
    body = gstr("tokenizer.ggml.tokens") + struct.pack(
        "<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, 2**40)
    refuse(tmp_path, raw(n_kv=1, body=body, pad=64), f"limit {MAX_ARRAY_LEN}")


def test_array_longer_than_the_file(tmp_path: Path):
    # GGUFReader would loop a million times here; we refuse before reading an element
    body = gstr("tokenizer.ggml.scores") + struct.pack(
        "<IIQ", GGUFValueType.ARRAY, GGUFValueType.FLOAT32, 1_000_000)
    start = time.perf_counter()
    refuse(tmp_path, raw(n_kv=1, body=body, pad=64), "runs past the end")
    assert time.perf_counter() - start < 0.5


def test_nested_array(tmp_path: Path):
    body = gstr("x") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.ARRAY, 1)
    refuse(tmp_path, raw(n_kv=1, body=body, pad=64), "does not allow")


def test_unknown_value_type(tmp_path: Path):
    refuse(tmp_path, raw(n_kv=1, body=gstr("x") + struct.pack("<I", 77), pad=64),
           "unknown value type 77")


def test_duplicate_key(tmp_path: Path):
    refuse(tmp_path, raw(n_kv=2, body=kv_u32("a", 1) + kv_u32("a", 2), pad=64), "twice")


def test_key_not_utf8(tmp_path: Path):
    body = gstr(b"\xff\xfe") + struct.pack("<II", GGUFValueType.UINT32, 1)
    refuse(tmp_path, raw(n_kv=1, body=body, pad=64), "not UTF-8")


def test_overlong_key(tmp_path: Path):
    body = gstr("k" * 5000) + struct.pack("<II", GGUFValueType.UINT32, 1)
    refuse(tmp_path, raw(n_kv=1, body=body), "limit 4096")


def tensor_info(name: str, dims: list[int], ttype: int = 0, offset: int = 0) -> bytes:
    return (gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d)
                                                                 for d in dims)
            + struct.pack("<IQ", ttype, offset))


def test_tensor_with_too_many_dimensions(tmp_path: Path):
    refuse(tmp_path, raw(n_tensors=1, body=tensor_info("w", [1] * 5), pad=64), "5 dimensions")


def test_tensor_of_unknown_type(tmp_path: Path):
    refuse(tmp_path, raw(n_tensors=1, body=tensor_info("w", [4], ttype=250), pad=64),
           "unknown type 250")


def test_tensor_data_past_end(tmp_path: Path):
    body = tensor_info("w", [1024, 1024])  # 4 MiB of f32 in a tiny file
    refuse(tmp_path, raw(n_tensors=1, body=body, pad=64), "outside the file")


def test_tensor_with_absurd_shape(tmp_path: Path):
    refuse(tmp_path, raw(n_tensors=1, body=tensor_info("w", [2**40, 2**40]), pad=64),
           "impossible shape")


def test_tensor_rows_not_whole_blocks(tmp_path: Path):
    refuse(tmp_path, raw(n_tensors=1, body=tensor_info("w", [33], ttype=2), pad=64),
           "not whole 32-blocks")


def test_bad_alignment(tmp_path: Path):
    refuse(tmp_path, raw(n_kv=1, body=kv_u32("general.alignment", 48), pad=64),
           "not a power of two")


def test_missing_architecture(tmp_path: Path):
    refuse(tmp_path, raw(n_kv=1, body=kv_u32("general.alignment", 32), pad=64),
           "general.architecture")


def test_missing_file(tmp_path: Path):
    with pytest.raises(ManifestError, match="cannot read"):
        read_facts([tmp_path / "nope.gguf"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_not_a_regular_file(tmp_path: Path):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(ManifestError, match="not a regular file"):
        read_facts([fifo])
    with pytest.raises(ManifestError, match="not a regular file"):
        read_facts([tmp_path])


def test_wrong_type_for_a_hyperparameter(tmp_path: Path):
    def extra(w):
        w.add_string("llama.attention.key_length", "sixteen")

    [p] = write_model(tmp_path / "m.gguf", extra=extra)
    with pytest.raises(ManifestError, match="should be an integer"):
        read_facts([p])
