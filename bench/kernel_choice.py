"""2. Kernel choice: every CPU variant's speed here (the kit's own probe, in children, several
rounds), which crash, what the kit chooses, and what ggml's own scoring would pick."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import Ratio, Section, fmt, median, run_child, say, timed
from bench.context import Context
from kit import kernels

TARGET = 0.95
CONTENDER = 0.5  # after the first round, only variants within this share of the best are repeated


def ggml_scores(variants: list[kernels.Variant]) -> dict[str, int | str]:
    """Each variant's ggml_backend_score (0: ggml says it cannot run here), or "crash"."""
    scores: dict[str, int | str] = {}
    for v in variants:
        answer = run_child("score", "--variant", str(v.path), timeout=60)
        scores[v.name] = "crash" if "crashed" in answer else int(answer["score"])
    return scores


def ggml_pick(scores: dict[str, int | str]) -> str | None:
    """ggml_backend_load_best: the highest score above zero wins."""
    ranked = [(s, name) for name, s in scores.items() if isinstance(s, int) and s > 0]
    return max(ranked)[1] if ranked else None


def probe_speed(result: kernels.ProbeResult) -> float:
    """Tokens per second over the probe's whole batch (prompt + generation): the kit's ranking key."""
    tokens = kernels.PROBE_PROMPT_TOKENS + kernels.PROBE_GEN_TOKENS
    return tokens / result.seconds if result.ok and result.seconds else float("nan")


def state_text(result: kernels.ProbeResult, score: int | str) -> str:
    """Why a variant does not work, short (the full detail is in --json)."""
    if result.state == "crashed":
        return f"crashed ({result.detail})"
    if score == 0:
        return f"{result.state}: ggml refuses it here (score 0)"
    return result.state


def measure(ctx: Context, variants: list[kernels.Variant]) -> dict[str, list[kernels.ProbeResult]]:
    """Probe every variant once, then repeat the contenders, round-robin (interleaved)."""
    results: dict[str, list[kernels.ProbeResult]] = {v.name: [] for v in variants}
    active = list(variants)
    for round_no in range(ctx.sizes.kernel_rounds):
        say(f"kernel choice: round {round_no + 1}/{ctx.sizes.kernel_rounds}, {len(active)} variants")
        for v in active:
            results[v.name].append(kernels.probe_variant(v, ctx.model, ctx.blake3, ctx.threads))
        best = max((median([probe_speed(r) for r in rs]) for rs in results.values()), default=0.0)
        # A crash or a far slower kernel will not become the fastest by repeating it.
        active = [v for v in active if results[v.name][-1].ok
                  and median([probe_speed(r) for r in results[v.name]]) >= CONTENDER * best]
    return results


def kit_choice(ctx: Context) -> tuple[str, float]:
    """What choose_kernel picks with a fresh probe (refresh, empty state), and how long it took."""
    with tempfile.TemporaryDirectory(prefix="kit-bench-state-") as state:
        holder: dict = {}
        seconds = timed(lambda: holder.setdefault("choice", kernels.choose_kernel(
            ctx.host, ctx.model, ctx.blake3, state=Path(state), refresh=True)))
    return holder["choice"].chosen, seconds


def run(ctx: Context) -> Section:
    variants = kernels.list_variants(ctx.kit_lib)
    scores = ggml_scores(variants)
    results = measure(ctx, variants)
    chosen, choose_s = kit_choice(ctx)
    ggml = ggml_pick(scores)
    speeds = {name: median([probe_speed(r) for r in rs]) for name, rs in results.items()}
    working = {n: sp for n, sp in speeds.items() if sp == sp}
    fastest = max(working, key=working.get) if working else None

    section = Section("2. Kernel choice: every CPU variant here",
                      ["variant", "ggml score", "state", "prompt tok/s", "gen tok/s", "batch tok/s",
                       "vs fastest", "runs", "picked by"])
    for v in sorted(variants, key=lambda v: -(working.get(v.name) or 0)):
        rs = results[v.name]
        ok = [r for r in rs if r.ok]
        state = "ok" if ok else state_text(rs[0], scores[v.name])
        pickers = [who for who, name in (("kit", chosen), ("ggml", ggml), ("fastest", fastest)) if name == v.name]
        section.rows.append([
            v.name, str(scores[v.name]), state, fmt(median([r.prompt_tps for r in ok])),
            fmt(median([r.gen_tps for r in ok])), fmt(speeds[v.name]),
            fmt(speeds[v.name] / working[fastest], 3) if ok and fastest else "-", str(len(rs)),
            ", ".join(pickers)])
    kit_ratio = working.get(chosen, float("nan")) / working[fastest] if fastest else None
    section.ratios.append(Ratio("kernel: kit's choice / fastest working", kit_ratio, TARGET,
                                note=f"kit chose {chosen}, fastest {fastest}"))
    ggml_state = "crashes" if ggml and ggml not in working else "works"
    section.notes += [
        f"the kit's probe (kit _probe, a child per variant): {kernels.PROBE_PROMPT_TOKENS} prompt + "
        f"{kernels.PROBE_GEN_TOKENS} generated tokens, best of 3 per child; median over rounds; after "
        f"round 1 only variants within {CONTENDER:.0%} of the best are repeated",
        f"choose_kernel (refresh, empty state) chose {chosen} in {choose_s:.1f} s (the first start's wait)",
        f"ggml's own scoring (ggml_backend_score of each library, highest wins) picks {ggml or 'none'}, "
        f"which {ggml_state} here" + (f" ({speeds[ggml] / working[fastest]:.3f} of the fastest)"
                                      if ggml in working and fastest else ""),
    ]
    section.data = {"scores": scores, "kit_choice": chosen, "ggml_pick": ggml, "fastest": fastest,
                    "results": {n: [r.__dict__ for r in rs] for n, rs in results.items()}}
    return section
