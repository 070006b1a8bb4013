"""2. Kernel choice: every CPU variant's speed here (the kit's own probe children, interleaved
rounds), which crash, what the kit chooses on a new host (quiet, and with a CPU hog beside it),
and what ggml's own scoring would pick."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from bench.common import Ratio, Section, fmt, median, say, spread, timed
from bench.context import QUICK, Context
from kit import ggml, kernels

TARGET = 0.95
CONTENDER = 0.5  # after the first round, only variants within this share of the best are repeated
CHOICE_RUNS = 5  # fresh choices, quiet and with the hog each (1 each with --quick)
HOG_MAX_S = 300  # the hog ends itself after this even if the bench is killed


def ggml_scores(children: dict[str, kernels.ProbeChild]) -> dict[str, int | str]:
    """Each variant's ggml_backend_score, asked in its own probe child (0: ggml says it cannot
    run here), or "crash" when loading the library killed the child."""
    scores: dict[str, int | str] = {}  # each child was asked for it as it started
    for name, child in children.items():
        answer = child.receive(kernels.SCORE_TIMEOUT_S)
        scores[name] = int(answer["score"]) if answer else child.verdict.state.replace("crashed", "crash")
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


def measure_group(ctx: Context, group: list[ggml.Variant], rounds: int,
                  scores: dict) -> dict[str, list[kernels.ProbeResult]]:
    """One child per variant, each loaded once; rounds interleaved (A B C, A B C). A variant
    that crashes or fails is recorded once; after round 1 only the contenders are repeated."""
    children = {v.name: kernels.ProbeChild(v, ctx.model, ctx.blake3, ctx.threads) for v in group}
    results: dict[str, list[kernels.ProbeResult]] = {name: [] for name in children}
    try:
        scores.update(ggml_scores(children))
        for child in children.values():
            child.send("load")
        for child in children.values():
            child.receive()
        active = [n for n, c in children.items() if c.verdict is None]
        for round_no in range(rounds):
            say(f"kernel choice: round {round_no + 1}/{rounds}, {len(active)} variants")
            for name in active:
                answer = children[name].ask("round")
                results[name].append(kernels.summary(name, [answer]) if answer else children[name].verdict)
            speeds = [median([probe_speed(r) for r in rs]) for rs in results.values()]
            best = max((sp for sp in speeds if sp == sp), default=0.0)  # NaN: a variant that failed
            # A crash or a far slower kernel will not become the fastest by repeating it.
            active = [n for n in active if results[n][-1].ok
                      and median([probe_speed(r) for r in results[n]]) >= CONTENDER * best]
    finally:
        for child in children.values():
            child.close()
    for name, child in children.items():
        if not results[name]:
            results[name].append(child.verdict or kernels.ProbeResult(name, "failed", "no answer"))
    return results


def measure(ctx: Context, variants: list[ggml.Variant]) -> tuple[dict, dict]:
    """Every variant's speed and ggml score; the AVX2 kernels side by side, then the others
    (holding all of them loaded at once would take gigabytes)."""
    fast = [v for v in variants if "avx2" in v.required_flags]
    results: dict[str, list[kernels.ProbeResult]] = {}
    scores: dict[str, int | str] = {}
    for group in (fast, [v for v in variants if v not in fast]):
        if group:
            results.update(measure_group(ctx, group, ctx.sizes.kernel_rounds, scores))
    return results, scores


@contextlib.contextmanager
def cpu_hog(max_seconds: float = HOG_MAX_S):
    """A busy loop on one core (the first this process may use) while the block runs; it is
    stopped after it, and it stops itself after max_seconds whatever happens to the bench."""
    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    code = ("import os, time\n"
            f"hasattr(os, 'sched_setaffinity') and os.sched_setaffinity(0, {{{cpu}}})\n"
            f"end = time.monotonic() + {max_seconds}\n"
            "while time.monotonic() < end:\n    pass\n")
    hog = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait()


def kit_choice(ctx: Context) -> tuple[str, float]:
    """What choose_kernel picks with a fresh probe (refresh, empty state), and how long it took."""
    with tempfile.TemporaryDirectory(prefix="kit-bench-state-") as state:
        holder: dict = {}
        seconds = timed(lambda: holder.setdefault("choice", kernels.choose_kernel(
            ctx.host, ctx.model, ctx.blake3, state=Path(state), refresh=True)))
    return holder["choice"].chosen, seconds


def kit_choices(ctx: Context, runs: int) -> dict[str, list[tuple[str, float]]]:
    """Fresh choices, quiet and with the hog in turn (side by side: the same moments of the machine)."""
    out: dict[str, list[tuple[str, float]]] = {"quiet": [], "hog": []}
    for run_no in range(runs):
        say(f"kernel choice: the kit's choice {run_no + 1}/{runs}, quiet, then with a CPU hog")
        out["quiet"].append(kit_choice(ctx))
        with cpu_hog():
            out["hog"].append(kit_choice(ctx))
    return out


def share_of_fastest(speeds: dict[str, float], name: str | None) -> float | None:
    """speeds[name] over the fastest working variant's; None when either is missing."""
    working = {n: sp for n, sp in speeds.items() if sp == sp}
    if not working or name not in working:
        return None
    return working[name] / max(working.values())


def worst_share(speeds: dict[str, float], chosen: list[str]) -> float | None:
    """The least share of the fastest among the runs' choices: "every run" means the worst one."""
    shares = [share_of_fastest(speeds, name) for name in chosen]
    return None if not shares or None in shares else min(shares)


def picked_by(name: str, pickers: dict[str, str | None], choices: dict[str, list[tuple[str, float]]]) -> str:
    who = [w for w, picked in pickers.items() if picked == name]
    for label, runs in (("kit", choices["quiet"]), ("kit+hog", choices["hog"])):
        count = sum(1 for chosen, _ in runs if chosen == name)
        if count:
            who.append(f"{label} {count}/{len(runs)}")
    return ", ".join(who)


def table_rows(variants, results, scores, medians, bests, pickers, choices) -> list[list[str]]:
    rows = []
    for v in sorted(variants, key=lambda v: -(medians[v.name] if medians[v.name] == medians[v.name] else 0)):
        rs = results[v.name]
        ok = [r for r in rs if r.ok]
        share = share_of_fastest(medians, v.name)
        rows.append([v.name, str(scores.get(v.name, "-")), "ok" if ok else state_text(rs[0], scores.get(v.name)),
                     fmt(median([r.prompt_tps for r in ok])), fmt(median([r.gen_tps for r in ok])),
                     fmt(medians[v.name]), fmt(bests[v.name]), fmt(share, 3), str(len(ok)),
                     picked_by(v.name, pickers, choices)])
    return rows


def run(ctx: Context) -> Section:
    variants = ggml.list_variants(ctx.kit_lib)
    results, scores = measure(ctx, variants)
    runs = 1 if ctx.sizes == QUICK else CHOICE_RUNS
    choices = kit_choices(ctx, runs)
    ggml_choice = ggml_pick(scores)
    medians = {n: median([probe_speed(r) for r in rs]) for n, rs in results.items()}
    bests = {n: max((probe_speed(r) for r in rs if r.ok), default=float("nan")) for n, rs in results.items()}
    fastest = max((n for n in medians if medians[n] == medians[n]), key=medians.get, default=None)
    pickers = {"ggml": ggml_choice, "fastest": fastest}

    section = Section("2. Kernel choice: every CPU variant here",
                      ["variant", "ggml score", "state", "prompt tok/s", "gen tok/s", "batch tok/s",
                       "best batch tok/s", "vs fastest", "rounds", "picked by"])
    section.rows = table_rows(variants, results, scores, medians, bests, pickers, choices)
    quiet = [name for name, _ in choices["quiet"]]
    hog = [name for name, _ in choices["hog"]]
    section.ratios += [
        Ratio("kernel: kit's choice / fastest working", worst_share(medians, quiet), TARGET,
              note=f"worst of {len(quiet)} fresh choices: {dict(Counter(quiet))}, fastest {fastest}"),
        Ratio("kernel: kit's choice / fastest working, best runs", worst_share(bests, quiet), TARGET),
        Ratio("kernel with a CPU hog: kit's choice / fastest working", worst_share(medians, hog), TARGET,
              note=f"worst of {len(hog)} fresh choices: {dict(Counter(hog))}"),
        Ratio("kernel with a CPU hog: kit's choice / fastest working, best runs", worst_share(bests, hog), TARGET),
    ]
    ggml_share = share_of_fastest(medians, ggml_choice)
    ggml_state = "crashes or fails here" if ggml_share is None else f"works here ({ggml_share:.3f} of the fastest)"
    quiet_s, hog_s = [s for _, s in choices["quiet"]], [s for _, s in choices["hog"]]
    section.notes += [
        f"every variant in its own kit probe child (kit _probe), loaded once; {kernels.PROBE_PROMPT_TOKENS} prompt + "
        f"{kernels.PROBE_GEN_TOKENS} generated tokens a round, rounds interleaved across the variants; "
        f"batch tok/s = all those tokens over the round's time (the kit's ranking key); median and best over "
        f"rounds; after round 1 only variants within {CONTENDER:.0%} of the best are repeated; the AVX2 "
        f"kernels side by side, then the others",
        f"choose_kernel (refresh, empty state), {runs} times quiet and {runs} times with a busy loop on one "
        f"core beside it, in turn: {fmt(median(quiet_s))} s quiet ({spread(quiet_s)} s), {fmt(median(hog_s))} s "
        f"with the hog ({spread(hog_s)} s); the worst choice of each is the ratio",
        f"ggml's own scoring (ggml_backend_score of each library, highest wins) picks {ggml_choice or 'none'}, "
        f"which {ggml_state}",
    ]
    section.data = {"scores": scores, "kit_choices": choices, "ggml_pick": ggml_choice, "fastest": fastest,
                    "results": {n: [asdict(r) for r in rs] for n, rs in results.items()}}
    return section
