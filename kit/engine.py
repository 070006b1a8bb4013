"""The ONLY module that imports llama_cpp: load a verified model, stream a chat, stop on request.

`ChatEngine` is what every front end talks to; `LlamaEngine` is the real one (the tests' fake,
in tests/conftest.py, subclasses the same base). Both llama.cpp entry points here, the load and
the benchmark, take their context parameters from one kit.settings.EngineSettings.
"""

from __future__ import annotations

import abc
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kit import ggml, integrity
from kit.errors import EngineError
from kit.settings import EngineSettings

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}

DEFAULT_MAX_TOKENS = 512
# Fallback chat formats that do not tell llama-cpp-python where a turn ends: without these a base
# model writes the next "### Instruction" itself and talks to itself until max_tokens.
TURN_MARKERS = {"alpaca": ["###", "</s>"], "vicuna": ["USER:", "</s>"], "zephyr": ["<|user|>", "</s>"]}
# A base model under a foreign template ends its answer with its own family's markers, which
# llama.cpp does not treat as end-of-generation (Gemma 3 270M loops on <start_of_image>).
FAMILY_MARKERS = ["<start_of_image>", "<end_of_turn>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>"]
_loaded_variants: set[str] = set()
_variant_lock = threading.Lock()


@dataclass
class GenStats:
    completion_tokens: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None
    context_used: int = 0  # tokens in the context after this answer
    stopped: bool = False  # True when the user stopped it

    @property
    def tokens_per_s(self) -> float:
        """Generation speed after the first token (the prompt's processing is not generation)."""
        if self.first_token_s is None:  # no first-token time recorded: the whole span
            return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0
        generating = self.seconds - self.first_token_s
        return (self.completion_tokens - 1) / generating if generating > 0 else 0.0


class ChatEngine(abc.ABC):
    """A loaded model a front end can stream answers from. Subclasses are dataclasses that set
    `model_id`, `n_ctx` and, after each answer, `last_stats`."""

    model_id: str
    n_ctx: int
    last_stats: GenStats | None

    @abc.abstractmethod
    def stream(self, messages: Sequence[Message], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               stop: threading.Event | None = None, temperature: float = 0.3) -> Iterator[str]:
        """Yield the answer's text piece by piece; stop early when `stop` is set."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the model."""


def ensure_backend(path: Path) -> None:
    """Load a backend module (a probed CPU variant, or a GPU backend) once per process."""
    _import_llama()  # first: its log callback then also quiets ggml's "load_backend" chatter
    with _variant_lock:
        if str(path) in _loaded_variants:
            return
        ggml.load_variant(path)
        _loaded_variants.add(str(path))


def _import_llama():
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: a shared library failed to load
        raise EngineError(f"the llama.cpp runtime could not start: {exc}",
                          "reinstall with build/install.sh, or use the stick's own runtime") from None
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp's load chatter is not for the user; errors still show
    return llama_cpp


@contextlib.contextmanager
def _quiet_native_stderr():
    """llama.cpp prints notes straight to fd 2 (not through its log callback), which would tear
    through the chat screen; failures still reach us as exceptions. KIT_DEBUG=1 keeps them."""
    from kit.paths import debug_enabled

    if debug_enabled():
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# llama.cpp's type ids for the KV cache (ggml.h): bytes per element -> type (f16, q8_0).
_KV_TYPES = {2: 1, 1: 8}


def context_params(settings: EngineSettings) -> dict:
    """EngineSettings as llama_cpp.Llama keywords: the one translation, for load and benchmark."""
    if settings.kv_bytes_per_element not in _KV_TYPES:
        raise EngineError(f"unsupported KV cache element size {settings.kv_bytes_per_element}")
    kv_type = _KV_TYPES[settings.kv_bytes_per_element]
    return {"n_ctx": settings.n_ctx, "n_threads": settings.threads, "n_threads_batch": settings.threads,
            "n_gpu_layers": settings.gpu_layers, "n_batch": settings.n_batch, "n_ubatch": settings.n_ubatch,
            "type_k": kv_type, "type_v": kv_type, "flash_attn": settings.flash_attn,
            "swa_full": settings.swa_full}


@dataclass
class LlamaEngine(ChatEngine):
    """A loaded model. Construct with `LlamaEngine.load(...)`."""

    llm: object
    model_id: str
    n_ctx: int
    last_stats: GenStats | None = None
    stop_strings: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, files: Sequence[Path], settings: EngineSettings, *, model_id: str,
             chat_format_fallback: str | None = None, variant: Path | None = None,
             gpu_backend: Path | None = None, seed: int | None = None) -> LlamaEngine:
        for f in files:  # every shard: llama.cpp opens the rest from the first
            integrity.require_verified(f)
        for module in (variant, gpu_backend if settings.gpu_layers > 0 else None):
            if module is not None:
                ensure_backend(module)
        llama_cpp = _import_llama()
        try:
            with _quiet_native_stderr():
                llm = llama_cpp.Llama(
                    model_path=str(files[0]), **context_params(settings), verbose=False,
                    seed=seed if seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"llama.cpp could not load {files[0].name}: {exc}") from None
        # A GGUF without a chat template (Gemma 3 270M is a base model) gets the manifest's
        # fallback format. Templates from metadata are rendered by llama-cpp-python in a Jinja
        # sandbox (ImmutableSandboxedEnvironment): no code runs from model metadata.
        stops: list[str] = []
        if "tokenizer.chat_template" not in llm.metadata and chat_format_fallback:
            llm.chat_format = chat_format_fallback
            stops = TURN_MARKERS.get(chat_format_fallback, []) + FAMILY_MARKERS
        return cls(llm=llm, model_id=model_id, n_ctx=settings.n_ctx, stop_strings=stops)

    def stream(self, messages: Sequence[Message], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               stop: threading.Event | None = None, temperature: float = 0.3) -> Iterator[str]:
        stats = GenStats()
        self.last_stats = stats
        with self._lock:
            start = time.perf_counter()
            try:
                chunks = self.llm.create_chat_completion(
                    messages=list(messages), stream=True, max_tokens=max_tokens,
                    temperature=temperature, repeat_penalty=1.1, stop=self.stop_strings or None)
                for chunk in chunks:
                    if stop is not None and stop.is_set():
                        chunks.close()
                        stats.stopped = True
                        break
                    text = chunk["choices"][0]["delta"].get("content")
                    if not text:
                        continue
                    if stats.first_token_s is None:
                        stats.first_token_s = time.perf_counter() - start
                    stats.completion_tokens += 1
                    stats.seconds = time.perf_counter() - start
                    yield text
            except ValueError as exc:  # llama-cpp-python's "Requested tokens exceed context window"
                raise EngineError(f"the conversation no longer fits the context: {exc}",
                                  "start a new conversation (the context is full)") from None
            finally:
                stats.context_used = int(getattr(self.llm, "n_tokens", 0))

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close:
            close()


def bench_context(prompt_tokens: int, gen_tokens: int) -> int:
    """The context a benchmark of this many prompt and generated tokens needs."""
    return max(256, prompt_tokens + gen_tokens + 16)


def benchmark(model: Path, settings: EngineSettings, *, prompt_tokens: int, gen_tokens: int,
              repeats: int = 3) -> dict:
    """Time a real batch decode and greedy generation (the kernel probe and `kit bench`).

    The best of `repeats` runs: on a busy machine the minimum is the kernel's speed, the rest
    is other programs. `settings.n_batch` should hold the whole prompt (one batch).
    """
    integrity.require_verified(model)
    llama_cpp = _import_llama()
    llm = llama_cpp.Llama(model_path=str(model), **context_params(settings), verbose=False)
    text = "The survival kit carries water, food, a map, a radio and a first aid box. " * 16
    tokens = llm.tokenize(text.encode())[:prompt_tokens]
    llm.eval(tokens[:8])  # warm up: first-use costs are not the kernel's speed
    best_prompt = best_gen = float("inf")
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        prompt_done = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([llm.sample(temp=0.0)])
        end = time.perf_counter()
        best_prompt = min(best_prompt, prompt_done - start)
        best_gen = min(best_gen, end - prompt_done)
    return {"prompt_tps": len(tokens) / best_prompt, "gen_tps": gen_tokens / best_gen,
            "seconds": best_prompt + best_gen, "prompt_tokens": len(tokens), "gen_tokens": gen_tokens}
