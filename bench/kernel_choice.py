"""2. Kernel choice: every CPU variant's speed here (the kit's own probe, in children, several
rounds), which crash, what the kit chooses, and what ggml's own scoring would pick."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.common import Ratio, Section, fmt, median, run_child, say, timed
from bench.context import Context
from kit import ggml, kernels

TARGET = 0.95
CONTENDER = 0.5  # after the first round, only variants within this share of the best are repeated


def ggml_scores(variants: list[ggml.Variant]) -> dict[str, int | str]:
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


def measure(ctx: Context, variants: list[ggml.Variant]) -> dict[str, list[kernels.ProbeResult]]:
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


def share_of_fastest(speeds: dict[str, float], name: str | None) -> float | None:
    """speeds[name] over the fastest working variant's; None when either is missing."""
    working = {n: sp for n, sp in speeds.items() if sp == sp}
    if not working or name not in working:
        return None
    return working[name] / max(working.values())


def table_rows(variants, results, scores, medians, bests, pickers) -> list[list[str]]:
    rows = []
    for v in sorted(variants, key=lambda v: -(medians[v.name] if medians[v.name] == medians[v.name] else 0)):
        rs = results[v.name]
        ok = [r for r in rs if r.ok]
        share = share_of_fastest(medians, v.name)
        rows.append([v.name, str(scores[v.name]), "ok" if ok else state_text(rs[0], scores[v.name]),
                     fmt(median([r.prompt_tps for r in ok])), fmt(median([r.gen_tps for r in ok])),
                     fmt(medians[v.name]), fmt(bests[v.name]), fmt(share, 3), str(len(rs)),
                     ", ".join(who for who, name in pickers.items() if name == v.name)])
    return rows


def run(ctx: Context) -> Section:
    variants = ggml.list_variants(ctx.kit_lib)
    scores = ggml_scores(variants)
    results = measure(ctx, variants)
    chosen, choose_s = kit_choice(ctx)
    ggml_choice = ggml_pick(scores)
    medians = {n: median([probe_speed(r) for r in rs]) for n, rs in results.items()}
    bests = {n: max((probe_speed(r) for r in rs if r.ok), default=float("nan")) for n, rs in results.items()}
    fastest = max((n for n in medians if medians[n] == medians[n]), key=medians.get, default=None)
    pickers = {"kit": chosen, "ggml": ggml_choice, "fastest": fastest}

    section = Section("2. Kernel choice: every CPU variant here",
                      ["variant", "ggml score", "state", "prompt tok/s", "gen tok/s", "batch tok/s",
                       "best batch tok/s", "vs fastest", "runs", "picked by"])
    section.rows = table_rows(variants, results, scores, medians, bests, pickers)
    note = f"kit chose {chosen}, fastest {fastest}"
    section.ratios += [Ratio("kernel: kit's choice / fastest working", share_of_fastest(medians, chosen), TARGET,
                             note=note),
                       Ratio("kernel: kit's choice / fastest working, best runs", share_of_fastest(bests, chosen),
                             TARGET)]
    ggml_share = share_of_fastest(medians, ggml_choice)
    ggml_state = "crashes or fails here" if ggml_share is None else f"works here ({ggml_share:.3f} of the fastest)"
    section.notes += [
        f"the kit's probe (kit _probe, a child per variant): {kernels.PROBE_PROMPT_TOKENS} prompt + "
        f"{kernels.PROBE_GEN_TOKENS} generated tokens, best of 3 per child; batch tok/s = all those tokens "
        f"over the probe's time (the kit's ranking key); median and best over rounds; after round 1 only "
        f"variants within {CONTENDER:.0%} of the best are repeated",
        f"choose_kernel (refresh, empty state) chose {chosen} in {choose_s:.1f} s (the first start's wait)",
        f"ggml's own scoring (ggml_backend_score of each library, highest wins) picks {ggml_choice or 'none'}, "
        f"which {ggml_state}",
    ]
    section.data = {"scores": scores, "kit_choice": chosen, "ggml_pick": ggml_choice, "fastest": fastest,
                    "results": {n: [asdict(r) for r in rs] for n, rs in results.items()}}
    return section
