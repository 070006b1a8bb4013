"""How many people one laptop can serve: llama-server's slots and each slot's context, planned from
the chat's LaunchPlan and the same memory model (kit.estimate), every reason as data.

llama-server gives each slot its own share of one KV cache: `-c` is the total, split evenly over
`-np` slots (kv_unified off). So N slots of C tokens cost what one context of N x C costs, and the
plan prices exactly that (EngineSettings with n_ctx = N x C): the weights once, the cache N times.
A person's conversation lives in one slot; more people than slots wait in llama-server's queue.

Part of the pure core: no llama_cpp, no textual, no printing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kit.errors import PlanError
from kit.estimate import MemoryEstimate, estimate_memory
from kit.ggufmeta import ModelFacts
from kit.plan import CTX_STEP, OVERRIDE_MIN_CTX, PREFERRED_CTX, Budget, Decision, LaunchPlan
from kit.settings import EngineSettings
from kit.units import human_bytes

# More slots than this share the CPU so thinly that each answer crawls; with 2-4 cores, four
# streams already give most of continuous batching's gain (bench/serve.py measures it).
DEFAULT_MAX_SLOTS = 4
MAX_SLOTS = 64  # what --parallel may ask for
SLOT_CTX = PREFERRED_CTX  # room for a conversation per person, unless --ctx says otherwise


@dataclass(frozen=True)
class ServePlan:
    slots: int
    slot_ctx: int  # tokens each person's conversation may use
    settings: EngineSettings  # what llama-server is asked for: n_ctx = slots x slot_ctx
    estimate: MemoryEstimate  # priced at exactly those settings
    decisions: tuple[Decision, ...]

    @property
    def total_ctx(self) -> int:
        return self.settings.n_ctx

    def to_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "slot_ctx": self.slot_ctx, "total_ctx": self.total_ctx,
                "settings": self.settings.to_dict(), "estimate": self.estimate.to_dict(),
                "decisions": [asdict(d) for d in self.decisions]}


def plan_slots(plan: LaunchPlan, facts: ModelFacts, budget: Budget, *, slots: int | None = None,
               slot_ctx: int | None = None) -> ServePlan:
    """The most slots (up to DEFAULT_MAX_SLOTS) that fit at `slot_ctx` tokens each, or exactly
    `slots` at the largest context each that fits. The chat plan already chose the model, the
    threads and the GPU layers; this only divides the memory."""
    if slots is not None and not 1 <= slots <= MAX_SLOTS:
        raise PlanError(f"--parallel {slots} is out of range: 1 to {MAX_SLOTS} slots")
    # llama.cpp rounds each slot's share up to 256 cells: price what it will allocate
    wanted_ctx = -(-(slot_ctx or min(plan.n_ctx, SLOT_CTX)) // CTX_STEP) * CTX_STEP
    if wanted_ctx > facts.n_ctx_train:
        raise PlanError(f"a context of {wanted_ctx} tokens is more than {plan.model_id} was trained for "
                        f"({facts.n_ctx_train})")

    def priced(n: int, ctx: int) -> tuple[EngineSettings, MemoryEstimate]:
        settings = plan.settings.with_(n_ctx=n * ctx)
        return settings, estimate_memory(facts, settings)

    if slots is None:
        n = max((k for k in range(1, DEFAULT_MAX_SLOTS + 1) if budget.fits(priced(k, wanted_ctx)[1])), default=0)
        if n == 0:
            return _no_room(plan, facts, budget, 1, wanted_ctx)
        settings, est = priced(n, wanted_ctx)
        why = (f"{n} slots: as many as fit at {wanted_ctx} tokens each (at most {DEFAULT_MAX_SLOTS})"
               if n == DEFAULT_MAX_SLOTS else
               f"{n} slot{'s' if n > 1 else ''}: {n + 1} at {wanted_ctx} tokens each would need "
               f"{human_bytes(priced(n + 1, wanted_ctx)[1].ram)}, {human_bytes(budget.ram)} RAM usable")
        return _assemble(n, wanted_ctx, settings, est, why, budget,
                         "as asked" if slot_ctx else f"room for a conversation (cap {SLOT_CTX})")
    ctx = wanted_ctx
    while ctx >= OVERRIDE_MIN_CTX and not budget.fits(priced(slots, ctx)[1]):
        if slot_ctx:  # a fixed context: no smaller one will do
            return _no_room(plan, facts, budget, slots, ctx)
        ctx -= CTX_STEP if ctx > CTX_STEP else ctx  # multiples of 256: what llama.cpp pads to
    if ctx < OVERRIDE_MIN_CTX:
        return _no_room(plan, facts, budget, slots, OVERRIDE_MIN_CTX)
    settings, est = priced(slots, ctx)
    ctx_why = "as asked" if slot_ctx else ("room for a conversation" if ctx == wanted_ctx else
                                           f"the largest that fits {slots} slots")
    return _assemble(slots, ctx, settings, est, f"{slots} slots, as asked", budget, ctx_why)


def _assemble(slots: int, ctx: int, settings: EngineSettings, est: MemoryEstimate, slots_why: str,
              budget: Budget, ctx_why: str) -> ServePlan:
    decisions = (
        Decision("slots", slots, slots_why + "; more people wait in the queue"),
        Decision("slot_ctx", ctx, f"{ctx} tokens each: {ctx_why}"),
        Decision("memory", est.ram, f"{human_bytes(est.ram)} RAM for the model, {slots} x {ctx} tokens of KV "
                 f"cache ({human_bytes(est.kv_cache)}) and compute; {human_bytes(budget.ram)} usable"),
    )
    return ServePlan(slots, ctx, settings, est, decisions)


def _no_room(plan: LaunchPlan, facts: ModelFacts, budget: Budget, slots: int, ctx: int) -> ServePlan:
    need = estimate_memory(facts, plan.settings.with_(n_ctx=slots * ctx)).ram
    raise PlanError(f"{slots} slot{'s' if slots > 1 else ''} of {ctx} tokens with {plan.model_id} need "
                    f"{human_bytes(need)} RAM, {human_bytes(budget.ram)} usable",
                    "serve fewer people at once (--parallel), a shorter context (--ctx) or a smaller model")
