"""11. GPUs through Vulkan: prompt and generation speed per backend and device, and the kit's choice.

Every Vulkan device the loader lists (software ones too: KIT_GPU_PROBE=all) is measured by the
kit's own probe child (`kit _gpu-probe --device N`), which times the CPU kernel and then the
device with every layer of the bench model, one after the other in the same process: each round
is a side-by-side pair. The rounds repeat, alternating devices. Then the kit decides
(kit.gpuprobe.choose_gpu, probed afresh) and its choice — a device, or the CPU — is compared with
the fastest working option by median generation speed (target >= 0.95).
"""

from __future__ import annotations

from bench.common import Ratio, Section, ensure_cache, fmt, median, say, spread
from bench.context import Context
from kit import ggml, gpuprobe

CHOICE_TARGET = 0.95


def run(ctx: Context) -> Section:
    backend = ggml.gpu_backend_libs(ctx.kit_lib).get(gpuprobe.BACKEND)
    section = Section("11. GPUs through Vulkan: each device vs the CPU kernel, and the kit's choice",
                      ["backend / device", "kind", "prompt tok/s", "gen tok/s (median)", "gen spread", "state",
                       "kit's choice"])
    if backend is None:
        raise RuntimeError("this llama.cpp build has no Vulkan backend (build/llama-cpp.env)")
    loader = ggml.carried_vulkan_loader(ctx.kit_lib)
    devices, problem = gpuprobe.list_devices(loader)
    from kit import kernels

    kernel = kernels.choose_kernel(ctx.host, ctx.model, ctx.blake3, state=ensure_cache() / "state")
    rounds = max(1, ctx.sizes.repeats - 1)  # 2 full, 1 quick: each round is a pair of loads
    samples: dict[int, list[gpuprobe.DeviceResult]] = {int(d["index"]): [] for d in devices}
    for _ in range(rounds):
        for device in devices:
            say(f"gpu: {device['name']} vs the CPU kernel ({kernel.chosen})")
            samples[int(device["index"])].append(gpuprobe.probe_device(device, kernel, backend, loader, ctx.model,
                                                                     ctx.blake3, ctx.threads))
    choice = gpuprobe.choose_gpu(ctx.host, kernel, ctx.model, ctx.blake3, state=None, backend=backend,
                                 carried_loader=loader, refresh=True, probe_software=True)
    cpu_gen = [r.cpu_gen_tps for rs in samples.values() for r in rs if r.cpu_gen_tps]
    cpu_prompt = [r.cpu_prompt_tps for rs in samples.values() for r in rs if r.cpu_prompt_tps]
    rows = [[f"CPU kernel {kernel.chosen}", "cpu", fmt(median(cpu_prompt), 0), fmt(median(cpu_gen)),
             spread(cpu_gen), "ok", "*" if choice.chosen is None else ""]]
    speeds = {"cpu": median(cpu_gen)} if cpu_gen else {}
    for index, results in samples.items():
        ok = [r for r in results if r.ok]
        gen = [r.gen_tps for r in ok]
        name = results[0].name if results else str(index)
        states = ", ".join(sorted({r.state for r in results}))
        kind = f"vulkan {results[0].kind}" if results else "vulkan"
        rows.append([name, kind, fmt(median([r.prompt_tps for r in ok]), 0), fmt(median(gen)), spread(gen), states,
                     "*" if choice.chosen == index else ""])
        if gen:
            speeds[f"vulkan:{index}"] = median(gen)
    section.rows += rows
    section.data = {"results": {i: [r.__dict__ for r in rs] for i, rs in samples.items()}, "choice": choice.to_dict()}
    chosen_key = "cpu" if choice.chosen is None else f"vulkan:{choice.chosen}"
    fastest = max(speeds.values()) if speeds else float("nan")
    value = speeds.get(chosen_key, float("nan")) / fastest if speeds else None
    section.ratios.append(Ratio("gpu: kit's choice / fastest working backend", value, CHOICE_TARGET,
                                note=f"chose {chosen_key}; {choice.reason}"))
    section.notes.append(f"{len(devices)} Vulkan device(s){': ' + problem if problem else ''}; {rounds} round(s) "
                         f"of {gpuprobe.PROMPT_TOKENS} prompt + {gpuprobe.GEN_TOKENS} generated tokens, every layer "
                         f"on the device; {ctx.threads} threads")
    return section
