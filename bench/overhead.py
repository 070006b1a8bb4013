"""1. Engine overhead: tok/s through the kit vs llama.cpp's own llama-bench, same model, threads,
kernel and libraries, interleaved (kit, llama-bench, kit, llama-bench, ...), medians."""

from __future__ import annotations

from bench import llamacpp
from bench.common import Section, compare, compare_paired, fmt, interleave, median, run_child, say, spread
from bench.context import Context

TARGET = 0.97


def run(ctx: Context) -> Section:
    s = ctx.sizes
    variant = ctx.variant
    folder = llamacpp.variant_dir(variant.path)
    say(f"engine overhead: {s.overhead_rounds} rounds, kernel {variant.name}, {ctx.threads} threads")

    def kit() -> dict:
        return run_child("engine", "--variant", str(variant.path), "--model", str(ctx.model),
                         "--threads", str(ctx.threads), "--prompt-tokens", str(s.prompt_tokens),
                         "--gen-tokens", str(s.gen_tokens), "--repeats", str(s.repeats),
                         "--chat-tokens", str(s.chat_tokens))

    def cpp() -> llamacpp.BenchResult:
        return llamacpp.llama_bench(folder, ctx.kit_lib, variant.path, ctx.model, threads=ctx.threads,
                                    prompt_tokens=s.prompt_tokens, gen_tokens=s.gen_tokens, repeats=s.repeats)

    kit_runs, cpp_runs = interleave(s.overhead_rounds, kit, cpp)
    measures = [
        (f"prompt, {s.prompt_tokens} tokens (engine.benchmark)", "engine prompt",
         [r["prompt_tps"] for r in kit_runs], [r.prompt_tps for r in cpp_runs]),
        (f"generation, {s.gen_tokens} tokens (engine.benchmark)", "engine generation",
         [r["gen_tps"] for r in kit_runs], [r.gen_tps for r in cpp_runs]),
        (f"generation, {s.gen_tokens} tokens, decode only (no sampling)", "engine decode only",
         [r["decode_tps"] for r in kit_runs], [r.gen_tps for r in cpp_runs]),
        (f"generation, chat stream ({s.chat_tokens} max)", "chat stream generation",
         [r["chat_gen_tps"] for r in kit_runs], [r.gen_tps for r in cpp_runs]),
    ]
    section = Section("1. Engine overhead: the kit vs llama-bench",
                      ["measure", "kit tok/s", "llama-bench tok/s", "kit / llama-bench", "kit range",
                       "llama-bench range"])
    for label, ratio_name, mine, theirs in measures:
        ratio = median(mine) / median(theirs)
        section.rows.append([label, fmt(median(mine)), fmt(median(theirs)), fmt(ratio, 3),
                             spread(mine), spread(theirs)])
        section.ratios += compare(ratio_name, mine, theirs, TARGET)
        # round i of each side ran back to back (interleave): a pair
        section.ratios.append(compare_paired(ratio_name, mine, theirs, TARGET))
    backend = cpp_runs[0].backend
    section.notes += [
        f"kernel {variant.name} on both sides; llama-bench loaded {backend} (checked on every run)",
        f"libllama for llama-bench: {llamacpp.linked_libllama(folder, ctx.kit_lib)} (the kit's own file)",
        f"{ctx.threads} threads, flash attention off, best of {s.repeats} repetitions per process, "
        f"median of {s.overhead_rounds} interleaved rounds; 'median of pairs': of the ratios of round i "
        "of each side, run back to back",
        "llama-bench generation runs at depth = prompt tokens (-d), as the kit generates after its prompt; "
        "it never samples: engine.benchmark samples greedily, the chat stream samples (temperature 0.3, "
        "repeat penalty 1.1) and detokenises; 'decode only' feeds tokens like llama-bench",
    ]
    section.data = {"kit": kit_runs, "llama_bench": [r.__dict__ for r in cpp_runs]}
    return section
