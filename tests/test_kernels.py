"""CPU kernel choice: flags rule variants out, crashes stay in the probe child, verdicts are cached."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kit import ggml, integrity, kernels
from kit.hardware import Host, detect

CRASH_C = "__attribute__((constructor)) static void die(void) { __builtin_trap(); }\n"


@pytest.fixture(scope="module")
def model(gemma_path):
    return gemma_path, integrity.hash_file(gemma_path).blake3


@pytest.fixture
def crash_and_real(tmp_path) -> list[ggml.Variant]:
    """A 'zen4' that dies with SIGILL as soon as it is loaded, and a real haswell kernel."""
    src = tmp_path / "crash.c"
    src.write_text(CRASH_C)
    crash = tmp_path / "libggml-cpu-zen4.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(crash), str(src)], check=True)
    real = tmp_path / "libggml-cpu-haswell.so"
    shutil.copy2(ggml.lib_dir() / "libggml-cpu-haswell.so", real)
    return ggml.list_variants(tmp_path)


def test_shipped_variants_are_listed():
    names = {v.name for v in ggml.list_variants()}
    assert {"x64", "haswell", "skylakex", "icelake", "zen4", "sapphirerapids"} <= names


def test_flags_rule_out_variants():
    variants = ggml.list_variants()
    old_cpu = Host(os="linux", arch="x86_64", cpu_flags=frozenset({"sse2", "sse4_2", "avx"}))
    keep, skipped = kernels.candidates(variants, old_cpu)
    assert {v.name for v in keep} == {"x64", "sse42", "sandybridge"}
    haswell = next(r for r in skipped if r.variant == "haswell")
    assert haswell.state == "skipped" and "f16c" in haswell.detail and "avx2" in haswell.detail


@pytest.mark.slow
def test_crashing_variant_is_skipped_and_next_best_used(model, crash_and_real, tmp_path):
    path, b3 = model
    host = detect()
    state = tmp_path / "state"
    state.mkdir()
    choice = kernels.choose_kernel(host, path, b3, state=state, variants=crash_and_real)
    by_name = {r.variant: r for r in choice.results}
    assert by_name["zen4"].state == "crashed" and by_name["zen4"].detail == "SIGILL"
    assert by_name["haswell"].ok and by_name["haswell"].gen_tps > 1
    assert choice.chosen == "haswell" and not choice.cached
    maps = Path("/proc/self/maps").read_text()
    assert "libggml-cpu-zen4" not in maps  # the crashing kernel never entered this process

    again = kernels.choose_kernel(host, path, b3, state=state, variants=crash_and_real)
    assert again.cached and again.chosen == "haswell" and again.results == choice.results


@pytest.mark.slow
def test_probe_refuses_a_model_that_does_not_match(model, crash_and_real):
    path, _ = model
    haswell = next(v for v in crash_and_real if v.name == "haswell")
    result = kernels.probe_variant(haswell, path, "0" * 64, threads=1)
    assert result.state == "failed" and "do not match" in result.detail


@pytest.mark.slow
def test_read_only_state_keeps_verdict_in_memory(model, crash_and_real):
    path, b3 = model
    kernels._memory_cache.clear()
    first = kernels.choose_kernel(detect(), path, b3, state=None, variants=crash_and_real)
    assert not first.cached and kernels._memory_cache
    assert kernels.choose_kernel(detect(), path, b3, state=None, variants=crash_and_real).cached


def test_no_working_kernel_is_a_clear_error(model, tmp_path):
    path, b3 = model
    src = tmp_path / "crash.c"
    src.write_text(CRASH_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "libggml-cpu-x64.so"), str(src)], check=True)
    with pytest.raises(kernels.KernelError, match="no CPU kernel works on this host: x64 crashed SIGILL"):
        kernels.choose_kernel(detect(), path, b3, state=tmp_path, variants=ggml.list_variants(tmp_path))


def test_probe_line_is_exactly_one_json_result():
    good = '{"prompt_tps": 500.0, "gen_tps": 40.0, "seconds": 0.5}'
    assert kernels.parse_probe_line(good + "\n")["gen_tps"] == 40.0
    assert kernels.parse_probe_line('{"error": "model bytes do not match the manifest"}') == {
        "error": "model bytes do not match the manifest"}
    assert kernels.parse_probe_line("llama.cpp chatter\n" + good) is None  # two lines: not the protocol
    assert kernels.parse_probe_line('{"prompt_tps": "fast"}') is None
    assert kernels.parse_probe_line("") is None


@pytest.mark.slow
def test_probe_child_speaks_one_json_line_even_when_it_fails(model, crash_and_real):
    path, _ = model
    haswell = next(v for v in crash_and_real if v.name == "haswell")
    done = subprocess.run(kernels.probe_command(haswell, path, "0" * 64, 1), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert done.stdout.count("\n") == 1 and kernels.parse_probe_line(done.stdout) == {
        "error": "model bytes do not match the manifest"}
