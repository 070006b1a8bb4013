"""kit serve: one stick serves a team through llama.cpp's own llama-server.

The kit writes no server. It runs the opening sequence every front end shares (kit.launch:
offline gate, trust, the runtime's own files verified, probe, plan), divides the memory into
slots (kit.serveplan), copies the chosen model into sealed memory while hashing it, and starts
llama-server on that copy (the child inherits the descriptor: the bytes it maps are the bytes
checked), with the probed CPU kernel, a clean environment and the kit's page. While it serves,
`watch` reads its /metrics over loopback for the status line; the server's log is
kept in memory only (its last lines explain a death).

Loopback by default. --lan binds every interface and always needs a key: made at start, kept in
the stick's state (--keep-key), or read from --key-file. Nothing is written to the host: the page
and its settings live in a private RAM folder (kit.sealed.ram_folder) for as long as it serves.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import posixpath
import secrets
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kit import chatformat, ggml, gpuprobe, integrity, launch, llamaserver, pool, poolplan, sealed
from kit.child import ChildProcess, check_port_free
from kit.conversation import DEFAULT_MAX_TOKENS
from kit.errors import KitError, ServeError
from kit.fsutil import atomic_write
from kit.kernels import KernelChoice
from kit.launch import OpenStick
from kit.manifest import ModelEntry
from kit.plan import LaunchPlan, LoadMode, Overrides
from kit.poolplan import Worker
from kit.serveplan import ServePlan

Status = Callable[[str], None]
DISCLAIMER = "Answers can be wrong; in an emergency reach trained help."
KEY_FILE_NAME = "serve-key"  # in the stick's state, with --keep-key
MIN_KEY_LENGTH = 16
READY_TIMEOUT_S = 300.0  # a large model from a slow stick; the server says "loading" meanwhile
# The host's http_proxy must not see loopback requests, nor the key they carry.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_STOP_SIGNALS = tuple(filter(None, (signal.SIGTERM, getattr(signal, "SIGHUP", None))))  # no SIGHUP on Windows


@dataclass(frozen=True)
class ServeOptions:
    port: int = 8080
    lan: bool = False
    parallel: int | None = None
    key_file: Path | None = None
    keep_key: bool = False
    pool: tuple[tuple[str, int], ...] = ()  # kit pool workers (HOST, PORT) to lend their memory
    private: bool = False  # for the kit's own front end (kit.poolchat): a random key, no page
    key: str | None = None  # a key already in use (a restart without the pool keeps the team's links)


@dataclass(frozen=True)
class Serving:
    """A server that answers: what the banner shows."""

    model: ModelEntry
    plan: LaunchPlan
    serve_plan: ServePlan
    load_mode: LoadMode
    port: int
    lan: bool
    key: str | None
    urls: tuple[str, ...]  # loopback first, then each LAN address
    pool: tuple[Worker, ...] = ()  # the workers holding some of the layers
    kernel: KernelChoice | None = None  # the probe's verdict

    @property
    def share_url(self) -> str:
        """The address others use: the first LAN one (the default route's), else loopback."""
        return self.urls[1] if len(self.urls) > 1 else self.urls[0]

    @property
    def join_url(self) -> str:
        """What a phone opens: share_url with the key in the fragment (never sent to the server)."""
        return f"{self.share_url}#key={self.key}" if self.key else self.share_url


@dataclass
class ServeStatus:
    slots_busy: int = 0
    slots: int = 0
    served: int = 0  # answers finished
    waiting: int = 0  # requests queued for a slot
    tokens_per_s: float = 0.0  # generation over the last interval, every slot together


# ---------------------------------------------------------------- the key


def choose_key(options: ServeOptions, state: Path | None) -> str | None:
    """None on loopback without --key-file; --lan always gets one, a private server a random one."""
    if options.key is not None:
        return options.key
    if options.private:
        return secrets.token_urlsafe(18)
    if options.key_file is not None:
        return read_key_file(options.key_file)
    if not options.lan:
        return None
    if options.keep_key:
        if state is None:
            raise KitError("--keep-key needs a writable stick to keep the key in",
                           "use --key-file FILE, or leave --keep-key out for a new key each start")
        kept = state / KEY_FILE_NAME
        if kept.is_file():
            return read_key_file(kept)
        key = secrets.token_urlsafe(18)
        atomic_write(kept, (key + "\n").encode(), mode=0o600)
        return key
    return secrets.token_urlsafe(18)


def read_key_file(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise KitError(f"cannot read the key file {path}: {getattr(exc, 'strerror', None) or exc}",
                       "give a readable text file holding one key") from None
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(keys) != 1 or len(keys[0]) < MIN_KEY_LENGTH or any(c.isspace() or not c.isprintable() for c in keys[0]):
        raise KitError(f"the key file {path} must hold one key of at least {MIN_KEY_LENGTH} characters, "
                       "without spaces", "write a long random key on one line, e.g. `openssl rand -base64 24`")
    return keys[0]


# ---------------------------------------------------------------- addresses and the page


# Interfaces other computers do not reach this one on: containers, VMs, bridges for them.
_VIRTUAL_INTERFACES = ("docker", "br-", "virbr", "veth", "vmnet", "vboxnet", "lxc", "podman", "cni")


def lan_addresses() -> list[str]:
    """This host's IPv4 addresses others can reach, the default route's first (the QR code's):
    no loopback, no link-local 169.254, no container or VM bridge, interfaces that are up."""
    import psutil

    stats = psutil.net_if_stats()
    default = _default_route_interfaces()
    found = []
    for name, addrs in psutil.net_if_addrs().items():
        virtual = name.startswith(_VIRTUAL_INTERFACES) and name not in default
        if virtual or not stats.get(name) or not stats[name].isup:
            continue
        found += [(name not in default, name, a.address) for a in addrs if a.family == socket.AF_INET
                  and not a.address.startswith(("127.", "169.254."))]
    return [address for *_, address in sorted(found)]


def _default_route_interfaces() -> set[str]:
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:  # not Linux
        return set()
    return {f[0] for f in (line.split() for line in lines) if len(f) > 1 and f[1] == "00000000"}


def page_html(config: dict) -> str:
    """The kit's page with its settings filled in (presets, disclaimer, whether a key is needed)."""
    template = resources.files("kit").joinpath("web/index.html").read_text(encoding="utf-8")
    # inside <script>: no "<" at all, so no "</script>" or "<!--" in a preset can end the element
    return template.replace("__KIT_CONFIG__", json.dumps(config).replace("<", "\\u003c"))


def page_config(opened: OpenStick, model: ModelEntry, needs_key: bool, stops: list[str]) -> dict:
    presets = opened.manifest.presets
    return {"title": f"Survival Kit — {opened.manifest.profile}", "model": model.id, "model_name": model.name,
            "needs_key": needs_key, "disclaimer": DISCLAIMER,
            "presets": [{"id": p.id, "name": p.name, "system": p.system} for p in presets],
            "default_preset": presets[0].id if presets else None,
            "max_tokens": DEFAULT_MAX_TOKENS, "stop": stops}


# ---------------------------------------------------------------- the process


class ServerProcess(ChildProcess):
    """A running llama-server: its log in memory, its health and status over loopback."""

    name = "llama-server"
    error = ServeError

    def __init__(self, argv: list[str], env: dict[str, str], *, cwd: Path, pass_fds: tuple[int, ...],
                 port: int, key: str | None):
        self.base = f"http://{llamaserver.LOOPBACK}:{port}"
        self.key = key
        self.served = 0
        self._last_tokens: tuple[float, float] | None = None  # (time, tokens_predicted_total)
        super().__init__(argv, env, cwd=cwd, pass_fds=pass_fds)

    def on_line(self, line: str) -> None:
        if "stop processing" in line:  # llama-server's line for every finished answer
            self.served += 1

    def open(self, path: str, body: dict | None = None, timeout: float = 2.0):
        """A request to the server over loopback, with its key (never through the host's proxy);
        a JSON body makes it a POST. The response, to read and close; HTTPError for an error code."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        return _LOOPBACK.open(request, timeout=timeout)

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with self.open(path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, check: Callable[[], None] = lambda: None) -> None:
        """Until /health answers; `check` runs each round (a pool's workers still answer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            check()
            if self.proc.poll() is not None:
                raise ServeError(self.death())
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.get("/health", timeout=1.0)[0] == 200:
                    return
            time.sleep(0.2)
        raise ServeError(f"llama-server did not become ready in {timeout:.0f} s",
                         "try a smaller model (--model) or fewer slots (--parallel)")

    def status(self, slots: int) -> ServeStatus:
        state = ServeStatus(slots=slots, served=self.served)
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            code, body = self.get("/metrics")
            if code == 200:
                metrics = parse_metrics(body.decode())
                state.slots_busy = int(metrics.get("llamacpp:requests_processing", 0))
                state.waiting = int(metrics.get("llamacpp:requests_deferred", 0))
                now, tokens = time.monotonic(), metrics.get("llamacpp:tokens_predicted_total", 0.0)
                if self._last_tokens is not None and now > self._last_tokens[0]:
                    state.tokens_per_s = max(0.0, tokens - self._last_tokens[1]) / (now - self._last_tokens[0])
                self._last_tokens = (now, tokens)
        return state


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: `name value` lines, comments skipped."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value.split()[0])
    return values


# ---------------------------------------------------------------- the whole job


@dataclass
class Server:
    serving: Serving
    process: ServerProcess
    opened: OpenStick
    _cleanup: contextlib.ExitStack = field(repr=False)

    def close(self) -> None:
        """Stop the server and free its page and sealed copy; a second Ctrl+C cannot cut it short."""
        in_main = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGINT, *_STOP_SIGNALS) if in_main else ()
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
        try:
            self.process.stop()
        finally:
            self._cleanup.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def start(stick, overrides: Overrides, options: ServeOptions, *, on_status: Status = lambda s: None,
          on_progress=None) -> Server:
    """Everything up to a llama-server that answers on `options.port`."""
    opened = launch.open_stick(stick)
    manifest = opened.manifest
    bind = llamaserver.ALL_INTERFACES if options.lan else llamaserver.LOOPBACK
    workers = pool.find_pool(options.pool, on_status) if options.pool else []
    # bad overrides fail fast, before any probe (forced GPU layers: once the GPU probe has run)
    launch.plan_for(opened, overrides if workers else launch.without_gpu_check(overrides), pool=workers)
    key = choose_key(options, opened.state)
    check_port_free(bind, options.port, ServeError)
    server = ggml.tool_path("llama-server")
    if not server.is_file():
        raise ServeError(f"this runtime has no llama-server ({server})",
                         "kit serve runs on Linux, from a stick built by this kit's `kit build`")
    launch.verify_own_tools(opened.bundle, manifest, opened.host.platform, server.parent)
    on_status("checking the stick's smallest model and choosing the CPU kernel")
    kernel = launch.choose_kernel(opened, progress=on_progress, seal=True,
                                  on_probe=lambda r: on_status(f"probed CPU kernel {r.variant}: {r.state}"))
    if not workers:  # a pool is the plan's one device; else the GPUs the probe vetted
        opened, _gpu = launch.choose_gpu(opened, kernel, overrides,
                                         on_probe=lambda r: on_status(f"probed GPU {r.name}: {r.state}"))
    plan, serve_plan = launch.plan_serve(opened, overrides, kernel, options.parallel, workers)
    if not plan.gpu_layers:
        workers = []  # the plan put nothing on the pool
    model = manifest.model(plan.model_id)
    if model.id != launch.smallest_model(manifest).id:
        launch.release_sealed(opened.bundle, launch.smallest_model(manifest))
    template = None if model.model_facts().has_chat_template else _fallback_template(model)
    stops = [] if template is None else chatformat.stop_strings(model.chat_format)
    on_status(f"checking {model.id} against the stick's manifest")
    mode = launch.verified_for_load(opened, launch.as_launch_plan(plan, serve_plan), model, on_progress, [])
    cleanup = contextlib.ExitStack()
    try:
        files = _model_descriptors(cleanup, opened, model)
        names = cleanup.enter_context(sealed.shard_names(files, [posixpath.basename(p) for p in model.files]))
        web_dir = None if options.private else _page_folder(cleanup, page_config(opened, model, key is not None,
                                                                                   stops), on_status)
        gpu = plan.gpu if plan.gpu is not None and plan.gpu.backend == gpuprobe.BACKEND and plan.gpu_layers else None
        spec = llamaserver.ServerSpec(server, names[0], model.id, serve_plan, bind, options.port, kernel.path,
                                      web_dir=web_dir, chat_template=template, stops=stops,
                                      rpc=[w.endpoint for w in workers], tensor_split=poolplan.tensor_split(workers),
                                      gpu_device=gpu.device_index if gpu else None,
                                      library_path=_carried_loader_folder() if gpu else None)
        workdir = _backend_folder(cleanup, gpu) if gpu else server.parent
        inherited = tuple(fd for fd in map(sealed.fd_of, map(str, files)) if fd is not None)
        gpu_files = [ggml.gpu_backend_libs()[gpu.backend]] if gpu else []
        gpu_files += [ggml.carried_vulkan_loader()] if spec.library_path else []
        launch.recheck_tools(kernel.path, *gpu_files)  # what llama-server will load, rehashed
        on_status(f"starting llama-server: {model.name}, {serve_plan.slots} slots of {serve_plan.slot_ctx} tokens")
        process = ServerProcess(llamaserver.server_argv(spec), llamaserver.server_env(spec, key),
                                cwd=workdir, pass_fds=inherited, port=options.port, key=key)
        cleanup.callback(process.stop)
        process.wait_ready(*_pool_loading(workers, plan, process))
    except BaseException:
        cleanup.close()
        raise
    lan = lan_addresses() if options.lan else []
    urls = (f"http://{llamaserver.LOOPBACK}:{options.port}/", *(f"http://{a}:{options.port}/" for a in lan))
    serving = Serving(model, plan, serve_plan, mode, options.port, options.lan, key, urls, tuple(workers), kernel)
    return Server(serving, process, opened, cleanup)


def _backend_folder(cleanup: contextlib.ExitStack, gpu) -> Path:
    """llama-server's working folder: a private RAM folder holding a link to the GPU backend only.
    ggml loads backends found in the working folder (the CPU variant comes by GGML_BACKEND_PATH,
    the RPC module from beside the executable), and the runtime's lib/ holds every CPU variant."""
    module = ggml.gpu_backend_libs().get(gpu.backend)
    if module is None:
        raise ServeError(f"this runtime has no {gpu.backend} backend", "run `kit serve --gpu-layers 0`")
    folder = cleanup.enter_context(sealed.ram_folder("backend"))
    (folder / module.name).symlink_to(module)
    return folder


def _carried_loader_folder() -> Path | None:
    """The runtime's own Vulkan loader's folder when this host has no loader, else None."""
    from kit import vulkan

    loader = ggml.carried_vulkan_loader()
    return None if vulkan.host_has_loader() or loader is None else loader.parent


# A pool's layers cross the network while llama-server loads: count ~5 MiB/s (a slow Wi-Fi) for them.
POOL_LOAD_BYTES_PER_S = 5 * 1024 * 1024


def _pool_loading(workers: list[Worker], plan: LaunchPlan, process: ServerProcess) -> tuple[float, Callable]:
    """How long llama-server may take to load, and what to check meanwhile: with a pool, longer (its
    layers are sent to the workers) and each worker must keep answering."""
    if not workers:
        return READY_TIMEOUT_S, lambda: None
    watcher = pool.PoolWatch(workers)
    return READY_TIMEOUT_S + plan.estimate.vram / POOL_LOAD_BYTES_PER_S, lambda: watcher.check(process)


def _model_descriptors(cleanup: contextlib.ExitStack, opened: OpenStick, model: ModelEntry) -> list[Path]:
    """/proc/self/fd/N of each verified model file, for the server to inherit: the sealed copies,
    or (by path) the stick's files opened after their identity matched what was hashed, so a path
    swapped later cannot reach llama-server."""
    paths = launch.model_paths(opened.bundle, model)
    if all(sealed.fd_of(p) is not None for p in paths):
        return list(paths)
    fds = [integrity.open_verified(p) for p in paths]
    for fd in fds:
        cleanup.callback(os.close, fd)
    return [sealed.fd_path(fd) for fd in fds]


def _fallback_template(model: ModelEntry) -> str:
    fmt = model.chat_format
    template = chatformat.server_template(fmt) if fmt else None
    if template is None:
        raise ServeError(f"model {model.id} has no chat template and the kit has no server template for "
                         f"its fallback format {fmt!r}",
                         f"serve another model (--model), or use it in `kit chat`; formats the server knows: "
                         f"{', '.join(sorted(chatformat.SERVER_TEMPLATES))}")
    return template


def _page_folder(cleanup: contextlib.ExitStack, config: dict, on_status: Status) -> Path | None:
    try:
        folder = cleanup.enter_context(sealed.ram_folder("page"))
    except OSError as exc:
        on_status(f"no browser page: {exc}; the API still works")
        return None
    (folder / "index.html").write_text(page_html(config), encoding="utf-8")
    return folder




def _interrupt(*_) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM and SIGHUP stop kit serve as Ctrl+C does, while it starts too (a probe, a load);
    the event stops the serving loop from another thread."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in _STOP_SIGNALS}
    try:
        yield threading.Event()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch(server: Server, on_status: Callable[[ServeStatus], None], stop: threading.Event,
          interval: float = 1.0) -> None:
    """Report the status every `interval` until `stop` is set; a server that dies is a ServeError,
    a pool worker that stops answering a PoolLost."""
    watcher = pool.PoolWatch(server.serving.pool) if server.serving.pool else None
    while not stop.is_set():
        if server.process.proc.poll() is not None:
            if watcher:  # llama-server ends itself when a worker's connection breaks
                watcher.check(server.process, force=True)
            raise ServeError(server.process.death(), "start it again; if it keeps stopping, run `kit doctor --serve`")
        if watcher:  # silent but connected (a cut cable): llama-server would wait for it forever
            watcher.check(server.process)
        on_status(server.process.status(server.serving.serve_plan.slots))
        stop.wait(interval)
