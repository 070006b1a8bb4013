"""The ONLY module that imports llama_cpp: load a verified model, stream a chat, stop on request.

`ChatEngine` is what every front end talks to: `answer` is the one streaming path (the engine's
`stream` through kit.loopguard, and an EmptyAnswerError when nothing came). `LlamaEngine` is the
real engine (the tests' fake, in tests/conftest.py, subclasses the same base). Both llama.cpp
entry points here, the load and the benchmark, take their context parameters from one
kit.settings.EngineSettings.

llama-cpp-python's own streaming completion detokenizes every token generated so far, in
Python, for each new token: its cost per token grows with the answer (1.2 ms at token 1,000 on
the demo model, 2.5 ms at 2,000). `_streaming_llama` keeps its chat templates and replaces only
that loop with one that decodes each token once and looks for stop strings in a bounded tail.
"""

from __future__ import annotations

import abc
import codecs
import contextlib
import dataclasses
import functools
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kit import ggml, integrity
from kit.conversation import DEFAULT_MAX_TOKENS, EmptyAnswerError
from kit.errors import EngineError
from kit.loopguard import LoopGuard
from kit.settings import EngineSettings

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}

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
    looped: bool = False  # True when the loop guard stopped it (kit.loopguard)

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

    def answer(self, messages: Sequence[Message], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               stop: threading.Event | None = None, temperature: float = 0.3) -> Iterator[str]:
        """The answer as every front end shows it: `stream` through the loop guard, which holds
        back what may be the start of a loop and ends the answer when the model repeats itself
        (`last_stats.looped`). One piece for each the engine wrote: "" while the guard holds text
        back, so a front end can still show the answer's progress. An answer with no text raises
        EmptyAnswerError, unless the user stopped it first."""
        guard = LoopGuard()
        pieces = self.stream(messages, max_tokens=max_tokens, stop=stop, temperature=temperature)
        try:
            for piece in pieces:
                yield guard.feed(piece)
                if guard.looped:
                    break
        finally:
            pieces.close()  # a loop, or the caller stopped reading: the engine stops generating
        rest = guard.close()
        if rest:
            yield rest
        stats = self.last_stats
        if stats is not None:
            stats.looped = guard.looped
        if not guard.text.strip() and not (stats is not None and stats.stopped):
            raise EmptyAnswerError()


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
                llm = _streaming_llama(llama_cpp)(
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
            if chat_format_fallback == "alpaca":
                llm.chat_handler = _alpaca_handler()
        return cls(llm=llm, model_id=model_id, n_ctx=settings.n_ctx, stop_strings=stops)

    def stream(self, messages: Sequence[Message], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               stop: threading.Event | None = None, temperature: float = 0.3) -> Iterator[str]:
        stats = GenStats()
        self.last_stats = stats
        with self._lock:
            start = time.perf_counter()
            chunks = None
            try:
                chunks = self.llm.create_chat_completion(
                    messages=list(messages), stream=True, max_tokens=max_tokens,
                    temperature=temperature, repeat_penalty=1.1, stop=self.stop_strings or None)
                for chunk in chunks:
                    if stop is not None and stop.is_set():
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
            except ValueError as exc:  # "Requested tokens exceed context window"
                raise EngineError(f"the conversation no longer fits the context: {exc}",
                                  "start a new conversation (the context is full)") from None
            finally:
                if chunks is not None:
                    chunks.close()  # ends the generation in llama.cpp, also when our reader stopped
                stats.context_used = int(getattr(self.llm, "n_tokens", 0))

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close:
            close()


@functools.cache
def _streaming_llama(llama_cpp):
    """llama_cpp.Llama whose streaming completion costs the same per token at token 10 and token
    2,000. Chat templates, stop strings from the template and the sampling stay llama-cpp-python's
    (create_chat_completion renders the prompt, then calls create_completion with its tokens)."""

    class StreamingLlama(llama_cpp.Llama):
        def create_completion(self, prompt, **kwargs):
            simple = (kwargs.get("stream") and isinstance(prompt, list) and kwargs.get("suffix") is None
                      and not kwargs.get("echo") and kwargs.get("logprobs") is None and not kwargs.get("logit_bias"))
            if not simple:
                return super().create_completion(prompt, **kwargs)
            return self._stream(list(prompt), **kwargs)

        def _stream(self, prompt: list[int], *, max_tokens=16, stop=None, seed=None, model=None,
                    temperature=0.8, top_p=0.95, min_p=0.05, typical_p=1.0, top_k=40, repeat_penalty=1.0,
                    frequency_penalty=0.0, presence_penalty=0.0, tfs_z=1.0, mirostat_mode=0, mirostat_tau=5.0,
                    mirostat_eta=0.1, stopping_criteria=None, logits_processor=None, grammar=None, **_unused):
            # The same checks, limits and seed sequence as llama-cpp-python's own _create_completion.
            room = self._n_ctx - len(prompt)
            if room <= 0:
                raise ValueError(f"Requested tokens ({len(prompt)}) exceed context window of {self._n_ctx}")
            limit = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
            self.set_seed(seed if seed is not None else random.Random(self._seed).randint(0, 2**32))
            stops = StopStrings([stop] if isinstance(stop, str) else list(stop or ()))
            decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # holds a split character
            meta = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                    "model": model or self.model_path}

            def chunk(text: str, finish: str | None) -> dict:
                return meta | {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

            finish, generated = "length", 0
            tokens = self.generate(
                prompt, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, temp=temperature,
                repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, stopping_criteria=stopping_criteria,
                logits_processor=logits_processor, grammar=grammar)
            try:
                for token in tokens:
                    if llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                        finish = "stop"
                        break
                    generated += 1
                    text, found = stops.feed(decoder.decode(self.detokenize([token])))
                    if text:
                        yield chunk(text, None)
                    if found:
                        finish = "stop"
                        break
                    if generated >= limit:
                        break
                else:
                    finish = "stop"  # the template's stopping criteria ended it
                if not stops.found:
                    rest = stops.flush(decoder.decode(b"", final=True))
                    if rest:
                        yield chunk(rest, None)
            finally:
                tokens.close()
            yield chunk("", finish)

    return StreamingLlama


class StopStrings:
    """Finds stop strings in streamed text; holds back only a tail that could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.found = False

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was found: nothing after it is shown)."""
        held = self.held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.found = "", True
            return held[: min(hits)], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(held)), 0, -1)
                    if held.endswith(s[:n])), default=0)
        self.held = held[len(held) - keep:] if keep else ""
        return held[: len(held) - keep], False

    def flush(self, text: str = "") -> str:
        rest, self.held = self.held + text, ""
        return rest


ALPACA_CUE = "### Response:\n"  # the Alpaca template's own last line


def _alpaca_handler():
    """llama-cpp-python's alpaca format ends the prompt after the question, without the
    "### Response:" line that every other format's assistant cue has: a base model then writes the
    next "### Instruction" itself, which is a stop string, and the answer is empty (Gemma 3 270M
    did so for most questions). The same format with the cue."""
    from llama_cpp import llama_chat_format

    def format_alpaca_with_cue(messages, **kwargs):
        result = llama_chat_format.format_alpaca(messages=messages, **kwargs)
        return dataclasses.replace(result, prompt=result.prompt + ALPACA_CUE)

    return llama_chat_format.chat_formatter_to_chat_completion_handler(format_alpaca_with_cue)


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
