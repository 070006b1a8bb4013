"""What a model needs in memory when llama.cpp runs it with given EngineSettings.

Part of the pure core: no llama_cpp, no textual, no printing. The facts come from the GGUF header
(kit.ggufmeta); the settings are the very value the engine hands to llama.cpp (kit.settings), so
what is priced here is what runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kit.ggufmeta import ModelFacts
from kit.settings import EngineSettings
from kit.units import MiB

# llama.cpp pads the context (llama-context.cpp: cparams.n_ctx = GGML_PAD(n_ctx, 256)) and the
# SWA cache (llama-kv-cache-iswa.cpp) to 256 cells.
KV_PAD = 256

# Compute buffers, calibrated with bench/memory_estimate.py (context filled, then 32 tokens) on
# the real Gemma 3 270M (4 heads, 262k vocabulary, SWA) and a random-weight llama written by the
# bench (32 heads, 32k vocabulary), 512..8192 cells, n_ubatch 512 and 128, with and without
# flash attention.
# - llama.cpp *reserves* the worst-case graph of one ubatch (llama-context.cpp graph_reserve):
#   max(logits n_vocab x n_ubatch f32, KQ scores n_head x n_ubatch x n_ctx f32) plus a little;
#   its log said 514 MiB for Gemma at every context (the logits) and 550 MiB for the llama at
#   8192 (the scores). A GPU backend allocates that for real: VRAM gets the reserved size.
# - On the CPU most of a reserve is never touched (the chat asks logits of one token); what
#   becomes *resident* grows by 1.43 x the KQ scores per cell on both models (the scores, the
#   softmax in place, and the f16 copy the KQ x V product converts them to in the CPU backend's
#   work buffer), plus the KQ mask (n_ubatch x n_ctx f32; two for models with SWA layers),
#   plus ~240 bytes per vocabulary entry (sampler and logits copies) and a few MiB.
# - Flash attention (flash_attn=True) never materialises the scores: only the masks grow.
# Estimate vs measured peak, without the UI allowance below: +0 % .. +7 % on all 17 points.
COMPUTE_KQ_FACTOR = 1.5
COMPUTE_ACT_FACTOR = 3  # activations: x n_embd x n_ubatch f32
COMPUTE_VOCAB_BYTES = 240
COMPUTE_FIXED = 8 * MiB
# Python + llama_cpp + ggml + the CPU variant: 48 MiB RSS measured after imports; Textual and its
# widgets +16 MiB measured at import; +32 MiB allowance for the running UI and chat history.
RUNTIME_OVERHEAD = 96 * MiB
# llama.cpp keeps the vocabulary in RAM once loaded (token text, scores, maps, piece cache):
# measured 180 bytes per token for Gemma 3 (262,144 tokens), 230 for the 32k llama.
VOCAB_BYTES_PER_TOKEN = 240


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs to run at n_ctx; `ram` + `vram` == `total`."""

    n_ctx: int
    gpu_layers: int  # as llama.cpp applies it: clamped to n_layers + 1
    weights: int
    kv_cache: int
    compute: int
    overhead: int
    total: int
    ram: int
    vram: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _cells(n: int) -> int:
    return (n + KV_PAD - 1) // KV_PAD * KV_PAD


def kv_cache_bytes(facts: ModelFacts, settings: EngineSettings, *, layers: range | None = None) -> int:
    """KV cache bytes for `layers` (default all) at settings.n_ctx.

    Full-attention layers hold PAD(n_ctx, 256) cells. Sliding-window layers, as
    llama-kv-cache-iswa.cpp sizes them: PAD(min(n_ctx, n_swa + n_ubatch), 256) cells — but only
    with swa_full=False. llama.cpp's llama_context_default_params() sets swa_full=true
    (llama-context.cpp) and llama-cpp-python 0.3.36 keeps that unless Llama(swa_full=False) is
    passed; then SWA layers are as big as the others. EngineSettings' default follows that default.
    """
    cells = _cells(settings.n_ctx)
    swa_cells = _cells(min(cells, facts.sliding_window + settings.n_ubatch))
    total = 0.0
    for il in layers if layers is not None else range(facts.n_layers):
        per_cell = facts.n_head_kv[il] * (facts.key_length + facts.value_length)
        use_swa = not settings.swa_full and facts.sliding_window > 0 and facts.swa_layers[il]
        total += (swa_cells if use_swa else cells) * per_cell * settings.kv_bytes_per_element
    return int(total)


def compute_bytes(facts: ModelFacts, settings: EngineSettings, *, reserved: bool = False) -> int:
    """llama.cpp's compute buffer at settings.n_ctx: resident on the CPU, or `reserved` (what a
    GPU backend allocates). See the COMPUTE_* constants for the calibration."""
    n_ubatch = settings.n_ubatch
    cells = _cells(settings.n_ctx)
    scores = facts.n_head * n_ubatch * cells * 4
    masks = (2 if facts.n_swa_layers else 1) * n_ubatch * cells * 4
    act = COMPUTE_ACT_FACTOR * facts.n_embd * n_ubatch * 4
    if reserved:
        attn = masks if settings.flash_attn else scores + masks
        return max(facts.vocab_size * n_ubatch * 4, attn) + act
    kq = 0 if settings.flash_attn else int(COMPUTE_KQ_FACTOR * scores)
    return kq + masks + act + COMPUTE_VOCAB_BYTES * facts.vocab_size + COMPUTE_FIXED


def _layer_weights(facts: ModelFacts) -> tuple[list[int], int]:
    """(bytes per block, output layer bytes)."""
    if facts.layer_bytes:
        return list(facts.layer_bytes), facts.output_bytes
    # facts without a tensor table: spread the file over the blocks and the output layer
    share = facts.file_size // (facts.n_layers + 1)
    return [share] * facts.n_layers, facts.output_bytes or share


def _gpu_weights(facts: ModelFacts, gpu_layers: int) -> int:
    """Weight bytes of the last `gpu_layers` layers (llama.cpp's n_gpu_layers, already clamped)."""
    per_layer, output = _layer_weights(facts)
    first_gpu = facts.n_layers + 1 - gpu_layers
    return sum(per_layer[i] for i in range(min(first_gpu, facts.n_layers), facts.n_layers)) + (
        output if gpu_layers else 0)


def sealed_ram(facts: ModelFacts, settings: EngineSettings) -> int:
    """RAM needed when the weights come from a sealed memfd (kit.sealed) instead of the stick's file.

    llama.cpp maps the memfd read-only and MAP_SHARED: the mapping *is* the memfd's pages, so the
    weights are counted once, as in `estimate_memory` (measured: bench/verification.py, the same
    RSS both ways). What changes: those pages are shmem, never evicted (the file's pages were
    reclaimable page cache), and they all stay while the memfd is open: llama.cpp's unmapping of
    offloaded tensors frees nothing, so weights sent to a GPU still count in RAM here."""
    est = estimate_memory(facts, settings)
    w_gpu = _gpu_weights(facts, est.gpu_layers) if est.gpu_layers else 0
    tied = _layer_weights(facts)[1] if est.gpu_layers and facts.tied_embeddings else 0
    return est.ram + w_gpu - tied  # est.ram holds weights - w_gpu + tied


def estimate_memory(facts: ModelFacts, settings: EngineSettings) -> MemoryEstimate:
    """What running `facts` with `settings` needs, split between RAM and VRAM.

    `settings.gpu_layers` is llama.cpp's n_gpu_layers: it offloads the *last* gpu_layers of the
    n_layers + 1 layers, where the extra one is the output layer (llama-model.cpp:
    i_gpu_start = n_layer + 1 - n_gpu_layers). So 1 moves only the output layer and
    n_layers + 1 moves everything; the token embeddings always stay in RAM. With offload_kqv
    (llama-cpp-python's default) an offloaded block's KV cache lives in VRAM too.
    `settings.threads` costs no memory.
    """
    if settings.n_ctx < 1:
        raise ValueError("n_ctx must be >= 1")
    gpu_layers = max(0, min(settings.gpu_layers, facts.n_layers + 1))
    per_layer, output = _layer_weights(facts)
    first_gpu = facts.n_layers + 1 - gpu_layers  # index among blocks (n_layers = output)

    gpu_blocks = range(min(first_gpu, facts.n_layers), facts.n_layers)
    cpu_blocks = range(0, min(first_gpu, facts.n_layers))
    kv_gpu = kv_cache_bytes(facts, settings, layers=gpu_blocks) if gpu_layers else 0
    kv_cpu = kv_cache_bytes(facts, settings, layers=cpu_blocks)

    weights = facts.file_size
    w_gpu = _gpu_weights(facts, gpu_layers)
    compute = compute_bytes(facts, settings)
    overhead = RUNTIME_OVERHEAD + facts.vocab_size * VOCAB_BYTES_PER_TOKEN

    if gpu_layers:
        # The GPU backend allocates its reserved compute buffer for real; the CPU keeps the
        # resident one for the blocks it still runs, or only the fixed part when all moved.
        c_gpu = compute_bytes(facts, settings, reserved=True)
        c_cpu = compute if cpu_blocks else (COMPUTE_FIXED
                                            + COMPUTE_VOCAB_BYTES * facts.vocab_size)
        # Offloaded tensors leave RAM: the last blocks lie at the file's end, and
        # llama-model-loader.cpp unmaps the mapped range no CPU tensor uses ("unmap offloaded
        # tensors and metadata"). A tied output layer is a copy of the token embeddings, which
        # stay in RAM.
        w_cpu = weights - w_gpu + (output if facts.tied_embeddings else 0)
    else:
        c_gpu, c_cpu, w_cpu = 0, compute, weights
    ram = w_cpu + kv_cpu + c_cpu + overhead
    vram = w_gpu + kv_gpu + c_gpu
    return MemoryEstimate(
        n_ctx=settings.n_ctx,
        gpu_layers=gpu_layers,
        weights=weights,
        kv_cache=kv_cpu + kv_gpu,
        compute=c_cpu + c_gpu,
        overhead=overhead,
        total=ram + vram,
        ram=ram,
        vram=vram,
    )
