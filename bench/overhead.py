"""1. Engine overhead: tok/s through the kit vs llama.cpp's own llama-bench, same model, threads,
kernel and libraries, interleaved (kit, llama-bench, kit, llama-bench, ...), medians."""

from __future__ import annotations

from bench import llamacpp
from bench.common import Ratio, Section, fmt, interleave, median, run_child, say
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
    kit_prompt = median([r["prompt_tps"] for r in kit_runs])
    kit_gen = median([r["gen_tps"] for r in kit_runs])
    kit_chat = median([r["chat_gen_tps"] for r in kit_runs])
    cpp_prompt = median([r.prompt_tps for r in cpp_runs])
    cpp_gen = median([r.gen_tps for r in cpp_runs])

    section = Section("1. Engine overhead: the kit vs llama-bench",
                      ["measure", "kit tok/s", "llama-bench tok/s", "kit / llama-bench"])
    rows = [(f"prompt, {s.prompt_tokens} tokens (engine.benchmark)", kit_prompt, cpp_prompt, "engine prompt"),
            (f"generation, {s.gen_tokens} tokens (engine.benchmark)", kit_gen, cpp_gen, "engine generation"),
            (f"generation, chat stream ({s.chat_tokens} max)", kit_chat, cpp_gen, "chat stream generation")]
    for label, mine, theirs, ratio_name in rows:
        section.rows.append([label, fmt(mine), fmt(theirs), fmt(mine / theirs, 3)])
        section.ratios.append(Ratio(ratio_name, mine / theirs, TARGET))
    backend = cpp_runs[0].backend
    section.notes += [
        f"kernel {variant.name} on both sides; llama-bench loaded {backend} (checked on every run)",
        f"libllama for llama-bench: {llamacpp.linked_libllama(folder, ctx.kit_lib)} (the kit's own file)",
        f"{ctx.threads} threads, flash attention off, best of {s.repeats} repetitions per process, "
        f"median of {s.overhead_rounds} interleaved rounds",
        "llama-bench generation runs at depth = prompt tokens (-d), as the kit generates after its prompt; "
        "the chat stream includes the chat template, sampling (temperature 0.3, repeat penalty 1.1) "
        "and detokenising",
    ]
    section.data = {"kit": kit_runs, "llama_bench": [r.__dict__ for r in cpp_runs]}
    return section
