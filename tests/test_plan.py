"""kit.plan: recorded hosts + the real Gemma 3 270M + realistic synthetic models -> LaunchPlan,
with its reasons, overrides accepted and refused, and the fallback ladder's order."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kit.errors import PlanError
from kit.estimate import estimate_memory, sealed_ram
from kit.ggufmeta import ModelFacts, read_facts
from kit.hardware import Host
from kit.plan import (
    BY_PATH,
    MIN_CTX,
    MIN_TALK_TPS,
    SAFETY_MIN,
    SEALED,
    CpuSpeed,
    LaunchPlan,
    ModelOption,
    Overrides,
    fallback_steps,
    load_mode,
    make_budget,
    make_plan,
)
from kit.settings import EngineSettings
from kit.units import GiB, MiB

HOSTS = Path(__file__).parent / "fixtures" / "hosts"


def host(name: str) -> Host:
    return Host.from_dict(json.loads((HOSTS / name / "host.json").read_text()))


def q6_k(n: int) -> int:  # bytes of n weights in Q6_K (210 bytes per 256)
    return n * 210 // 256


def q4_k(n: int) -> int:  # Q4_K: 144 bytes per 256
    return n * 144 // 256


def synthetic(name: str, *, n_params: int, n_layers: int, n_embd: int, n_head: int,
              n_head_kv: int, head_dim: int, vocab: int, file_size: int, embd_bytes: int,
              output_bytes: int, tied: bool, label: str, arch: str = "llama") -> ModelFacts:
    """Facts of a real Q4_K_M file (shapes from the model cards, sizes of the published GGUF)."""
    blocks = file_size - embd_bytes - (0 if tied else output_bytes)
    return ModelFacts(
        architecture=arch, name=name, n_params=n_params, n_layers=n_layers, n_embd=n_embd,
        n_head=n_head, n_head_kv=n_head_kv, key_length=head_dim, value_length=head_dim,
        n_ctx_train=131072, vocab_size=vocab, file_size=file_size, quant="Q4_K_M",
        size_label=label, chat_template="{{ messages }}",
        layer_bytes=(blocks // n_layers,) * n_layers, output_bytes=output_bytes,
        tied_embeddings=tied)


LLAMA_1B = synthetic(  # Llama 3.2 1B Instruct Q4_K_M: 808 MB, tied embeddings
    "Llama 3.2 1B", n_params=1_235_814_400, n_layers=16, n_embd=2048, n_head=32, n_head_kv=8,
    head_dim=64, vocab=128256, file_size=807_694_464, embd_bytes=q6_k(2048 * 128256),
    output_bytes=q6_k(2048 * 128256), tied=True, label="1B")
PHI_MINI = synthetic(  # Phi-3.5 mini instruct Q4_K_M: 2.39 GB, no GQA (32 KV heads)
    "Phi-3.5 mini", n_params=3_821_079_552, n_layers=32, n_embd=3072, n_head=32, n_head_kv=32,
    head_dim=96, vocab=32064, file_size=2_393_232_672, embd_bytes=q4_k(3072 * 32064),
    output_bytes=q6_k(3072 * 32064), tied=False, label="3.8B", arch="phi3")
LLAMA_8B = synthetic(  # Llama 3.1 8B Instruct Q4_K_M: 4.92 GB
    "Llama 3.1 8B", n_params=8_030_261_248, n_layers=32, n_embd=4096, n_head=32, n_head_kv=8,
    head_dim=128, vocab=128256, file_size=4_920_739_232, embd_bytes=q4_k(4096 * 128256),
    output_bytes=q6_k(4096 * 128256), tied=False, label="8B")


@pytest.fixture(scope="session")
def models(gemma_path: Path) -> list[ModelOption]:
    return [
        ModelOption("gemma-3-270m", "Gemma 3 270M", read_facts([gemma_path])),
        ModelOption("llama-3.2-1b", "Llama 3.2 1B", LLAMA_1B),
        ModelOption("phi-3.5-mini", "Phi-3.5 mini", PHI_MINI),
        ModelOption("llama-3.1-8b", "Llama 3.1 8B", LLAMA_8B),
    ]


def plan_for(name: str, models, backends=(), **kw) -> LaunchPlan:
    return make_plan(host(name), models, runtime_backends=frozenset(backends),
                     cpu_variant="haswell", **kw)


def verdict(plan: LaunchPlan, model_id: str):
    return next(v for v in plan.verdicts if v.model_id == model_id)


def check_invariants(plan: LaunchPlan, h: Host, backends=()) -> None:
    budget = make_budget(h, frozenset(backends))
    assert budget.fits(plan.estimate)  # the plan fits what it said is usable
    assert sum(v.chosen for v in plan.verdicts) == 1
    assert all(v.reason for v in plan.verdicts) and all(d.reason for d in plan.decisions)
    assert plan.threads == max(1, h.physical_cores)
    json.dumps(plan.to_dict())  # JSON-able as it is


# --- one plan per recorded host -----------------------------------------------------------------


def test_netbook_gets_the_1b_at_a_reduced_context(models):
    p = plan_for("netbook-4gb", models)
    check_invariants(p, host("netbook-4gb"))
    assert p.model_id == "llama-3.2-1b" and p.gpu_layers == 0 and p.gpu is None
    assert 2048 <= p.n_ctx < 8192 and p.n_ctx % 256 == 0
    assert "largest that fits" in p.decision("n_ctx").reason
    assert verdict(p, "llama-3.1-8b").reason.startswith("Llama 3.1 8B skipped: needs 4.")
    assert "1.6 GiB RAM usable" in verdict(p, "phi-3.5-mini").reason
    assert "Llama 3.2 1B is larger" in verdict(p, "gemma-3-270m").reason
    # one more step of 256 would not fit
    assert not make_budget(host("netbook-4gb")).fits(estimate_memory(LLAMA_1B, EngineSettings(p.n_ctx + 256)))


def test_container_2gb_gets_the_small_model(models):
    p = plan_for("container-2gb", models)
    check_invariants(p, host("container-2gb"))
    assert (p.model_id, p.n_ctx, p.threads) == ("gemma-3-270m", 8192, 4)
    assert p.decision("n_ctx").reason.startswith("8192 tokens: the cap")
    budget = p.decision("memory")
    assert budget.value == host("container-2gb").ram_available - SAFETY_MIN  # 512 MiB floor
    v = verdict(p, "llama-3.2-1b")  # fits, but without room to talk: the 270M is better
    assert v.fits and v.max_ctx < 2048 and "room to talk" in v.reason
    assert not verdict(p, "phi-3.5-mini").fits


def test_laptop_8gb_gets_phi_with_room_to_talk(models):
    p = plan_for("laptop-8gb", models)
    check_invariants(p, host("laptop-8gb"))
    assert p.model_id == "phi-3.5-mini" and 2048 <= p.n_ctx < 8192


def test_partly_unreadable_prefers_room_to_talk(models):
    p = plan_for("partly-unreadable", models)
    check_invariants(p, host("partly-unreadable"))
    assert p.model_id == "phi-3.5-mini"
    v = verdict(p, "llama-3.1-8b")
    assert v.fits and v.max_ctx < 2048  # the 8B fits, but only at a context too small to chat
    assert "fits only at" in v.reason and "room to talk" in v.reason


def test_rpi5_runs_on_the_cpu(models):
    p = plan_for("rpi5-8gb", models)
    check_invariants(p, host("rpi5-8gb"))
    # By the memory rules alone the 8B fits a Pi 5 with 7.2 GiB free (at a reduced context)
    assert p.model_id == "llama-3.1-8b" and p.gpu_layers == 0 and p.threads == 4
    assert 2048 <= p.n_ctx < 8192
    assert verdict(p, "phi-3.5-mini").fits


def test_rpi5_with_a_measured_cpu_speed_keeps_a_talking_pace(models, gemma_path):
    # A Pi 5 generates ~20 tok/s with the 253 MB demo model: the 8B would crawl at ~1 tok/s.
    speed = CpuSpeed(reference_bytes=gemma_path.stat().st_size, gen_tps=20.0)
    p = plan_for("rpi5-8gb", models, cpu_speed=speed)
    check_invariants(p, host("rpi5-8gb"))
    assert p.model_id == "llama-3.2-1b"
    assert "talking pace" in p.decision("model").reason
    slow = verdict(p, "llama-3.1-8b")
    assert slow.fits and "tok/s expected on this CPU, slower than reading" in slow.reason
    assert speed.expected_tps(LLAMA_8B, 0) < MIN_TALK_TPS <= speed.expected_tps(LLAMA_1B, 0)


def test_a_fast_cpu_keeps_the_largest_model(models, gemma_path):
    speed = CpuSpeed(reference_bytes=gemma_path.stat().st_size, gen_tps=200.0)
    assert plan_for("rpi5-8gb", models, cpu_speed=speed).model_id == "llama-3.1-8b"


def test_when_nothing_keeps_pace_the_fastest_fitting_model_runs(models, gemma_path):
    crawl = CpuSpeed(reference_bytes=gemma_path.stat().st_size, gen_tps=1.0)
    p = plan_for("rpi5-8gb", models, cpu_speed=crawl)
    assert p.model_id == "llama-3.1-8b"  # no model keeps pace: memory rules decide, and say so
    assert "none keeps a talking pace" in p.decision("model").reason


def test_a_model_wholly_on_the_gpu_is_not_judged_by_cpu_speed(models, gemma_path):
    crawl = CpuSpeed(reference_bytes=gemma_path.stat().st_size, gen_tps=1.0)
    p = plan_for("workstation-32gb-rtx4090", models, backends={"cuda"}, cpu_speed=crawl)
    assert p.model_id == "llama-3.1-8b" and p.gpu_layers == LLAMA_8B.n_layers + 1
    assert crawl.expected_tps(LLAMA_8B, LLAMA_8B.n_layers + 1) is None


def test_workstation_4090_puts_the_8b_on_the_gpu(models):
    p = plan_for("workstation-32gb-rtx4090", models, {"cuda"})
    check_invariants(p, host("workstation-32gb-rtx4090"), {"cuda"})
    assert (p.model_id, p.n_ctx, p.gpu_layers) == ("llama-3.1-8b", 8192, 33)
    assert p.gpu is not None and p.gpu.name == "NVIDIA GeForce RTX 4090"
    assert p.decision("gpu_layers").reason.startswith("all 33 layers on NVIDIA GeForce RTX 4090")
    assert p.estimate.vram > 5 * GiB and p.estimate.ram < 1 * GiB
    assert p.threads == 16


def test_rtx3060_takes_as_many_layers_as_fit(models):
    h = host("desktop-16gb-rtx3060")
    p = plan_for("desktop-16gb-rtx3060", models, {"cuda"})
    check_invariants(p, h, {"cuda"})
    assert p.model_id == "llama-3.1-8b" and p.n_ctx == 8192
    assert 0 < p.gpu_layers < 33
    assert "as many as fit" in p.decision("gpu_layers").reason
    budget = make_budget(h, frozenset({"cuda"}))
    more = estimate_memory(LLAMA_8B, EngineSettings(8192, gpu_layers=p.gpu_layers + 1))
    assert more.vram > budget.vram  # one more layer would not fit


def test_gpu_without_a_matching_backend_is_not_used(models):
    p = plan_for("desktop-16gb-rtx3060", models)  # a CPU-only runtime
    assert p.gpu_layers == 0 and p.gpu is None
    assert "built for the CPU only" in p.decision("gpu").reason
    p = plan_for("desktop-32gb-rx6800", models, {"cuda"})
    assert p.gpu_layers == 0 and "drives only cuda" in p.decision("gpu").reason
    p = plan_for("desktop-32gb-rx6800", models, {"vulkan"})
    assert p.gpu_layers == 33 and p.gpu.backend == "vulkan"
    p = plan_for("desktop-64gb-rx7900xtx-rocm", models, {"rocm"})
    assert (p.model_id, p.gpu_layers) == ("llama-3.1-8b", 33)


def test_apple_unified_memory_is_one_pool(models):
    h = host("macbook-m2-16gb")
    p = plan_for("macbook-m2-16gb", models, {"metal"})
    check_invariants(p, h, {"metal"})
    assert (p.model_id, p.gpu_layers) == ("llama-3.1-8b", 33)
    assert "not counted twice" in p.decision("gpu").reason
    usable_ram = p.decision("memory").value
    assert p.estimate.ram + p.estimate.vram <= usable_ram  # RAM and "VRAM" together, once
    # with only 6 GiB free the same Mac must not plan as if it had RAM + VRAM on top
    small = Host.from_dict({**h.to_dict(), "ram_available": 6 * GiB})
    p = make_plan(small, models, runtime_backends=frozenset({"metal"}))
    assert p.estimate.ram + p.estimate.vram <= make_budget(small, frozenset({"metal"})).ram


def test_integrated_gpu_of_unknown_size_shares_ram(models):
    p = plan_for("laptop-16gb-intel-igpu", models, {"vulkan"})
    assert p.gpu is not None and p.gpu.unified_memory
    assert "unified memory" in p.decision("gpu").reason


def test_margin_is_15_percent_above_the_floor(models):
    p = plan_for("workstation-32gb-rtx4090", models, {"cuda"})
    avail = host("workstation-32gb-rtx4090").ram_available
    assert p.decision("memory").value == avail - int(avail * 0.15)


def test_context_never_exceeds_training():
    short = ModelOption("short", "Short", synthetic(
        "Short", n_params=10**9, n_layers=16, n_embd=2048, n_head=32, n_head_kv=8, head_dim=64,
        vocab=32000, file_size=700 * MiB, embd_bytes=60 * MiB, output_bytes=60 * MiB,
        tied=True, label="1B"))
    short = ModelOption(short.id, short.name, ModelFacts.from_dict(
        {**short.facts.to_dict(), "n_ctx_train": 2048}))
    p = make_plan(host("workstation-32gb-rtx4090"), [short])
    assert p.n_ctx == 2048 and "trained for" in p.decision("n_ctx").reason


def test_nothing_fits(models):
    tiny = Host(os="linux", arch="x86_64", physical_cores=2, logical_cores=2,
                ram_total=1 * GiB, ram_available=700 * MiB)
    with pytest.raises(PlanError, match=r"no model on this stick fits: the smallest, Gemma 3 "
                                        r"270M, needs .* at 512 tokens, 188\.0 MiB RAM usable"):
        make_plan(tiny, models)
    with pytest.raises(PlanError, match="holds no models"):
        make_plan(tiny, [])


def test_unknown_memory_is_assumed_small(models):
    blind = Host(os="linux", arch="x86_64")
    p = make_plan(blind, models)
    assert "RAM size unknown: assuming 2.0 GiB" in p.decision("memory").reason
    assert p.model_id == "llama-3.2-1b" and p.threads == 1
    assert p.estimate.total <= 2 * GiB - SAFETY_MIN
    half = Host(os="linux", arch="x86_64", ram_total=8 * GiB)
    assert "assuming half of 8.0 GiB" in make_plan(half, models).decision("memory").reason


def test_same_inputs_same_plan(models):
    assert plan_for("laptop-8gb", models) == plan_for("laptop-8gb", models)
    assert plan_for("laptop-8gb", models) == plan_for("laptop-8gb", list(reversed(models)))


@pytest.mark.parametrize(("host_name", "backends"), [
    ("netbook-4gb", ()), ("desktop-16gb-rtx3060", ("cuda",)), ("macbook-m2-16gb", ("metal",))])
def test_the_estimate_prices_the_settings_the_engine_gets(models, host_name, backends):
    facts = {m.id: m.facts for m in models}
    p = plan_for(host_name, models, backends)
    steps = fallback_steps(p, host(host_name), models, runtime_backends=frozenset(backends))
    for plan in [p, *steps]:
        s = plan.settings
        assert estimate_memory(facts[plan.model_id], s) == plan.estimate
        assert (plan.n_ctx, plan.threads, plan.gpu_layers) == (s.n_ctx, s.threads, s.gpu_layers)
        assert (s.n_ctx, s.gpu_layers) == (plan.estimate.n_ctx, plan.estimate.gpu_layers)
        # the rest is EngineSettings' defaults: llama-cpp-python's, which the kit keeps
        assert s == EngineSettings(s.n_ctx, threads=p.threads, gpu_layers=s.gpu_layers)
        assert plan.to_dict()["settings"] == s.to_dict()


def test_to_dict_has_what_the_cli_renders(models):
    d = json.loads(json.dumps(plan_for("desktop-16gb-rtx3060", models, {"cuda"}).to_dict()))
    assert {"model_id", "n_ctx", "threads", "gpu_layers", "cpu_variant", "gpu", "estimate",
            "decisions", "verdicts"} <= set(d)
    assert d["cpu_variant"] == "haswell" and d["gpu"]["backend"] == "cuda"
    assert all({"topic", "value", "reason"} <= set(x) for x in d["decisions"])
    assert all({"model_id", "reason", "fits", "chosen"} <= set(v) for v in d["verdicts"])
    assert d["estimate"]["ram"] + d["estimate"]["vram"] == d["estimate"]["total"]


# --- overrides ----------------------------------------------------------------------------------


def test_overrides_accepted(models):
    p = plan_for("workstation-32gb-rtx4090", models, {"cuda"},
                 overrides=Overrides(model="gemma-3-270m", n_ctx=1024, threads=4, gpu_layers=10))
    assert (p.model_id, p.n_ctx, p.threads, p.gpu_layers) == ("gemma-3-270m", 1024, 4, 10)
    assert p.decision("model").reason == "Gemma 3 270M, as asked"
    assert p.decision("n_ctx").reason.startswith("1024 tokens, as asked")
    assert p.decision("threads").reason == "4 threads, as asked"
    # a context between 128 and 512 may be forced; all-layers spelled llama.cpp's way (999)
    p = plan_for("workstation-32gb-rtx4090", models, {"cuda"},
                 overrides=Overrides(n_ctx=256, gpu_layers=999))
    assert (p.model_id, p.n_ctx, p.gpu_layers) == ("llama-3.1-8b", 256, 33)
    assert "999 asked" in p.decision("gpu_layers").reason
    # gpu_layers=0 on a GPU host is CPU only
    p = plan_for("workstation-32gb-rtx4090", models, {"cuda"}, overrides=Overrides(gpu_layers=0))
    assert p.gpu_layers == 0 and p.gpu is None
    # forcing every layer onto a small GPU shrinks the context until they fit
    p = plan_for("desktop-16gb-rtx3060", models, {"cuda"},
                 overrides=Overrides(model="llama-3.1-8b", gpu_layers=33))
    assert p.gpu_layers == 33 and MIN_CTX <= p.n_ctx < 8192
    # a forced context picks the largest model that fits it
    p = plan_for("netbook-4gb", models, overrides=Overrides(n_ctx=8192))
    assert (p.model_id, p.n_ctx) == ("gemma-3-270m", 8192)


@pytest.mark.parametrize(
    ("host_name", "overrides", "match"),
    [
        ("laptop-8gb", Overrides(model="llama-70b"),
         r"unknown model 'llama-70b'; this stick has: gemma-3-270m, llama-3.2-1b, "
         r"phi-3.5-mini, llama-3.1-8b"),
        ("laptop-8gb", Overrides(n_ctx=64), "context 64 is too small: at least 128"),
        ("laptop-8gb", Overrides(n_ctx=200_000), r"more than any model .* \(131072 tokens\)"),
        ("laptop-8gb", Overrides(model="gemma-3-270m", n_ctx=65536),
         r"more than Gemma 3 270M was trained for \(32768 tokens\)"),
        ("laptop-8gb", Overrides(threads=0), "threads must be between 1 and 4"),
        ("laptop-8gb", Overrides(threads=5), "threads must be between 1 and 4"),
        ("workstation-32gb-rtx4090", Overrides(gpu_layers=-1), "cannot be negative"),
        ("netbook-4gb", Overrides(gpu_layers=5), "no usable GPU .*no GPU found"),
        ("netbook-4gb", Overrides(model="llama-3.1-8b"),
         r"Llama 3.1 8B does not fit this host: needs 4\.\d GiB at 512 tokens, 1.6 GiB RAM "
         r"usable"),
        ("desktop-16gb-rtx3060", Overrides(model="llama-3.1-8b", gpu_layers=33, n_ctx=8192),
         r"33 GPU layers need \d\.\d GiB of VRAM at 8192 tokens, 4.8 GiB usable"),
    ],
)
def test_overrides_refused(models, host_name, overrides, match):
    backends = {"cuda"} if "rtx" in host_name else set()
    with pytest.raises(PlanError, match=match) as info:
        plan_for(host_name, models, backends, overrides=overrides)
    assert "\n" not in str(info.value)


# --- the fallback ladder ------------------------------------------------------------------------


def test_fallback_ladder_with_a_gpu(models):
    h = host("desktop-16gb-rtx3060")
    p = plan_for("desktop-16gb-rtx3060", models, {"cuda"})
    steps = fallback_steps(p, h, models, runtime_backends=frozenset({"cuda"}))
    shape = [(s.model_id, s.gpu_layers, s.gpu is not None, s.n_ctx) for s in steps]
    k = p.gpu_layers
    assert shape == [
        ("llama-3.1-8b", k // 2, True, 8192),  # fewer GPU layers: half
        ("llama-3.1-8b", 0, True, 8192),  # then none (GPU backend still there)
        ("llama-3.1-8b", 0, False, 8192),  # then CPU only
        ("llama-3.1-8b", 0, False, 4096),  # then smaller contexts
        ("llama-3.1-8b", 0, False, 2048),
        ("llama-3.1-8b", 0, False, 1024),
        ("llama-3.1-8b", 0, False, 512),
        ("phi-3.5-mini", 0, False, 8192),  # then each smaller model
        ("llama-3.2-1b", 0, False, 8192),
        ("gemma-3-270m", 0, False, 8192),
    ]
    reasons = [s.decision("fallback") for s in steps]
    assert [r.value for r in reasons] == list(range(1, len(steps) + 1))
    assert reasons[0].reason == f"{k} GPU layers failed: trying {k // 2}"
    assert reasons[2].reason == "the GPU failed: CPU only"
    assert reasons[3].reason == "8192 tokens failed: trying 4096"
    assert reasons[7].reason == "Llama 3.1 8B failed: trying the smaller Phi-3.5 mini"
    for s in steps:
        check_invariants(s, h, {"cuda"})
        assert s.cpu_variant == "haswell" and s.threads == p.threads


def test_fallback_ladder_on_the_cpu(models):
    h = host("netbook-4gb")
    p = plan_for("netbook-4gb", models)
    steps = fallback_steps(p, h, models)
    assert all(s.gpu is None and s.gpu_layers == 0 for s in steps)
    ctxs = [s.n_ctx for s in steps if s.model_id == "llama-3.2-1b"]
    assert ctxs == sorted(ctxs, reverse=True) and ctxs[-1] == MIN_CTX and ctxs[0] < p.n_ctx
    assert steps[-1].model_id == "gemma-3-270m"
    # the smallest model at the smallest context has nowhere left to go
    last = plan_for("netbook-4gb", models, overrides=Overrides(model="gemma-3-270m", n_ctx=512))
    assert fallback_steps(last, h, models) == []


# --- load mode: sealed memfd copy or by path (kit.plan.load_mode) ---------------------------------

def test_a_cpu_plan_that_fits_also_fits_sealed(models):
    """On the CPU the sealed copy costs what the mapped file did: weights are counted once."""
    for name in ("laptop-8gb", "netbook-4gb", "container-2gb"):
        p = plan_for(name, models)
        facts = next(m.facts for m in models if m.id == p.model_id)
        assert sealed_ram(facts, p.settings) == p.estimate.ram
        mode = load_mode(host(name), p, facts, memfd_problem=None)
        assert mode.sealed and mode.mode == SEALED and "sealed memory" in mode.reason, (name, mode)


def test_offloaded_weights_stay_in_ram_when_sealed(models):
    """llama.cpp unmaps offloaded tensors, but a memfd keeps every page: the 8B on a 4090 would
    need its whole file in RAM too, which a 32 GiB host has; on the 3060's 16 GiB it does not fit."""
    p = plan_for("workstation-32gb-rtx4090", models, {"cuda"})
    assert sealed_ram(LLAMA_8B, p.settings) - p.estimate.ram > 4 * GiB
    assert load_mode(host("workstation-32gb-rtx4090"), p, LLAMA_8B, memfd_problem=None,
                     runtime_backends=frozenset({"cuda"})).sealed
    tight = replace(host("desktop-16gb-rtx3060"), ram_available=5 * GiB)
    p = make_plan(tight, models, runtime_backends=frozenset({"cuda"}), cpu_variant="haswell")
    facts = next(m.facts for m in models if m.id == p.model_id)
    assert p.gpu_layers > 0 and sealed_ram(facts, p.settings) > make_budget(tight, frozenset({"cuda"})).ram
    mode = load_mode(tight, p, facts, memfd_problem=None, runtime_backends=frozenset({"cuda"}))
    assert mode.mode == BY_PATH and "a sealed copy needs" in mode.reason and "by path" in mode.reason


def test_without_memfd_the_load_is_by_path_with_the_reason(models):
    p = plan_for("macbook-m2-16gb", models)
    facts = next(m.facts for m in models if m.id == p.model_id)
    mode = load_mode(host("macbook-m2-16gb"), p, facts, memfd_problem="memfd is Linux-only (this is darwin)")
    assert mode.to_dict() == {"mode": "path", "reason": "memfd is Linux-only (this is darwin): the model "
                              "is loaded from the stick by path, checked by identity just before"}
