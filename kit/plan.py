"""Pure planning: Host + candidate models + their facts -> LaunchPlan, with every reason as data.

Part of the pure core: no llama_cpp, no textual, no printing. The same inputs give the same plan.

Rules:
- Memory: each pool keeps max(15 %, 512 MiB) of what is available free (SAFETY_*); see `Budget`.
- Model: the largest (by parameters) that fits with room to talk (PREFERRED_CTX tokens, or its
  trained context when smaller); when none has that room, the largest that fits at MIN_CTX.
- Context: the largest multiple of 256 (llama.cpp pads the KV cache to 256 cells) up to
  min(cap, trained context) that fits; below MIN_CTX the model does not fit.
- GPU: one GPU whose backend the runtime was built with; every layer when weights and KV fit
  in its VRAM, else as many as fit; Apple-style unified memory is one pool, counted once.
- Threads: the physical cores (hyper-threads do not make decoding faster).
- Load mode (`load_mode`): a sealed memfd copy where memfd works and `estimate.sealed_ram` fits the
  same RAM budget (weights counted once; offloaded ones too, the memfd keeps them), else by path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kit.errors import PlanError
from kit.estimate import KV_PAD, MemoryEstimate, estimate_memory, sealed_ram
from kit.ggufmeta import ModelFacts
from kit.hardware import Gpu, Host
from kit.poolplan import POOL_BACKEND
from kit.settings import EngineSettings
from kit.units import GiB, MiB, human_bytes

# POOL_BACKEND: a kit pool (kit.poolplan.pool_gpu), planned as one more device: the workers' memory
GPU_BACKENDS = frozenset({"cuda", "rocm", "metal", "vulkan", POOL_BACKEND})
DEFAULT_CTX_CAP = 8192
MIN_CTX = 512  # the smallest context the planner chooses by itself
PREFERRED_CTX = 2048  # a model that fits only below this is used when nothing else fits
OVERRIDE_MIN_CTX = 128  # what a user may force
# Below this many generated tokens per second an answer comes slower than people read: a smaller
# model that keeps up is the better companion (only judged when the kernel probe measured speed).
MIN_TALK_TPS = 4.0
CTX_STEP = KV_PAD  # llama.cpp pads the context to this many cells: sizes between cost the same

# Keep max(15 % of what is available, 512 MiB) of each pool free:
# - 512 MiB: the OS, the terminal and the page cache that keeps the mmapped weights resident need
#   room; a small machine starts swapping or OOM-killing well before "0 free"; on a GPU it also
#   covers the CUDA/ROCm context, which drivers do not count until the runtime creates it;
# - 15 %: the estimate itself is calibrated, not exact (bench/memory_estimate.py), and other
#   programs (a browser) grow while the chat runs.
SAFETY_FRACTION = 0.15
SAFETY_MIN = 512 * MiB
UNKNOWN_RAM_ASSUMED = 2 * GiB  # when the host could not say how much memory it has


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOption:
    id: str
    name: str
    facts: ModelFacts


@dataclass(frozen=True)
class CpuSpeed:
    """What the kernel probe measured: generation speed of a model of `reference_bytes` here.

    Generation on a CPU reads every weight once per token, so speed scales with 1 / weight bytes.
    """

    reference_bytes: int
    gen_tps: float

    def expected_tps(self, facts: ModelFacts, gpu_layers: int) -> float | None:
        """Tokens/s expected for this model; None when the GPU carries every layer."""
        if gpu_layers >= _all_layers(facts):
            return None
        cpu_share = 1 - gpu_layers / _all_layers(facts)
        return self.gen_tps * self.reference_bytes / max(1, facts.file_size * cpu_share)


@dataclass(frozen=True)
class Overrides:
    model: str | None = None
    n_ctx: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None


@dataclass(frozen=True)
class Decision:
    topic: str  # "memory" | "gpu" | "model" | "n_ctx" | "gpu_layers" | "threads" | ...
    value: Any  # JSON-able
    reason: str  # one sentence a user can read


@dataclass(frozen=True)
class ModelVerdict:
    model_id: str
    name: str
    chosen: bool
    fits: bool
    max_ctx: int | None  # the largest context that fits, None when it does not fit
    needs: int  # bytes at the smallest context (MIN_CTX) without a GPU, for the reason
    reason: str


@dataclass(frozen=True)
class LaunchPlan:
    model_id: str
    settings: EngineSettings  # what the engine is handed; `estimate` priced exactly this
    gpu: Gpu | None
    cpu_variant: str | None
    estimate: MemoryEstimate
    decisions: tuple[Decision, ...] = ()
    verdicts: tuple[ModelVerdict, ...] = ()

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx

    @property
    def threads(self) -> int:
        return self.settings.threads

    @property
    def gpu_layers(self) -> int:
        """llama.cpp's n_gpu_layers; facts.n_layers + 1 = everything."""
        return self.settings.gpu_layers

    def decision(self, topic: str) -> Decision | None:
        return next((d for d in self.decisions if d.topic == topic), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "n_ctx": self.n_ctx,
            "threads": self.threads,
            "gpu_layers": self.gpu_layers,
            "settings": self.settings.to_dict(),
            "gpu": asdict(self.gpu) if self.gpu else None,
            "cpu_variant": self.cpu_variant,
            "estimate": self.estimate.to_dict(),
            "decisions": [asdict(d) for d in self.decisions],
            "verdicts": [asdict(v) for v in self.verdicts],
        }


@dataclass(frozen=True)
class Budget:
    """What the plan may use: RAM, and VRAM of one usable GPU (None: CPU only)."""

    ram_available: int
    ram: int  # usable = available - margin
    gpu: Gpu | None = None
    vram_available: int = 0
    vram: int = 0  # usable VRAM (for unified memory: also bounded by `ram`)
    notes: tuple[Decision, ...] = field(default=())

    @property
    def unified(self) -> bool:
        return self.gpu is not None and self.gpu.unified_memory

    def fits(self, est: MemoryEstimate) -> bool:
        if est.vram and self.gpu is None:
            return False
        if self.unified:  # one pool: count RAM and "VRAM" once, together
            return est.ram + est.vram <= self.ram and est.vram <= self.vram
        return est.ram <= self.ram and est.vram <= self.vram

    def cpu_only(self) -> Budget:
        return replace(self, gpu=None, vram_available=0, vram=0)


# --- helpers ------------------------------------------------------------------------------------


def _base_settings(threads: int) -> EngineSettings:
    """What every candidate starts from: the plan chooses n_ctx and gpu_layers per candidate
    (MIN_CTX here is only a placeholder) and keeps EngineSettings' defaults for the rest."""
    return EngineSettings(n_ctx=MIN_CTX, threads=threads)


def _margin(available: int) -> int:
    return max(SAFETY_MIN, int(available * SAFETY_FRACTION))


def _usable_gpu(host: Host, runtime_backends: frozenset[str]) -> tuple[Gpu | None, str]:
    """The GPU to use and why (or why none)."""
    if not host.gpus:
        return None, host.gpu_note or "no GPU found: CPU only"
    if not runtime_backends:
        names = ", ".join(g.name for g in host.gpus)
        return None, f"{names} found, but this runtime was built for the CPU only"
    usable = [g for g in host.gpus if g.backend in runtime_backends]
    if not usable:
        have = ", ".join(f"{g.name} ({g.backend})" for g in host.gpus)
        return None, (f"{have} found, but this runtime drives only "
                      f"{', '.join(sorted(runtime_backends))}: CPU only")
    sized = [g for g in usable if (g.vram_free or g.vram_total or g.unified_memory)]
    if not sized:
        return None, f"{usable[0].name}: its memory size could not be read: CPU only"
    best = max(sized, key=lambda g: _vram_of(g, host.ram_total))
    return best, f"using {best.name} through {best.backend}"


def _vram_of(gpu: Gpu, ram_total: int = 0) -> int:
    if gpu.vram_free is not None:
        return gpu.vram_free
    if gpu.vram_total:
        return gpu.vram_total
    # unified memory whose share the driver did not give: integrated GPUs may use about half
    return ram_total // 2


def make_budget(host: Host, runtime_backends: frozenset[str] = frozenset()) -> Budget:
    notes: list[Decision] = []
    if host.ram_available > 0:
        available = host.ram_available
        why = f"{human_bytes(available)} RAM available"
    elif host.ram_total > 0:
        available = host.ram_total // 2
        why = f"free RAM unknown: assuming half of {human_bytes(host.ram_total)}"
    else:
        available = UNKNOWN_RAM_ASSUMED
        why = f"RAM size unknown: assuming {human_bytes(available)}"
    margin = _margin(available)
    ram = max(0, available - margin)
    notes.append(Decision("memory", ram, f"{why}; keeping {human_bytes(margin)} free "
                                         f"(max of 15 % and 512 MiB): {human_bytes(ram)} usable"))
    gpu, gpu_why = _usable_gpu(host, frozenset(runtime_backends) & GPU_BACKENDS)
    if gpu is not None and gpu.backend == POOL_BACKEND:
        gpu_why = f"using {gpu.name} (kit pool)"
    vram_available = vram = 0
    if gpu is not None:
        vram_available = _vram_of(gpu, host.ram_total)
        # a pool's offers are what each worker's own plan left usable: no second margin
        vram = vram_available if gpu.backend == POOL_BACKEND else max(0, vram_available - _margin(vram_available))
        if gpu.unified_memory:
            vram = min(vram, ram)
            gpu_why += (f"; unified memory: up to {human_bytes(vram)} of the same RAM, "
                        "not counted twice")
        elif gpu.backend == POOL_BACKEND:
            gpu_why += f"; {human_bytes(vram)} offered by the workers (each kept its own margin)"
        else:
            gpu_why += f"; {human_bytes(vram)} of {human_bytes(vram_available)} VRAM usable"
    notes.append(Decision("gpu", gpu.name if gpu else None, gpu_why))
    return Budget(ram_available=available, ram=ram, gpu=gpu, vram_available=vram_available,
                  vram=vram, notes=tuple(notes))


def _all_layers(facts: ModelFacts) -> int:
    return facts.n_layers + 1  # the blocks and the output layer (llama-model.cpp)


def _best_layers(facts: ModelFacts, want: EngineSettings, budget: Budget,
                 forced: int | None = None) -> tuple[EngineSettings, MemoryEstimate] | None:
    """`want` with the most GPU layers that fit at its n_ctx (0 without a GPU), and its
    estimate; None when nothing fits."""
    if forced is not None:
        candidates = [forced]
    elif budget.gpu is None:
        candidates = [0]
    else:
        candidates = list(range(_all_layers(facts), -1, -1))
    for k in candidates:
        settings = want.with_(gpu_layers=k)
        est = estimate_memory(facts, settings)
        if budget.fits(est):
            return settings, est
    return None


def _ctx_candidates(facts: ModelFacts, cap: int) -> list[int]:
    top = min(cap, facts.n_ctx_train)
    low = min(MIN_CTX, top)
    steps = list(range(low, top, CTX_STEP))
    return [*steps, top]


def _largest_ctx(facts: ModelFacts, base: EngineSettings, budget: Budget, cap: int, *,
                 forced_ctx: int | None = None, forced_layers: int | None = None
                 ) -> tuple[EngineSettings, MemoryEstimate] | None:
    """`base` with the largest context that fits (and its GPU layers), and its estimate; None if
    none does."""
    if forced_ctx is not None:
        return _best_layers(facts, base.with_(n_ctx=forced_ctx), budget, forced_layers)
    cands = _ctx_candidates(facts, cap)
    lo, hi, best = 0, len(cands) - 1, None
    while lo <= hi:  # memory grows with the context: binary search
        mid = (lo + hi) // 2
        got = _best_layers(facts, base.with_(n_ctx=cands[mid]), budget, forced_layers)
        if got:
            best, lo = got, mid + 1
        else:
            hi = mid - 1
    return best


def _layers_text(k: int, facts: ModelFacts, gpu: Gpu | None) -> str:
    if not k or gpu is None:
        return "CPU only"
    if k >= _all_layers(facts):
        return f"all {_all_layers(facts)} layers on {gpu.name}"
    return f"{k} of {_all_layers(facts)} layers on {gpu.name}"


def _needs_text(facts: ModelFacts, base: EngineSettings, budget: Budget,
                n_ctx: int) -> tuple[int, str]:
    """Bytes at n_ctx without a GPU, and the sentence comparing them with what is usable."""
    need = estimate_memory(facts, base.with_(n_ctx=n_ctx, gpu_layers=0)).total
    have = f"{human_bytes(budget.ram)} RAM usable"
    if budget.gpu is not None and not budget.unified:
        have += f" + {human_bytes(budget.vram)} VRAM"
    return need, f"needs {human_bytes(need)} at {n_ctx} tokens, {have}"


def _no_fit_text(facts: ModelFacts, base: EngineSettings, budget: Budget, ov: Overrides) -> str:
    """Why a model does not fit, needs vs usable, at the context it was tried with."""
    ctx = ov.n_ctx or min(MIN_CTX, facts.n_ctx_train)
    if ov.gpu_layers:
        k = min(ov.gpu_layers, _all_layers(facts))
        est = estimate_memory(facts, base.with_(n_ctx=ctx, gpu_layers=k))
        if est.vram > budget.vram:
            return (f"{k} GPU layers need {human_bytes(est.vram)} of VRAM at {ctx} tokens, "
                    f"{human_bytes(budget.vram)} usable")
    return _needs_text(facts, base, budget, ctx)[1]


def _threads(host: Host, forced: int | None) -> Decision:
    if forced is not None:
        return Decision("threads", forced, f"{forced} threads, as asked")
    n = max(1, host.physical_cores or 1)
    return Decision("threads", n, f"{n} threads: one per physical core "
                                  "(hyper-threads do not make decoding faster)")


# --- validation ---------------------------------------------------------------------------------


def _validate(host: Host, models: Sequence[ModelOption], ov: Overrides, budget: Budget) -> None:
    if ov.model is not None and ov.model not in {m.id for m in models}:
        valid = ", ".join(m.id for m in models) or "none"
        raise PlanError(f"unknown model {ov.model!r}; this stick has: {valid}")
    if ov.threads is not None:
        most = max(host.logical_cores, host.physical_cores, 1)
        if not 1 <= ov.threads <= most:
            raise PlanError(f"threads must be between 1 and {most} (this host's logical cores), "
                            f"not {ov.threads}")
    if ov.gpu_layers is not None:
        if ov.gpu_layers < 0:
            raise PlanError(f"GPU layers cannot be negative ({ov.gpu_layers}); 0 means CPU only")
        if ov.gpu_layers > 0 and budget.gpu is None:
            why = budget.notes[-1].reason if budget.notes else "no usable GPU"
            raise PlanError(f"{ov.gpu_layers} GPU layers asked, but there is no usable GPU "
                            f"({why})")
    if ov.n_ctx is not None:
        if ov.n_ctx < OVERRIDE_MIN_CTX:
            raise PlanError(f"context {ov.n_ctx} is too small: at least {OVERRIDE_MIN_CTX} tokens")
        pool = [m for m in models if m.id == ov.model] if ov.model else list(models)
        longest = max((m.facts.n_ctx_train for m in pool), default=0)
        if ov.n_ctx > longest:
            what = pool[0].name if ov.model else "any model on this stick"
            raise PlanError(f"context {ov.n_ctx} is more than {what} was trained for "
                            f"({longest} tokens)")


# --- planning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fit:
    option: ModelOption
    settings: EngineSettings
    estimate: MemoryEstimate  # of exactly `settings`

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx

    @property
    def gpu_layers(self) -> int:
        return self.settings.gpu_layers


def _fit(option: ModelOption, base: EngineSettings, budget: Budget, ov: Overrides,
         cap: int) -> _Fit | None:
    facts = option.facts
    if ov.n_ctx is not None and ov.n_ctx > facts.n_ctx_train:
        return None
    layers = None
    if ov.gpu_layers is not None:
        layers = min(ov.gpu_layers, _all_layers(facts))
    got = _largest_ctx(facts, base, budget, cap, forced_ctx=ov.n_ctx, forced_layers=layers)
    return _Fit(option, *got) if got else None


def make_plan(
    host: Host,
    models: Sequence[ModelOption],
    *,
    runtime_backends: frozenset[str] = frozenset(),
    cpu_variant: str | None = None,
    overrides: Overrides | None = None,
    ctx_cap: int = DEFAULT_CTX_CAP,
    cpu_speed: CpuSpeed | None = None,
) -> LaunchPlan:
    """Choose model, context, threads and GPU layers for this host. Raises PlanError."""
    ov = overrides or Overrides()
    if not models:
        raise PlanError("this stick holds no models")
    budget = make_budget(host, runtime_backends)
    _validate(host, models, ov, budget)
    ordered = sorted(models, key=lambda m: (-m.facts.n_params, m.id))
    threads = _threads(host, ov.threads)
    base = _base_settings(threads.value)
    fits = {m.id: _fit(m, base, budget, ov, ctx_cap) for m in ordered}

    if ov.model is not None:
        option = next(m for m in ordered if m.id == ov.model)
        chosen = fits[option.id]
        if chosen is None:
            raise PlanError(f"{option.name} does not fit this host: "
                            f"{_no_fit_text(option.facts, base, budget, ov)}")
        model_why = f"{option.name}, as asked"
    else:
        chosen = _choose(ordered, _fast_enough(fits, cpu_speed), ov) or _choose(ordered, fits, ov)
        if chosen is None:
            smallest = ordered[-1]
            raise PlanError(f"no model on this stick fits: the smallest, {smallest.name}, "
                            f"{_no_fit_text(smallest.facts, base, budget, ov)}")
        model_why = f"{chosen.option.name} ({chosen.option.facts.params_label}): the largest " \
                    "that fits"
        if chosen.n_ctx < _room(chosen.option.facts) and ov.n_ctx is None:
            model_why += f", though only at {chosen.n_ctx} tokens"
        speed = _speed(chosen, cpu_speed)
        if speed is not None:
            model_why += f" at a talking pace (about {speed:.0f} tok/s expected)" if speed >= MIN_TALK_TPS \
                else f"; none keeps a talking pace here (about {speed:.1f} tok/s expected)"

    verdicts = tuple(_verdict(m, fits[m.id], chosen, base, budget, _speed(fits[m.id], cpu_speed))
                     for m in ordered)
    return _assemble(chosen, budget, ov, cpu_variant, ctx_cap, model_why, verdicts, threads=threads)


def _speed(fit: _Fit | None, cpu_speed: CpuSpeed | None) -> float | None:
    return cpu_speed.expected_tps(fit.option.facts, fit.gpu_layers) if fit and cpu_speed else None


def _fast_enough(fits: dict[str, _Fit | None], cpu_speed: CpuSpeed | None) -> dict[str, _Fit | None]:
    """The fits that would answer at a talking pace (all of them when speed was not measured)."""
    if cpu_speed is None:
        return fits
    return {k: f if f and (_speed(f, cpu_speed) or MIN_TALK_TPS) >= MIN_TALK_TPS else None
            for k, f in fits.items()}


def _room(facts: ModelFacts) -> int:
    return min(PREFERRED_CTX, facts.n_ctx_train)


def _choose(ordered: list[ModelOption], fits: dict[str, _Fit | None],
            ov: Overrides) -> _Fit | None:
    if ov.n_ctx is not None:  # the context is fixed: the largest model that fits it
        return next((fits[m.id] for m in ordered if fits[m.id]), None)
    roomy = [fits[m.id] for m in ordered if fits[m.id] and fits[m.id].n_ctx >= _room(m.facts)]
    if roomy:
        return roomy[0]
    return next((fits[m.id] for m in ordered if fits[m.id]), None)


def _verdict(option: ModelOption, fit: _Fit | None, chosen: _Fit, base: EngineSettings,
             budget: Budget, speed: float | None = None) -> ModelVerdict:
    facts = option.facts
    low = min(MIN_CTX, facts.n_ctx_train)
    need, need_text = _needs_text(facts, base, budget, low)
    if fit is None:
        reason = f"{option.name} skipped: {need_text}"
    elif speed is not None and speed < MIN_TALK_TPS and option.id != chosen.option.id \
            and facts.n_params > chosen.option.facts.n_params:
        reason = (f"{option.name} skipped: fits, but about {speed:.1f} tok/s expected on this CPU, "
                  f"slower than reading ({MIN_TALK_TPS:.0f} tok/s)")
    elif option.id == chosen.option.id:
        reason = (f"{option.name} chosen: {chosen.n_ctx} tokens, "
                  f"{_layers_text(chosen.gpu_layers, facts, budget.gpu)}, "
                  f"needs {human_bytes(chosen.estimate.total)}")
    elif facts.n_params > chosen.option.facts.n_params:
        reason = (f"{option.name} fits only at {fit.n_ctx} tokens (less than "
                  f"{_room(facts)}): {chosen.option.name} has room to talk")
    else:
        reason = f"{option.name} fits ({fit.n_ctx} tokens) but {chosen.option.name} is larger"
    return ModelVerdict(option.id, option.name, option.id == chosen.option.id, fit is not None,
                        fit.n_ctx if fit else None, need, reason)


def _assemble(fit: _Fit, budget: Budget, ov: Overrides, cpu_variant: str | None, cap: int,
              model_why: str, verdicts: tuple[ModelVerdict, ...], *, threads: Decision,
              gpu: Gpu | None = None, extra: tuple[Decision, ...] = ()) -> LaunchPlan:
    """The plan of `fit`, its every decision with its reason; `threads` is the decision that
    fit.settings.threads came from."""
    facts = fit.option.facts
    top = min(cap, facts.n_ctx_train)
    if ov.n_ctx is not None:
        ctx_why = f"{fit.n_ctx} tokens, as asked"
    elif fit.n_ctx >= top:
        limit = "the cap" if cap <= facts.n_ctx_train else "what the model was trained for"
        ctx_why = f"{fit.n_ctx} tokens: {limit} ({top})"
    else:
        ctx_why = f"{fit.n_ctx} tokens: the largest that fits (cap {top})"
    ctx_why += f"; KV cache {human_bytes(fit.estimate.kv_cache)}"
    if gpu is None and fit.gpu_layers > 0:
        gpu = budget.gpu
    if ov.gpu_layers is not None:
        layers_why = f"{fit.gpu_layers} GPU layers, as asked"
        if ov.gpu_layers > fit.gpu_layers:
            layers_why += f" ({ov.gpu_layers} asked; {fit.gpu_layers} is every layer)"
    elif budget.gpu is None:
        layers_why = "0 GPU layers: CPU only"
    elif fit.gpu_layers >= _all_layers(facts):
        layers_why = (f"{_layers_text(fit.gpu_layers, facts, budget.gpu)}: weights and KV fit "
                      f"({human_bytes(fit.estimate.vram)})")
    else:
        layers_why = (f"{_layers_text(fit.gpu_layers, facts, budget.gpu)}: as many as fit in "
                      f"{human_bytes(budget.vram)} usable")
    variant_why = (f"CPU kernel {cpu_variant} (chosen by probing)" if cpu_variant
                   else "CPU kernel not chosen yet")
    est = fit.estimate
    mem_why = (f"needs {human_bytes(est.total)}: weights {human_bytes(est.weights)}, "
               f"KV {human_bytes(est.kv_cache)}, compute {human_bytes(est.compute)}, "
               f"runtime {human_bytes(est.overhead)}")
    if est.vram:
        where = "on the pool" if gpu is not None and gpu.backend == POOL_BACKEND else "VRAM"
        mem_why += f" ({human_bytes(est.ram)} RAM + {human_bytes(est.vram)} {where})"
    decisions = (
        *budget.notes,
        Decision("model", fit.option.id, model_why),
        Decision("n_ctx", fit.n_ctx, ctx_why),
        Decision("gpu_layers", fit.gpu_layers, layers_why),
        threads,
        Decision("cpu_variant", cpu_variant, variant_why),
        Decision("estimate", est.total, mem_why),
        *extra,
    )
    return LaunchPlan(
        model_id=fit.option.id,
        settings=fit.settings,
        gpu=gpu,
        cpu_variant=cpu_variant,
        estimate=est,
        decisions=decisions,
        verdicts=verdicts,
    )


# --- fallback -----------------------------------------------------------------------------------


def fallback_steps(
    plan: LaunchPlan,
    host: Host,
    models: Sequence[ModelOption],
    *,
    runtime_backends: frozenset[str] = frozenset(),
    ctx_cap: int = DEFAULT_CTX_CAP,
) -> list[LaunchPlan]:
    """The plans to try, in order, when loading `plan` fails (kit.launch.load_with_fallback steps
    down only on a load failure).

    Fewer GPU layers (half, then 0; the GPU backend still loaded: `gpu` stays set), then CPU
    only (`gpu` None: no GPU backend at all), then smaller contexts (halving down to MIN_CTX),
    then each smaller model (CPU only, at the largest context it fits). Steps that would not
    fit by the estimate are left out. Each step says why in its "fallback" decision.
    """
    by_id = {m.id: m for m in models}
    if plan.model_id not in by_id:
        raise PlanError(f"unknown model {plan.model_id!r} in the plan")
    option = by_id[plan.model_id]
    facts = option.facts
    budget = make_budget(host, runtime_backends)
    cpu = budget.cpu_only()
    threads = plan.decision("threads") or Decision("threads", plan.threads, "as before")
    base = plan.settings  # every step keeps the plan's threads and engine options
    steps: list[LaunchPlan] = []

    def step(fit: _Fit, b: Budget, why: str, gpu: Gpu | None = None) -> None:
        model_why = (f"{fit.option.name}, as before" if fit.option.id == plan.model_id
                     else f"{fit.option.name}: the next smaller model")
        steps.append(_assemble(fit, b, Overrides(), plan.cpu_variant, ctx_cap, model_why,
                               plan.verdicts, threads=threads, gpu=gpu,
                               extra=(Decision("fallback", len(steps) + 1, why),)))

    # 1. fewer GPU layers: half, then 0 (the GPU backend still loaded)
    layers = plan.gpu_layers
    if layers > 0 and budget.gpu is not None:
        for k in dict.fromkeys([layers // 2, 0]):
            got = _largest_ctx(facts, base, budget, plan.n_ctx, forced_layers=k) if k < layers else None
            if got:
                step(_Fit(option, *got), budget, f"{layers} GPU layers failed: trying {k}",
                     gpu=budget.gpu)
                layers = k
    # 2. CPU only: no GPU backend at all
    if plan.gpu is not None or plan.gpu_layers > 0:
        got = _largest_ctx(facts, base, cpu, plan.n_ctx)
        if got:
            step(_Fit(option, *got), cpu, "the GPU failed: CPU only")
    # 3. smaller contexts, halving down to MIN_CTX
    low = min(MIN_CTX, facts.n_ctx_train)
    last_ctx = steps[-1].n_ctx if steps else plan.n_ctx
    while last_ctx > low:
        n_ctx = max(low, last_ctx // 2)
        got = _best_layers(facts, base.with_(n_ctx=n_ctx), cpu, 0)
        if got:
            step(_Fit(option, *got), cpu, f"{last_ctx} tokens failed: trying {n_ctx}")
        last_ctx = n_ctx
    # 4. each smaller model, CPU only
    smaller = sorted((m for m in models if m.facts.n_params < facts.n_params),
                     key=lambda m: (-m.facts.n_params, m.id))
    prev = option.name
    for m in smaller:
        fit = _fit(m, base, cpu, Overrides(), ctx_cap)
        if fit:
            step(fit, cpu, f"{prev} failed: trying the smaller {m.name}")
            prev = m.name
    return steps


# --- how the chosen model is loaded ------------------------------------------------------------

SEALED, BY_PATH = "sealed", "path"


@dataclass(frozen=True)
class LoadMode:
    """How the model reaches llama.cpp: a sealed in-memory copy made while hashing (kit.sealed), or
    the stick's file by path, checked by identity (device, inode, size, times) just before."""

    mode: str  # SEALED | BY_PATH
    reason: str  # one sentence a user can read

    @property
    def sealed(self) -> bool:
        return self.mode == SEALED

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def load_mode(host: Host, plan: LaunchPlan, facts: ModelFacts, *, memfd_problem: str | None,
              runtime_backends: frozenset[str] = frozenset()) -> LoadMode:
    """Sealed when memfd works here (`memfd_problem` is None) and its RAM fits the plan's budget."""
    path_note = "the model is loaded from the stick by path, checked by identity just before"
    if memfd_problem:
        return LoadMode(BY_PATH, f"{memfd_problem}: {path_note}")
    budget = make_budget(host, runtime_backends)
    need = sealed_ram(facts, plan.settings) + (plan.estimate.vram if budget.unified else 0)
    if need > budget.ram:
        return LoadMode(BY_PATH, f"a sealed copy needs {human_bytes(need)} of RAM, {human_bytes(budget.ram)} "
                                 f"usable: {path_note}")
    return LoadMode(SEALED, f"the model is copied into sealed memory as it is checked "
                            f"({human_bytes(facts.file_size)}, {human_bytes(need)} of {human_bytes(budget.ram)} "
                            "usable RAM): the bytes loaded are the bytes checked, and the stick may be "
                            "removed once the chat is open")
