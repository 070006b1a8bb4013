"""The ONLY module that imports llama_cpp: load a verified model, stream a chat, stop on request.

`ChatEngine` is what every front end talks to: `answer` is the one streaming path (the engine's
`stream` through kit.loopguard, and an EmptyAnswerError when nothing came). `LlamaEngine` is the
real engine (the tests' fake, in tests/conftest.py, subclasses the same base). Both llama.cpp
entry points here, the load and the benchmark, take their context parameters from one
kit.settings.EngineSettings.

llama-cpp-python's own streaming completion detokenizes every token generated so far, in
Python, for each new token: its cost per token grows with the answer (1.2 ms at token 1,000 on
the demo model, 2.5 ms at 2,000). `_streaming_llama` keeps its chat templates and replaces only
that loop with one that decodes each token once and looks for stop strings in a bounded tail,
and runs llama-cpp-python's own sampler chain on the few tokens that can still be picked instead
of the whole vocabulary (`_CandidateSampler`: Gemma 3 has 262,144 tokens).
"""

from __future__ import annotations

import abc
import codecs
import contextlib
import ctypes
import dataclasses
import functools
import inspect
import os
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kit import chatformat, ggml, integrity
from kit.conversation import DEFAULT_MAX_TOKENS, EmptyAnswerError
from kit.errors import ChatTemplateError, EngineError
from kit.loopguard import LoopGuard
from kit.settings import EngineSettings

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}

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
            "swa_full": settings.swa_full,
            # No GPU layers, no GPU work: a GPU backend already registered in this process (a GPU
            # attempt that failed, stepping down the ladder) must not get the CPU's batches either.
            "op_offload": settings.gpu_layers > 0}


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
        except Exception as exc:  # llama.cpp's ValueError/RuntimeError, or the chat template's syntax error
            raise EngineError(f"llama.cpp could not load {model_id} ({files[0].name}): {_one_line(exc)}") from None
        # A GGUF without a chat template (Gemma 3 270M is a base model) gets the manifest's
        # fallback format. Templates from metadata are rendered by llama-cpp-python in a Jinja
        # sandbox (ImmutableSandboxedEnvironment): no code runs from model metadata, and a template
        # the sandbox stops is refused here, once, rather than at the first question.
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            try:
                check_chat_template(template, bos=_token_text(llm, llm.token_bos()),
                                    eos=_token_text(llm, llm.token_eos()), model_id=model_id)
            except EngineError:
                llm.close()  # the fallback ladder loads the next model: free this one first
                raise
        stops: list[str] = []
        if "tokenizer.chat_template" not in llm.metadata and chat_format_fallback:
            llm.chat_format = chat_format_fallback
            stops = chatformat.stop_strings(chat_format_fallback)
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
                    now = time.perf_counter() - start
                    if stats.first_token_s is None:
                        stats.first_token_s = now
                    stats.completion_tokens += 1
                    stats.seconds = now
                    yield text
            except ValueError as exc:
                # "Requested tokens ... exceed context window" (llama-cpp-python's words); any
                # other ValueError is not about length, e.g. a chat template's raise_exception
                if "exceed context window" not in str(exc):
                    raise EngineError(f"the model could not answer: {_one_line(exc)}",
                                      "start a new conversation, or choose another preset or model") from None
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


# A conversation every template should accept (no system turn: some templates refuse one).
SAMPLE_CONVERSATION: tuple[Message, ...] = (
    {"role": "user", "content": "How do I purify water?"},
    {"role": "assistant", "content": "Boil it for one minute."},
    {"role": "user", "content": "And without a fire?"},
)


def check_chat_template(template: str, *, bos: str, eos: str, messages: Sequence[Message] = SAMPLE_CONVERSATION,
                        model_id: str | None = None) -> str:
    """Render a GGUF chat template exactly as llama-cpp-python does at chat time (its
    Jinja2ChatFormatter, a sandboxed environment) and return the prompt. A template the sandbox
    stops (code reaching for Python internals), one that does not compile, or any other failure
    while rendering is an EngineError with one line naming the model and the reason."""
    _import_llama()
    from llama_cpp import llama_chat_format

    try:
        formatter = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        return formatter(messages=[dict(m) for m in messages]).prompt
    except Exception as exc:  # SecurityError, TemplateSyntaxError, the template's own raise_exception ...
        who = f"model {model_id}" if model_id else "this model"
        raise ChatTemplateError(f"{who} has a chat template the sandbox refused: {_one_line(exc)}",
                          "the model file is unsafe or broken; use another model or rebuild the stick") from None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _token_text(llm, token: int) -> str:
    """A special token's text, as llama-cpp-python hands bos/eos to its chat formatter."""
    return llm._model.token_get_text(token) if token != -1 else ""


@functools.cache
def _streaming_llama(llama_cpp):
    """llama_cpp.Llama whose streaming completion costs the same per token at token 10 and token
    2,000. Chat templates, stop strings from the template and the sampling stay llama-cpp-python's
    (create_chat_completion renders the prompt, then calls create_completion with its tokens)."""

    sampler_defaults = {name: param.default for name, param in
                        inspect.signature(llama_cpp.Llama._init_sampler).parameters.items()
                        if param.default is not inspect.Parameter.empty}

    lowlevel = llama_cpp.llama_cpp  # the module llama-cpp-python's own internals call

    attach = lowlevel._lib.llama_attach_threadpool
    attach.restype, attach.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]

    class StreamingLlama(llama_cpp.Llama):
        _one_token = None  # (the LlamaBatch, its fields) for eval's one-token path
        _pieces: dict | None = None  # token -> detokenize([token]), filled as tokens are generated
        _threadpools: tuple[ggml.Threadpool, ...] = ()

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # prompt graphs run n_threads_batch threads: a pool of their own when the counts differ
            # (llama.cpp's common does the same); NULL = the generation pool (the kit's case)
            params = self.context_params
            pool = ggml.new_threadpool(params.n_threads)
            batch = ggml.new_threadpool(params.n_threads_batch) if params.n_threads_batch != params.n_threads else None
            self._threadpools = tuple(p for p in (pool, batch) if p is not None)
            if pool is not None:
                attach(self._ctx.ctx, pool.handle, batch.handle if batch is not None else None)

        def close(self) -> None:
            super().close()  # frees the context first: it no longer uses the pools
            for pool in self._threadpools:
                pool.free()

        def eval(self, tokens):
            """Llama.eval, without its Python per-token batch loop for one token (each generated
            token): the same KV-cache trim, batch, decode and bookkeeping."""
            memory = self._ctx.memory
            if len(tokens) != 1 or self._logits_all or memory is None:
                return super().eval(tokens)
            fields = self._one_token
            if fields is None or fields[0] is not self._batch:
                b = self._batch.batch
                fields = self._one_token = (self._batch, b, b.token, b.pos, b.seq_id[0], b.n_seq_id, b.logits)
            _, batch, token, pos, seq_id, n_seq_id, logits = fields
            n_past = self.n_tokens
            lowlevel.llama_memory_seq_rm(memory, 0, n_past, -1)  # kv_cache_seq_rm(-1, n_past, -1)
            batch.n_tokens = 1
            token[0] = tokens[0]
            pos[0], seq_id[0], n_seq_id[0], logits[0] = n_past, 0, 1, True
            return_code = lowlevel.llama_decode(self._ctx.ctx, batch)
            if return_code != 0:
                raise RuntimeError(f"llama_decode returned {return_code}")
            self.input_ids[n_past] = tokens[0]
            self.n_tokens += 1
            self._requires_eval = False

        def _init_sampler(self, **params):
            """llama-cpp-python's chain, once per answer (generate() calls this, then samples
            with it each token); run on the candidates alone when they provably suffice."""
            chain = super()._init_sampler(**params)
            keep = candidates_needed(sampler_defaults | params, self.last_n_tokens_size)
            rows = _CandidateSampler.rows_for(self._n_vocab, keep) if keep is not None else None
            return chain if rows is None else _CandidateSampler(llama_cpp, chain, self._n_vocab, keep, rows)

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
            is_eog, vocab, decode = llama_cpp.llama_vocab_is_eog, self._model.vocab, decoder.decode
            if self._pieces is None:
                self._pieces = {}
            pieces = self._pieces
            try:
                for token in tokens:
                    if is_eog(vocab, token):
                        finish = "stop"
                        break
                    generated += 1
                    piece = pieces.get(token)
                    if piece is None:
                        piece = pieces[token] = self.detokenize([token])
                    text, found = stops.feed(decode(piece))
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


def candidates_needed(params: dict, last_n: int) -> int | None:
    """How many of the highest logits hold every token llama-cpp-python's sampler chain can pick
    with these settings (`Llama._init_sampler`'s keywords), or None when it needs them all.

    The chain is: repeat/frequency/presence penalties, then top-k (greedy: the top 1), then
    typical, top-p, min-p, temperature and the seeded draw, which see only those k. The penalties
    only ever lower a logit (repeat penalty >= 1, frequency and presence >= 0), and only of the
    distinct tokens among the last `last_n` generated: a token outside the top k + last_n before
    the penalties has at least k tokens above it after them, so it can never be picked."""
    if params["logits_processor"] is not None or params["grammar"] is not None or params["mirostat_mode"]:
        return None  # these see, or draw from, the whole vocabulary
    temp, k = params["temp"], params["top_k"]
    if temp < 0:
        return None  # a draw from the whole vocabulary
    keep = 1 if temp == 0 else k
    if keep <= 0:
        return None  # top_k=0: no cut, the whole vocabulary is drawn from
    repeat, freq, present = params["repeat_penalty"], params["frequency_penalty"], params["presence_penalty"]
    if last_n > 0 and (repeat, freq, present) != (1.0, 0.0, 0.0):  # llama.cpp's "penalties disabled"
        if repeat < 1.0 or freq < 0.0 or present < 0.0:
            return None  # a penalty that raises logits could lift any token into the top k
        keep += last_n
    return keep


class _CandidateSampler:
    """llama-cpp-python's own sampler chain (the same samplers, order, parameters and seed state)
    applied to the tokens that can still be picked instead of the whole vocabulary.

    llama_sampler_sample copies every logit into a token array and the repeat penalty looks each
    of them up in its history before top-k keeps 40: 0.9 ms of a 12 ms token on Gemma 3 (262,144
    tokens). Here numpy reads the logits in place and keeps those at or above a threshold that at
    least `keep` of them reach (candidates_needed: they hold every token the chain can pick), in
    token order as llama.cpp passes the whole vocabulary, and the chain runs on that short array.
    Greedy picks the same token, ties included (the lowest id); a draw uses the same random
    number and picks the same token, unless candidates with exactly equal logits sit at the top-k
    cut or inside it, whose order llama.cpp's partial sort leaves undefined either way."""

    def __init__(self, llama_cpp, chain, n_vocab: int, keep: int, rows: int):
        import numpy as np

        self._np, self._llama_cpp = np, llama_cpp
        self.chain, self.n_vocab, self.keep, self.rows = chain, n_vocab, keep, rows  # chain: a LlamaSampler
        self._dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        if self._dtype.itemsize != ctypes.sizeof(llama_cpp.llama_token_data):
            raise RuntimeError("llama_token_data is not the layout this sampler was written for")
        # Each token runs right after a decode has swept the caches, so what costs here is every
        # Python call, numpy call and new object, far more than the arithmetic: everything that
        # can be made once is made here, and the token array, the mask and the column maxima are
        # written in place.
        self._array = llama_cpp.llama_token_data_array()
        self._array_p = ctypes.pointer(self._array)
        self._grow(1024)
        self._best = np.empty(n_vocab // rows, np.single)
        self._mask = np.empty(n_vocab, np.bool_)
        self._cut = len(self._best) - keep
        self._kth = (self._cut, len(self._best) - 1)  # the last: the largest, NaN if there is one
        # llama_get_logits_ith returning the address as an int, not a new ctypes pointer each time
        lib = llama_cpp.llama_cpp._lib
        self._logits_ith = type(lib.llama_get_logits_ith)(("llama_get_logits_ith", lib))
        self._logits_ith.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32]
        self._logits_ith.restype = ctypes.c_void_p
        self._address = None  # of the logits the views below read: llama.cpp's output buffer
        self._logits = self._folded = None

    def _grow(self, n: int) -> None:
        np = self._np
        self._data = np.zeros(n, self._dtype)
        self._ids, self._values, self._p = self._data["id"], self._data["logit"], self._data["p"]
        self._array.data = self._data.ctypes.data_as(self._llama_cpp.llama_token_data_p)

    @staticmethod
    def rows_for(n_vocab: int, keep: int) -> int | None:
        """How many rows to fold the vocabulary into (each column's highest logit is one sure
        candidate, so at least `keep` columns are needed), or None when no fold fits."""
        return next((r for r in (128, 64, 32, 16, 8, 4, 2) if n_vocab % r == 0 and n_vocab // r > keep), None)

    def _view(self, address: int):
        """numpy views of the logits at `address`, made again only when llama.cpp moves them."""
        np = self._np
        self._logits = np.frombuffer((ctypes.c_float * self.n_vocab).from_address(address), np.single)
        self._folded = self._logits.reshape(self.rows, -1)
        self._address = address
        return self._logits

    def sample(self, ctx, idx: int = -1) -> int:
        """What LlamaSampler.sample (llama_sampler_sample) does, on the candidates."""
        address = self._logits_ith(ctx.ctx, idx)
        if not address:
            raise RuntimeError(f"llama.cpp has no logits for output {idx}")
        logits = self._logits if address == self._address else self._view(address)
        ids = self._candidates(logits)
        n = len(ids)
        if n > len(self._data):
            self._grow(max(n, 1024))
        self._ids[:n] = ids
        self._values[:n] = logits[ids]
        self._p[:n] = 0.0
        array = self._array
        array.size, array.selected, array.sorted = n, -1, False
        llama_cpp = self._llama_cpp
        sampler = self.chain.sampler
        llama_cpp.llama_sampler_apply(sampler, self._array_p)
        chosen = array.selected
        if not 0 <= chosen < array.size:
            raise RuntimeError("llama.cpp's sampler chain chose no token")
        token = int(self._ids[chosen])
        llama_cpp.llama_sampler_accept(sampler, token)  # the penalties' history
        return token

    def _candidates(self, logits):
        """Token ids, ascending, of every logit >= a threshold that at least `keep` logits reach:
        the keep-th highest of the columns' highest logits (each of those columns holds one)."""
        np = self._np
        folded = self._folded if logits is self._logits else logits.reshape(self.rows, -1)
        best = folded.max(axis=0, out=self._best)
        best = np.partition(best, self._kth)
        if best[-1] != best[-1]:  # NaN logits (partition puts them last): all of them, as llama.cpp itself would
            return np.arange(self.n_vocab)
        mask = np.greater_equal(logits, best[self._cut], out=self._mask)
        return mask.nonzero()[0]

    def close(self) -> None:
        self.chain.close()


class StopStrings:
    """Finds stop strings in streamed text; holds back only a tail that could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.found = False
        # a piece with no stop string's first character, and nothing held, is shown whole
        firsts = "".join(sorted({s[0] for s in self.stops}))
        self._first = re.compile("[" + re.escape(firsts) + "]").search if firsts else None

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was found: nothing after it is shown)."""
        if not self.held and (self._first is None or self._first(text) is None):
            return text, False
        held = self.held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.found = "", True
            return held[: min(hits)], True
        keep = max((self._begun(held, s) for s in self.stops), default=0)
        self.held = held[len(held) - keep:] if keep else ""
        return held[: len(held) - keep], False

    @staticmethod
    def _begun(held: str, stop: str) -> int:
        """Length of the longest tail of `held` that begins `stop` (shorter than it). A search for
        its first character: one C call per stop for most tokens, which contain none."""
        at = held.find(stop[0], max(0, len(held) - len(stop) + 1))
        while at >= 0:
            if stop.startswith(held[at:]):
                return len(held) - at
            at = held.find(stop[0], at + 1)
        return 0

    def flush(self, text: str = "") -> str:
        rest, self.held = self.held + text, ""
        return rest


def _alpaca_handler():
    """llama-cpp-python's alpaca format ends the prompt after the question, without the
    "### Response:" line that every other format's assistant cue has: a base model then writes the
    next "### Instruction" itself, which is a stop string, and the answer is empty (Gemma 3 270M
    did so for most questions). The same format with the cue."""
    from llama_cpp import llama_chat_format

    def format_alpaca_with_cue(messages, **kwargs):
        result = llama_chat_format.format_alpaca(messages=messages, **kwargs)
        return dataclasses.replace(result, prompt=result.prompt + chatformat.ALPACA_CUE)

    return llama_chat_format.chat_formatter_to_chat_completion_handler(format_alpaca_with_cue)


def bench_context(prompt_tokens: int, gen_tokens: int) -> int:
    """The context a benchmark of this many prompt and generated tokens needs."""
    return max(256, prompt_tokens + gen_tokens + 16)


BENCH_TEXT = b"The survival kit carries water, food, a map, a radio and a first aid box. " * 16


@dataclass
class BenchModel:
    """A verified model loaded for timing (the kernel probe's children and `kit bench`)."""

    llm: object
    tokens: list[int]  # the prompt: `settings.n_batch` should hold it whole (one batch)
    greedy: object  # the chat's sampler at temperature 0, built once as generate() does per answer
    generated: list[int] = field(default_factory=list)  # the last round's tokens (kit.gpuprobe compares them)

    @classmethod
    def load(cls, model: Path, settings: EngineSettings, *, prompt_tokens: int) -> BenchModel:
        integrity.require_verified(model)
        llama_cpp = _import_llama()
        try:
            llm = _streaming_llama(llama_cpp)(model_path=str(model), **context_params(settings), verbose=False)
        except Exception as exc:  # as LlamaEngine.load words it
            raise EngineError(f"llama.cpp could not load {model.name}: {_one_line(exc)}") from None
        return cls(llm, llm.tokenize(BENCH_TEXT)[:prompt_tokens], llm._init_sampler(temp=0.0))

    def round(self, gen_tokens: int) -> tuple[float, float]:
        """One real batch decode of the prompt, then `gen_tokens` greedy tokens: their seconds."""
        llm = self.llm
        llm.reset()
        self.generated = []
        start = time.perf_counter()
        llm.eval(self.tokens)
        prompt_done = time.perf_counter()
        for _ in range(gen_tokens):
            token = self.greedy.sample(llm._ctx)
            self.generated.append(token)
            llm.eval([token])
        return prompt_done - start, time.perf_counter() - prompt_done


def benchmark(model: Path, settings: EngineSettings, *, prompt_tokens: int, gen_tokens: int,
              repeats: int = 3) -> dict:
    """Time a real batch decode and greedy generation (`kit bench`).

    The best of `repeats` runs: on a busy machine the minimum is the kernel's speed, the rest
    is other programs.
    """
    bench = BenchModel.load(model, settings, prompt_tokens=prompt_tokens)
    bench.llm.eval(bench.tokens[:8])  # warm up: first-use costs are not the kernel's speed
    rounds = [bench.round(gen_tokens) for _ in range(repeats)]
    best_prompt, best_gen = min(r[0] for r in rounds), min(r[1] for r in rounds)
    return {"prompt_tps": len(bench.tokens) / best_prompt, "gen_tps": gen_tokens / best_gen,
            "seconds": best_prompt + best_gen, "prompt_tokens": len(bench.tokens), "gen_tokens": gen_tokens}
