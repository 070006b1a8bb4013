"""kit.estimate: what a model needs in memory with given EngineSettings, against llama.cpp's own
KV sizes and peaks measured by bench/memory_estimate.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kit.estimate import compute_bytes, estimate_memory, kv_cache_bytes
from kit.ggufmeta import ModelFacts, read_facts
from kit.settings import EngineSettings
from kit.units import MiB

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def gemma(gemma_path: Path) -> ModelFacts:
    return read_facts([gemma_path])


def test_kv_matches_llama_cpp_log(gemma: ModelFacts):
    """The "CPU KV buffer size" llama.cpp 0.3.36 logged for this model (bench/memory_estimate.py):
    full-size SWA cache (llama-cpp-python's default swa_full=True) and the windowed one."""
    assert kv_cache_bytes(gemma, EngineSettings(512)) == 9 * MiB
    assert kv_cache_bytes(gemma, EngineSettings(2048)) == 36 * MiB
    assert kv_cache_bytes(gemma, EngineSettings(8192)) == 144 * MiB
    # swa_full=False: 15 SWA layers hold PAD(min(n_ctx, 512 + n_ubatch), 256) cells
    assert kv_cache_bytes(gemma, EngineSettings(2048, swa_full=False)) == 21 * MiB
    assert kv_cache_bytes(gemma, EngineSettings(8192, swa_full=False)) == 39 * MiB
    assert kv_cache_bytes(gemma, EngineSettings(8192, kv_bytes_per_element=1)) == 72 * MiB


# Peak RSS (MiB, VmHWM) measured by bench/memory_estimate.py on the build machine (2 cores,
# haswell kernel, context filled, then 32 tokens), llama-cpp-python defaults unless named.
MEASURED_GEMMA_MIB = [
    ({"n_ctx": 512}, 432),
    ({"n_ctx": 2048}, 481),
    ({"n_ctx": 8192}, 671),
    ({"n_ctx": 2048, "swa_full": False}, 455),
    ({"n_ctx": 8192, "swa_full": False}, 552),
    ({"n_ctx": 512, "n_batch": 128}, 411),
    ({"n_ctx": 2048, "n_batch": 128}, 441),
    ({"n_ctx": 2048, "flash_attn": True}, 463),
    ({"n_ctx": 4096, "flash_attn": True}, 503),
]
# `bench/memory_estimate.py --synthetic DIR`: a random-weight F16 llama, 32 heads, 32k vocabulary
SYNTHETIC_LLAMA = ModelFacts(
    architecture="llama", name="Synthetic llama", n_params=202_385_408, n_layers=2, n_embd=2048,
    n_head=32, n_head_kv=8, key_length=64, value_length=64, n_ctx_train=8192, vocab_size=32000,
    file_size=405_581_440, quant="F16", layer_bytes=(71_319_552,) * 2, output_bytes=131_080_192)
MEASURED_SYNTHETIC_MIB = [(512, 514), (2048, 658), (4096, 847), (8192, 1238)]


def assert_close_above(est: int, peak_mib: int) -> None:
    # never below what was measured, and not far above: the estimate adds ~48 MiB for Textual
    # and the chat, which the measuring child does not load
    assert peak_mib * MiB <= est <= peak_mib * MiB * 1.2


@pytest.mark.parametrize(("settings", "peak_mib"), MEASURED_GEMMA_MIB)
def test_estimate_against_measured_gemma(gemma: ModelFacts, settings: dict, peak_mib: int):
    assert_close_above(estimate_memory(gemma, EngineSettings(**settings)).total, peak_mib)


@pytest.mark.parametrize(("n_ctx", "peak_mib"), MEASURED_SYNTHETIC_MIB)
def test_estimate_against_measured_many_heads(n_ctx: int, peak_mib: int):
    assert_close_above(estimate_memory(SYNTHETIC_LLAMA, EngineSettings(n_ctx)).total, peak_mib)


def test_estimate_parts(gemma: ModelFacts):
    est = estimate_memory(gemma, EngineSettings(2048))
    assert (est.n_ctx, est.gpu_layers) == (2048, 0)
    assert est.weights == gemma.file_size
    assert est.kv_cache == kv_cache_bytes(gemma, EngineSettings(2048))
    assert est.compute == compute_bytes(gemma, EngineSettings(2048))
    assert est.total == est.weights + est.kv_cache + est.compute + est.overhead
    assert est.ram == est.total and est.vram == 0
    assert (estimate_memory(gemma, EngineSettings(8192)).total > est.total
            > estimate_memory(gemma, EngineSettings(512)).total)
    assert estimate_memory(gemma, EngineSettings(8192, flash_attn=True)).compute < estimate_memory(
        gemma, EngineSettings(8192)).compute
    with pytest.raises(ValueError):
        estimate_memory(gemma, EngineSettings(0))


def test_threads_cost_no_memory(gemma: ModelFacts):
    assert estimate_memory(gemma, EngineSettings(2048, threads=16)) == estimate_memory(
        gemma, EngineSettings(2048, threads=1))


def test_gpu_split(gemma: ModelFacts):
    all_layers = gemma.n_layers + 1
    cpu = estimate_memory(gemma, EngineSettings(4096))
    full = estimate_memory(gemma, EngineSettings(4096, gpu_layers=all_layers))
    assert full.ram + full.vram == full.total
    # every block's KV and weights in VRAM; the tied output layer is a copy: RAM keeps token_embd
    assert full.vram >= sum(gemma.layer_bytes) + gemma.output_bytes + cpu.kv_cache
    assert full.ram >= gemma.file_size - sum(gemma.layer_bytes)
    # only the output layer (llama.cpp offloads from the top)
    one = estimate_memory(gemma, EngineSettings(4096, gpu_layers=1))
    assert one.vram < full.vram and kv_cache_bytes(gemma, EngineSettings(4096)) <= one.ram
    vrams = [estimate_memory(gemma, EngineSettings(4096, gpu_layers=k)).vram
             for k in range(all_layers + 1)]
    assert vrams == sorted(vrams) and vrams[0] == 0
    # clamped to all
    assert estimate_memory(gemma, EngineSettings(4096, gpu_layers=999)) == full


def test_synthetic_facts_spread_weights():
    f = ModelFacts(architecture="llama", name="x", n_params=8_000_000_000, n_layers=31,
                   n_embd=4096, n_head=32, n_head_kv=8, key_length=128, value_length=128,
                   n_ctx_train=131072, vocab_size=128256, file_size=32 * 1000)
    half = estimate_memory(f, EngineSettings(2048, gpu_layers=16))
    full = estimate_memory(f, EngineSettings(2048, gpu_layers=32))
    assert half.vram < full.vram
    assert full.ram < half.ram


# --- the measurement itself (needs the portable llama_cpp) ---------------------------------------


def _llama_lib() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    lib = Path(spec.origin).parent / "lib" / "libggml-cpu-haswell.so"
    return lib if lib.exists() else None


@pytest.mark.slow
def test_bench_measures_under_the_estimate(gemma: ModelFacts, gemma_path: Path):
    if _llama_lib() is None:
        pytest.skip("needs llama_cpp with its CPU variants (build/install.sh)")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2" not in flags:
        pytest.skip("the haswell kernel needs AVX2")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory_estimate.py"), "--model", str(gemma_path),
         "--ctx", "1024", "--swa", "full", "--flash-attn", "--json"],
        capture_output=True, text=True, timeout=600, check=True)
    [row] = json.loads(out.stdout)
    peak, est = row["measured"]["peak"], row["estimate"]["total"]
    assert peak <= est <= peak * 1.25
    # the estimate priced exactly the settings the child ran with
    assert row["settings"]["flash_attn"] and row["settings"]["n_ctx"] == 1024
    assert row["estimate"] == estimate_memory(gemma, EngineSettings(**row["settings"])).to_dict()
    assert row["measured"]["llama_buffers_mib"]["CPU KV"] == pytest.approx(
        estimate_memory(gemma, EngineSettings(1024)).kv_cache / MiB)
