"""CPU kernel choice: flags rule variants out, crashes stay in the probe child, verdicts are cached."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from kit import ggml, integrity, kernels
from kit.hardware import Host, detect

CRASH_C = "__attribute__((constructor)) static void die(void) { __builtin_trap(); }\n"
# Scores above every real variant, then dies when ggml registers it (ggml_backend_load calls init).
CRASH_AT_LOAD_C = ("int ggml_backend_score(void) { return 1 << 20; }\n"
                   "void *ggml_backend_init(void) { __builtin_trap(); }\n")


def compile_lib(source: str, target: Path) -> Path:
    src = target.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(target), str(src)], check=True)
    return target


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
    assert by_name["haswell"].rounds >= 1 and by_name["haswell"].score > 0
    maps = Path("/proc/self/maps").read_text()
    assert "libggml-cpu-" not in maps  # no kernel entered this process: scoring runs in the children too

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
                          timeout=120, stdin=subprocess.DEVNULL)  # no command: the classic one-shot probe
    assert done.returncode != 0
    assert done.stdout.count("\n") == 1 and kernels.parse_probe_line(done.stdout) == {
        "error": "model bytes do not match the manifest"}


@pytest.mark.slow
def test_probe_child_answers_one_line_per_command(model, crash_and_real):
    path, b3 = model
    haswell = next(v for v in crash_and_real if v.name == "haswell")
    done = subprocess.run(kernels.probe_command(haswell, path, b3, 1, serve=True), input="score\nload\nround\nround\n",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 4  # llama.cpp's chatter goes to stderr, never between the answers
    assert kernels.parse_answer(lines[0], ("score",))["score"] > 0
    assert kernels.parse_answer(lines[1], ("loaded_s",))["loaded_s"] > 0
    assert all(kernels.parse_answer(line)["gen_tps"] > 1 for line in lines[2:])


def test_unknown_probe_command_is_an_error_line(crash_and_real):
    haswell = next(v for v in crash_and_real if v.name == "haswell")
    done = subprocess.run(kernels.probe_command(haswell, Path("/nonexistent.gguf"), "0" * 64, 1, serve=True),
                          input="dance\n",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and json.loads(done.stdout) == {"error": "unknown probe command 'dance'"}


# ---------------------------------------------------------------- the policy, on numbers

def test_ggml_order_is_best_score_first_and_stable_on_ties():
    assert kernels.by_score({"haswell": 64, "zen4": 1984, "icelake": 1472, "copy": 64}) == [
        "zen4", "icelake", "haswell", "copy"]


def test_a_variant_beaten_beyond_the_margin_cannot_win():
    best = {"zen4": 0.33, "icelake": 0.36, "haswell": 0.40}
    assert kernels.beaten(best) == ["haswell"]  # 21 % behind even in its best round
    assert kernels.beaten(best, 1.25) == []


def test_settled_when_every_variant_is_within_noise_of_the_leader():
    assert kernels.settled({"zen4": 0.330, "cooperlake": 0.335})
    assert not kernels.settled({"zen4": 0.330, "cooperlake": 0.350})


def test_ggml_top_score_breaks_a_tie_within_noise_and_only_then():
    def ok(name, seconds, score):
        return kernels.ProbeResult(name, "ok", prompt_tps=1.0, gen_tps=1.0, seconds=seconds, score=score)

    crashed = kernels.ProbeResult("sapphirerapids", "crashed", "SIGILL", score=2000)
    tie = [ok("icelake", 0.330, 1472), ok("zen4", 0.335, 1984), crashed]
    assert kernels.pick(tie).variant == "zen4"  # 1.5 % slower: noise; ggml's top-scored working one
    clear = [ok("icelake", 0.300, 1472), ok("zen4", 0.335, 1984), crashed]
    assert kernels.pick(clear).variant == "icelake"
    assert kernels.pick([crashed]) is None


def test_cached_results_ignore_fields_of_another_version():
    entry = {"chosen": "zen4", "results": [{"variant": "zen4", "state": "ok", "seconds": 0.3, "new_field": 1}]}
    assert kernels._cached_results(entry)[0].seconds == 0.3
    assert kernels._cached_results({"chosen": "zen4"}) is None


# ---------------------------------------------------------------- the policy, on real kernels in real children

@pytest.fixture
def spawned(monkeypatch) -> list[str]:
    """The variant of every probe child started (observing the one spawn point, not replacing it)."""
    names: list[str] = []
    real = kernels.spawn

    def spy(command):
        names.append(Path(command[command.index("--variant") + 1]).name)
        return real(command)

    monkeypatch.setattr(kernels, "spawn", spy)
    return names


@pytest.mark.slow
def test_candidates_are_ranked_by_ggml_scores_measured_in_children(model):
    path, b3 = model
    keep, _ = kernels.candidates(ggml.list_variants(), detect())
    field = kernels.ProbeField(keep, path, b3, 1, None)
    try:
        order = field._score()
    finally:
        for child in field.children.values():
            child.close()
    scores = field.scores
    assert order == sorted(order, key=lambda n: -scores[n]) and len(order) >= 2
    flags = {v.name: set(v.required_flags) for v in keep}
    for a in order:  # ggml adds a bit per feature: a strict superset of instructions scores higher
        for b in order:
            if flags[b] < flags[a]:
                assert scores[a] > scores[b], (a, b, scores)
    assert "libggml-cpu-" not in Path("/proc/self/maps").read_text()


@pytest.mark.slow
def test_flags_that_rule_a_variant_out_mean_it_is_never_started(model, tmp_path, spawned):
    path, b3 = model
    host = detect()
    no_avx512 = replace(host, cpu_flags=frozenset(f for f in host.cpu_flags if not f.startswith("avx512")
                                                  and f != "avx_vnni"))
    choice = kernels.choose_kernel(no_avx512, path, b3, state=tmp_path, variants=ggml.list_variants())
    assert choice.chosen == "haswell"
    assert spawned == ["libggml-cpu-haswell.so"]  # the only AVX2 kernel these flags allow
    assert {r.variant for r in choice.results if r.detail.startswith("CPU lacks")} >= {"zen4", "skylakex"}


def test_probe_rounds_can_be_bounded_for_a_slow_cpu(monkeypatch):
    for value, expected in (("1", 1), ("2", 2), ("9", 3), ("0", 1), ("many", 3)):
        monkeypatch.setenv(kernels.ROUNDS_SETTING, value)
        assert kernels.max_rounds() == expected, value
    monkeypatch.delenv(kernels.ROUNDS_SETTING)
    assert kernels.max_rounds() == kernels.MAX_ROUNDS == 3


@pytest.mark.slow
def test_rounds_are_interleaved_in_score_order(model):
    path, b3 = model
    keep, _ = kernels.candidates(ggml.list_variants(), detect())
    fast = [v for v in keep if "avx2" in v.required_flags]
    field = kernels.ProbeField(fast, path, b3, 2, None)
    results = field.run(slots=3)
    probed = [r for r in results if r.rounds]
    order = [n for n in kernels.by_score(field.scores)][:3]
    assert sorted(r.variant for r in probed) == sorted(order)
    rounds: list[list[str]] = []  # the trace's rounds: a new one starts when a variant comes again
    for name, command in field.trace:
        if command == "round":
            if not rounds or name in rounds[-1]:
                rounds.append([])
            rounds[-1].append(name)
    assert rounds[0] == order  # A B C, in ggml's order
    for before, after in zip(rounds, rounds[1:], strict=False):  # again A B C: the survivors, same order
        assert after == [n for n in before if n in after]
    assert max(r.rounds for r in probed) <= kernels.MAX_ROUNDS
    skipped = [r for r in results if r.state == "skipped"]
    assert len(skipped) == len(fast) - 3 and all(r.score < field.scores[order[-1]] for r in skipped)


@pytest.mark.slow
def test_a_variant_that_cannot_win_stops_the_probe_early(model):
    """x64 (no SIMD) against haswell: two rounds show it cannot win; haswell alone needs no more."""
    path, b3 = model
    variants = {v.name: v for v in ggml.list_variants()}
    field = kernels.ProbeField([variants["x64"], variants["haswell"]], path, b3, 2, None)
    results = {r.variant: r for r in field.run(slots=3)}
    assert field.scores["haswell"] > field.scores["x64"]
    assert [n for n, c in field.trace if c == "round"] == ["haswell", "x64"] * 2  # not MAX_ROUNDS
    assert results["x64"].ok and results["x64"].rounds == 2 and results["haswell"].rounds == 2
    assert kernels.pick(list(results.values())).variant == "haswell"


@pytest.mark.slow
def test_a_variant_that_crashes_when_loaded_gives_its_slot_to_the_next(model, tmp_path):
    path, b3 = model
    trap = compile_lib(CRASH_AT_LOAD_C, tmp_path / "libggml-cpu-zen4.so")
    for name in ("haswell", "x64"):
        shutil.copy2(ggml.lib_dir() / f"libggml-cpu-{name}.so", tmp_path / f"libggml-cpu-{name}.so")
    variants = {v.name: v for v in ggml.list_variants(tmp_path)}
    assert variants["zen4"].path == trap
    field = kernels.ProbeField([variants[n] for n in ("zen4", "haswell", "x64")], path, b3, 2, None)
    results = {r.variant: r for r in field.run(slots=1)}
    assert results["zen4"].state == "crashed" and results["zen4"].detail == "SIGILL"
    assert results["zen4"].score == 1 << 20  # it was first in ggml's order
    assert results["haswell"].ok and results["haswell"].rounds >= 1
    assert results["x64"].state == "skipped" and results["x64"].rounds == 0
    assert [n for n, c in field.trace if c == "load"] == ["zen4", "haswell"]
    assert "libggml-cpu-zen4" not in Path("/proc/self/maps").read_text()


@pytest.mark.slow
def test_a_child_not_served_ignores_an_idle_stdin(model, crash_and_real):
    """Without --serve the child never reads stdin: a caller that leaves it open (an inherited
    pipe) gets the classic answer at once."""
    path, _ = model
    haswell = next(v for v in crash_and_real if v.name == "haswell")
    proc = subprocess.Popen(kernels.probe_command(haswell, path, "0" * 64, 1), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out = proc.stdout.readline()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert kernels.parse_probe_line(out) == {"error": "model bytes do not match the manifest"}
