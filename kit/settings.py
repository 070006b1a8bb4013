"""EngineSettings: how llama.cpp is asked to run a model, in one value.

The plan decides it (kit.plan.LaunchPlan.settings), the memory estimate prices exactly it
(kit.estimate), and the engine and the benchmark hand exactly it to llama.cpp (kit.engine). A
setting added here reaches all four; nothing else chooses llama.cpp's context parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# llama-cpp-python 0.3.36's Llama() defaults, which the kit keeps: n_batch = n_ubatch = 512,
# f16 KV cache (2 bytes an element), no flash attention, swa_full=True (llama.cpp's default).
DEFAULT_N_BATCH = 512


@dataclass(frozen=True)
class EngineSettings:
    n_ctx: int
    threads: int = 1
    gpu_layers: int = 0  # llama.cpp's n_gpu_layers; facts.n_layers + 1 = everything
    n_batch: int = DEFAULT_N_BATCH
    kv_bytes_per_element: float = 2  # f16 K and V
    flash_attn: bool = False
    swa_full: bool = True

    @property
    def n_ubatch(self) -> int:
        """llama.cpp clamps the micro-batch to the batch, and both to the context."""
        return min(self.n_ctx, self.n_batch)

    def with_(self, **changes) -> EngineSettings:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
