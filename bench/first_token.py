"""4. Launch to first token: the stick's launcher (`START-linux.sh ask ...`, frozen runtime, the
kernel verdict already cached in state/) until the first answer byte on stdout, vs llama.cpp's
own CLI (llama-completion) on the same model file, prompt, context, threads and kernel; and the
same launcher on a host the stick has never seen (no kernel verdict in state/: it probes first).

Both are timed from the spawn to the first byte on stdout, with the page cache warm (one untimed
start each first): the kit's clock includes the shell launcher, the frozen Python start, the
manifest and signature checks, hashing the model and loading; llama.cpp's includes loading only.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench import llamacpp
from bench.common import Ratio, Section, compare, fmt, interleave, median, say, spread
from bench.context import Context

TARGET = 1.5
NEW_HOST_TARGET_S = 8.0  # issue 12: a new laptop's first answer, in seconds (the cached start beside it)
QUESTION = "How do I purify water?"
MAX_TOKENS = 8


def mapped_kernels(pid: int) -> list[str]:
    """The CPU kernel libraries a running process has mapped: proof of which one answered."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ["(exited before it could be checked)"]
    return sorted({Path(line.split()[-1]).name for line in maps.splitlines() if "libggml-cpu" in line})


def time_to_first_byte(cmd: list[str], *, cwd: Path | None = None,
                       env: dict | None = None) -> tuple[float, list[str]]:
    """Seconds from spawn to the first byte on stdout, and the kernels mapped at that moment;
    the process then runs to its end (no overlap with the next run)."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=env, bufsize=0)
        first = proc.stdout.read(1)
        elapsed = time.perf_counter() - start
        kernels = mapped_kernels(proc.pid)
        proc.stdout.read()
        code = proc.wait(timeout=300)
        if not first or code != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{Path(cmd[0]).name} gave no answer (exit {code}): {' / '.join(tail)}")
    return elapsed, kernels


def rendered_prompt(chat_format: str) -> str:
    """The text the kit feeds llama.cpp for QUESTION (llama-cpp-python's formatter of that name)."""
    from llama_cpp import llama_chat_format

    formatter = getattr(llama_chat_format, f"format_{chat_format}")
    return formatter(messages=[{"role": "user", "content": QUESTION}]).prompt


def kit_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("KIT_DEBUG", "KIT_BUNDLE")}


def run(ctx: Context) -> Section:
    from kit import signing
    from kit.paths import find_bundle

    doctor = ctx.stick_doctor  # runs the stick once: its kernel verdict is cached from here on
    plan = doctor["plan"]
    bundle = find_bundle(ctx.stick)
    manifest = signing.check_stick(bundle).manifest
    model = manifest.model(plan["model_id"])
    model_file = bundle.resolve(model.files[0])
    variant_lib = ctx.kit_lib / f"libggml-cpu-{plan['cpu_variant']}.so"
    folder = llamacpp.variant_dir(variant_lib)

    kit_cmd = [str(ctx.stick / "START-linux.sh"), "ask", QUESTION, "--max-tokens", str(MAX_TOKENS), "-q"]
    cpp_cmd = llamacpp.completion_command(folder, model_file, rendered_prompt(model.chat_format or "gemma"),
                                          threads=plan["threads"], max_tokens=MAX_TOKENS, ctx=plan["n_ctx"])
    cpp_env = llamacpp.tool_env(ctx.kit_lib)

    mapped: dict[str, set[str]] = {"kit": set(), "llama.cpp": set()}

    def timed_start(who: str, cmd: list[str], **how) -> float:
        seconds, kernels = time_to_first_byte(cmd, **how)
        mapped[who].update(kernels)
        return seconds

    def kit() -> float:
        return timed_start("kit", kit_cmd, env=kit_env())

    def cpp() -> float:
        return timed_start("llama.cpp", cpp_cmd, cwd=folder, env=cpp_env)

    verdict = ctx.stick / "KIT" / "state" / "kernel-probe.json"

    def new_host() -> float:
        verdict.unlink(missing_ok=True)  # a host it has never seen; the run writes a new verdict
        return timed_start("kit", kit_cmd, env=kit_env())

    say(f"launch to first token: warm-up, then {ctx.sizes.first_token_rounds} rounds")
    kit(), cpp()  # untimed: page cache warm for both, the stick's state written
    kit_times, cpp_times, new_times = interleave(ctx.sizes.first_token_rounds, kit, cpp, new_host)
    kit_s, cpp_s, new_s = median(kit_times), median(cpp_times), median(new_times)
    load = [round(x, 1) for x in os.getloadavg()]

    section = Section("4. Launch to first token", ["start", "first token, s (median)", "range, s"])
    section.rows += [["START-linux.sh ask (frozen runtime)", fmt(kit_s, 2), spread(kit_times, 2)],
                     ["llama-completion (llama.cpp CLI)", fmt(cpp_s, 2), spread(cpp_times, 2)],
                     ["START-linux.sh ask, new host (no kernel verdict: probes first)", fmt(new_s, 2),
                      spread(new_times, 2)]]
    section.ratios += compare("launch to first token, kit / llama.cpp CLI", kit_times, cpp_times, TARGET, times=True)
    section.ratios += [Ratio("launch to first token on a new host, seconds", new_s, NEW_HOST_TARGET_S, at_most=True,
                             note=f"cached verdict {kit_s:.2f} s beside it; load average {load}"),
                       Ratio("launch to first token on a new host, seconds, best runs", min(new_times),
                             NEW_HOST_TARGET_S, at_most=True)]
    section.notes += [
        f"model {model.id}, context {plan['n_ctx']}, {plan['threads']} threads, kernel {plan['cpu_variant']} "
        f"(the stick's cached verdict) for both; the same prompt text ({model.chat_format} format)",
        "kernel libraries mapped when the first token came: " +
        "; ".join(f"{who} {', '.join(sorted(names)) or 'none'}" for who, names in mapped.items()),
        "llama-completion runs with --no-warmup (its fastest start); the kit verifies the model's BLAKE3 "
        "and its runtime libraries at every start",
        f"new host: state/kernel-probe.json removed before each of those runs, interleaved with the others; "
        f"median {new_s:.2f} s, {new_s / kit_s:.1f}x the cached start; load average {load} when the rounds ended",
    ]
    section.data = {"kit_s": kit_times, "llama_cpp_s": cpp_times, "new_host_s": new_times, "plan": plan,
                    "load_average": load}
    return section
