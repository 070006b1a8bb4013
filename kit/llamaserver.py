"""What llama.cpp's llama-server is asked for: its command line and its environment, from the kit's
decisions (kit.serveplan) — the one translation, as kit.engine.context_params is for the engine.

The server gets a clean environment: it reads dozens of LLAMA_ARG_* variables (tools, MCP proxy,
model downloads, a second API key), and none of the host's may reach it. ggml loads the CPU
variant named by GGML_BACKEND_PATH (the kit's probed choice); the runtime keeps llama-server in a
folder holding no variant, so ggml finds no other beside it (kit.ggml.server_dir). ggml also loads
the backends it finds in the working folder: kit.serve starts it in one that holds only the GPU
backend the plan uses, if any.

Part of the pure core: no llama_cpp, no textual, no process started here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kit.conversation import DEFAULT_MAX_TOKENS
from kit.serveplan import ServePlan

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"  # --lan: every IPv4 interface; the key is then required
KEY_VARIABLE = "LLAMA_API_KEY"  # the key in the server's environment: not in its command line (ps)
_KV_TYPE_NAMES = {2: "f16", 1: "q8_0"}
HTTP_TIMEOUT_S = 120


@dataclass(frozen=True)
class ServerSpec:
    executable: Path
    model: Path  # a sealed copy's /proc/self/fd/N (inherited), or the verified file on the stick
    alias: str  # the model name API clients see and send
    plan: ServePlan
    bind: str  # LOOPBACK or ALL_INTERFACES
    port: int
    variant: Path  # the CPU kernel the probe chose
    web_dir: Path | None = None  # the kit's page, served at "/"; None: no page
    chat_template: str | None = None  # Jinja, for a GGUF without its own
    stops: Sequence[str] = ()
    max_tokens: int = DEFAULT_MAX_TOKENS  # an answer's length when a request does not say
    rpc: Sequence[str] = ()  # kit pool workers (HOST:PORT): the plan's GPU layers go to them
    tensor_split: Sequence[int] = ()  # their shares of those layers (what each offers)
    gpu_device: int | None = None  # the Vulkan device the GPU probe vetted (its backend in the working folder)
    library_path: Path | None = None  # the runtime's own Vulkan loader's folder, on a host without one

    @property
    def origin(self) -> str:
        return f"http://{LOOPBACK if self.bind == LOOPBACK else 'localhost'}:{self.port}"


def server_argv(spec: ServerSpec) -> list[str]:
    s = spec.plan.settings
    if s.kv_bytes_per_element not in _KV_TYPE_NAMES:
        raise ValueError(f"unsupported KV cache element size {s.kv_bytes_per_element}")
    kv = _KV_TYPE_NAMES[s.kv_bytes_per_element]
    argv = [
        str(spec.executable), "--model", str(spec.model), "--alias", spec.alias,
        "--host", spec.bind, "--port", str(spec.port),
        # the plan's memory: -c is shared by the slots, each gets its own part of the KV cache
        "--ctx-size", str(s.n_ctx), "--parallel", str(spec.plan.slots), "--no-kv-unified",
        "--threads", str(s.threads), "--threads-batch", str(s.threads),
        "--batch-size", str(s.n_batch), "--ubatch-size", str(s.n_ubatch),
        "--n-gpu-layers", str(s.gpu_layers), "--flash-attn", "on" if s.flash_attn else "off",
        "--cache-type-k", kv, "--cache-type-v", kv, *(["--swa-full"] if s.swa_full else []),
        # unpriced memory: the prompt cache (up to 8 GiB of finished conversations by default) and
        # context checkpoints (32 copies of a slot's state, for SWA or recurrent caches)
        "--cache-ram", "0", "--ctx-checkpoints", "0", "--no-context-shift", "--n-predict", str(spec.max_tokens),
        # a queue, not refusals: every HTTP thread beyond the slots holds a waiting person
        "--threads-http", str(4 * spec.plan.slots + 4),
        # /slots would show every person's conversation to anyone with the shared key: off; the
        # status reads /metrics. --fit off: llama-server must not re-plan what the kit planned.
        "--metrics", "--no-slots", "--fit", "off", "--offline", "--jinja", "--log-colors", "off",
        # a client that sends nothing holds an HTTP thread for at most this long (default: an hour)
        "--timeout", str(HTTP_TIMEOUT_S),
        # only the page this server serves talks to it from a browser; no other site may
        "--cors-origins", spec.origin, "--no-cors-credentials",
    ]
    if spec.web_dir is not None:
        argv += ["--path", str(spec.web_dir)]
    else:
        argv += ["--no-ui"]
    if spec.chat_template:
        argv += ["--chat-template", spec.chat_template]
    for stop in spec.stops:
        argv += ["--reverse-prompt", stop]
    if spec.rpc:
        argv += ["--rpc", ",".join(spec.rpc), "--tensor-split", ",".join(map(str, spec.tensor_split))]
    return argv


def server_env(spec: ServerSpec, key: str | None) -> dict[str, str]:
    """Everything llama-server's environment holds: the kernel, the key, nothing of the host's."""
    env = {"GGML_BACKEND_PATH": str(spec.variant), "PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    if spec.gpu_device is not None:  # the one device the kit vetted (kit.gpuprobe.VISIBLE_DEVICES)
        env["GGML_VK_VISIBLE_DEVICES"] = str(spec.gpu_device)
    if spec.library_path is not None:
        env["LD_LIBRARY_PATH"] = str(spec.library_path)
    if key:
        env[KEY_VARIABLE] = key
    return env
