"""Starting the model on a stick: the one opening sequence every front end shares (ask, chat,
doctor; later serve).

Order: offline gate → stick and manifest (signature checked on the raw bytes before parsing,
then the rollback check) → host (`open_stick`) → the runtime's own libraries verified → plan
(from the manifest's facts, no model parsed yet) → verify the probe model's bytes and walk its
GGUF header with kit.ggufmeta's bounded reader → choose the CPU kernel (probe in children) → plan
with the probe's measured speed (`choose_kernel_and_plan`) → `start` then verifies the chosen
model and loads it, stepping down the fallback ladder when a load fails.

On Linux the chosen model is hashed while it is copied into sealed memfds (kit.sealed) and
llama.cpp loads those: the bytes it maps are the bytes checked, and the stick may go once the
model is loaded. Where memfd is missing or RAM is too tight (kit.plan.load_mode), the stick's
files are loaded by path, with the identity check of kit.integrity just before.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from kit import ggml, gpuprobe, integrity, kernels, offline, rollback, sealed, signing
from kit.conversation import DEFAULT_MAX_TOKENS, choose_preset, first_messages
from kit.engine import ChatEngine
from kit.errors import ChatTemplateError, EngineError, IntegrityError, KernelError, PlanError
from kit.grounding import Grounded, ground, search_text, source_budget
from kit.hardware import Host, detect
from kit.knowledge import Library
from kit.manifest import BundleManifest, FileEntry, ModelEntry
from kit.paths import BundlePaths, find_bundle, launcher_name, runtime_glibc, state_dir
from kit.plan import (
    BY_PATH,
    CpuSpeed,
    LaunchPlan,
    LoadMode,
    ModelOption,
    Overrides,
    fallback_steps,
    load_mode,
    make_budget,
    make_plan,
)
from kit.poolplan import POOL_BACKEND, Worker, pool_gpu
from kit.report import DoctorReport, ModelSummary
from kit.serveplan import ServePlan, plan_slots

Status = Callable[[str], None]


@dataclass(frozen=True)
class OpenStick:
    """A stick whose manifest passed the signature and rollback checks, and the host it is on."""

    bundle: BundlePaths
    trust: signing.Trust
    state: Path | None  # None: read-only stick, state in memory only
    host: Host

    @property
    def manifest(self) -> BundleManifest:
        return self.trust.manifest

    @property
    def options(self) -> list[ModelOption]:
        return model_options(self.manifest)


@dataclass
class Session:
    bundle: BundlePaths
    manifest: BundleManifest
    host: Host
    plan: LaunchPlan
    kernel: kernels.KernelChoice
    engine: ChatEngine
    state: Path | None
    steps: list[str] = field(default_factory=list)  # fallback steps taken, in words
    signer: str = "unsigned"  # the signer's fingerprint (kit.signing), or "unsigned"
    load_mode: LoadMode | None = None  # how the loaded model reached llama.cpp, and why
    knowledge: Library | None = None  # the stick's documents and archives, opened once verified
    gpu: gpuprobe.GpuChoice | None = None  # what the GPU probe found, and why the plan uses it or not

    def __post_init__(self) -> None:
        if self.knowledge is None:
            self.knowledge = Library(self.bundle, self.manifest)

    @property
    def model(self) -> ModelEntry:
        return self.manifest.model(self.plan.model_id)

    def grounded(self, question: str, *, preset: str | None = None, history: Sequence[dict] = (),
                 use_knowledge: bool = True, max_tokens: int = DEFAULT_MAX_TOKENS) -> Grounded:
        """The first messages of a question with the stick's best passages for it as numbered
        sources (kit.grounding), within what the context leaves after the answer's room. Without
        knowledge (turned off, none on the stick, none verified yet) the messages are `messages()`'s."""
        messages = self.messages(question, preset=preset, history=history)
        library = self.knowledge
        if not use_knowledge or library is None or not library.usable:  # off, none, or none verified (yet)
            return ground(messages, (), 0, searched=False)
        hits = library.search(search_text(question, history), relevant_only=True)
        budget = source_budget(self.plan.n_ctx, max_tokens, messages)
        return ground(messages, [h.passage for h in hits], budget)

    def messages(self, question: str, *, preset: str | None = None,
                 history: Sequence[dict] = ()) -> list[dict]:
        """The first messages of a question, the same for every front end: the stick's default
        preset when `preset` is None, none for kit.conversation.NO_PRESET, else the one named."""
        return first_messages(question, choose_preset(self.manifest.presets, preset), history)

    def report(self) -> DoctorReport:
        """What `kit doctor` would show, from what start() already found (nothing re-probed)."""
        return DoctorReport(str(self.bundle.root), self.signer, self.host, ModelSummary.all_of(self.manifest),
                            tuple(sorted(ggml.runtime_backends())), self.kernel, self.plan,
                            fallback_steps=tuple(self.steps), load_mode=self.load_mode, gpu=self.gpu,
                            knowledge=tuple(self.knowledge.states()) if self.knowledge else ())


def open_stick(stick: str | Path | None) -> OpenStick:
    """The first steps of every front end: offline, trusted manifest, rollback check, host."""
    offline.go_offline()
    bundle = find_bundle(stick)
    trust = signing.check_stick(bundle)  # refused if its signature is bad (unsigned is allowed)
    state = state_dir(bundle)
    rollback.check_bundle(bundle, trust.raw, state)
    warn_changed_launcher(bundle, trust.manifest)
    return OpenStick(bundle, trust, state, detect())


def launcher_mismatch(bundle: BundlePaths, manifest: BundleManifest, launcher: str | None) -> str | None:
    """Why the launcher named `launcher` (a root file name) does not match the manifest, or None.
    Only a name the manifest lists is checked: a stick from before root_files has none."""
    entry = next((f for f in manifest.root_files if f.path == launcher), None)
    if entry is None:
        return None
    status = integrity.verify_entry(bundle.root, entry)
    if status.state == integrity.OK:
        return None
    return (f"kit: warning: {launcher}, which started this, {status.detail or status.state}; it is not the one "
            "this stick was built with: run `verify` from a kit you trust")


def warn_changed_launcher(bundle: BundlePaths, manifest: BundleManifest) -> None:
    """One line on stderr when the launcher that started this (it exports KIT_LAUNCHER, its own
    name) does not match bundle.json's root_files. A warning, not a refusal: the launcher already
    ran, and one that lies would not say so; `kit verify` is the check."""
    message = launcher_mismatch(bundle, manifest, launcher_name())
    if message:
        print(message, file=sys.stderr)


def model_options(manifest: BundleManifest) -> list[ModelOption]:
    return [ModelOption(m.id, m.name, m.model_facts()) for m in manifest.models]


# Sealed copies of model files made in this process, by the stick file they copy (kit.sealed).
_sealed_copies: dict[str, integrity.SealedCopy] = {}


def model_paths(bundle: BundlePaths, model: ModelEntry) -> list[Path]:
    """What llama.cpp and the header walk open: the sealed copies when every shard has one, else
    the stick's files."""
    real = [bundle.resolve(p) for p in model.files]
    copies = [_sealed_copies.get(str(p)) for p in real]
    return [c.path for c in copies] if all(copies) else real


def release_sealed(bundle: BundlePaths, model: ModelEntry) -> None:
    """Free the sealed copies of a model that will not be loaded (a smaller one was chosen)."""
    for p in model.files:
        copy = _sealed_copies.pop(str(bundle.resolve(p)), None)
        if copy is not None:
            copy.close()


def seal_files(bundle: BundlePaths, manifest: BundleManifest, paths: Sequence[str], what: str,
               progress=None) -> None:
    """Hash these files while copying each into a sealed memfd; the first mismatch stops the
    launch with the file named. A memfd that cannot be filled raises integrity.SealFailed."""
    entries: list[FileEntry] = [manifest.file(p) for p in paths if not _sealed_already(bundle, manifest.file(p))]
    meter = integrity.ByteMeter(sum(e.size for e in entries), progress)
    for entry in entries:
        status, copy = integrity.seal_entry(bundle.kit, entry, meter.file(entry.path, entry.size))
        if copy is None:
            raise IntegrityError(f"{what}: {status.path} is {status.state}: {status.detail}")
        _sealed_copies[str(bundle.resolve(entry.path))] = copy


def _sealed_already(bundle: BundlePaths, entry: FileEntry) -> bool:
    """A copy of this file made earlier in this process, of the bytes this manifest names."""
    copy = _sealed_copies.get(str(bundle.resolve(entry.path)))
    if copy is None:
        return False
    if integrity.require_verified(copy.path) == entry.blake3:
        return True
    copy.close()  # another manifest (an update since): copy again
    del _sealed_copies[str(bundle.resolve(entry.path))]
    return False


def verify_files(bundle: BundlePaths, manifest: BundleManifest, paths: Sequence[str],
                 what: str, progress=None) -> None:
    """Hash exactly these files (unless this process already did, and they have not changed);
    any mismatch stops the launch with the file named."""
    paths = [p for p in paths if not _verified_already(bundle.resolve(p))]
    if not paths:
        return
    report = integrity.verify_bundle(bundle.kit, manifest, only=paths, progress=progress)
    bad = [f for f in report.files if f.state != integrity.OK]
    if bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise IntegrityError(f"{what}: {first.path} is {first.state}: {first.detail}{more}")


def _verified_already(path: Path) -> bool:
    try:
        integrity.require_verified(path)
        return True
    except (IntegrityError, OSError):
        return False


def verify_own_libraries(bundle: BundlePaths, manifest: BundleManifest, platform: str,
                         folders: Sequence[str] = ("lib",), what: str = "llama.cpp libraries") -> None:
    """A frozen runtime on its stick checks its llama.cpp libraries (in llama_cpp/<folder>/) before
    loading or starting any of them."""
    if not getattr(sys, "frozen", False):
        return
    libs = [f.path for f in manifest.runtime_files(platform) if any(f"/llama_cpp/{d}/" in f.path for d in folders)]
    if libs:
        verify_files(bundle, manifest, libs, f"the runtime's {what} are damaged")


def verify_own_tools(bundle: BundlePaths, manifest: BundleManifest, platform: str, tools: Path) -> None:
    """llama-server and rpc-server with their libraries and the ones they load from llama_cpp/lib.
    `tools` (llama_cpp/bin) must hold exactly what the manifest lists: ggml loads every backend
    module it finds beside the executable, so one file more would run unchecked."""
    if not getattr(sys, "frozen", False):
        return
    listed = {bundle.resolve(f.path).resolve() for f in manifest.runtime_files(platform)
              if "/llama_cpp/bin/" in f.path}
    present = {p.resolve() for p in tools.iterdir()} if tools.is_dir() else set()
    extra = sorted(present - listed)
    if extra:
        raise IntegrityError(f"llama-server's folder holds {extra[0].name}, which this stick's manifest does not "
                             "list; refusing to start it", "rebuild the stick, or copy it again from a good one")
    if not listed:
        raise IntegrityError("this stick's manifest lists no llama-server",
                             "rebuild the stick with this kit's `kit build` (its runtime carries llama-server)")
    verify_own_libraries(bundle, manifest, platform, ("bin", "lib"), "llama-server and its libraries")


def recheck_tools(variant: Path, *modules: Path) -> None:
    """Just before a tool's exec: llama_cpp/bin's files, the kernel and any other library it will
    load (a GPU backend, the carried Vulkan loader) are still the bytes hashed (a frozen runtime on
    its stick; a source install's are not on the stick)."""
    if not getattr(sys, "frozen", False):
        return
    for path in (*sorted(ggml.server_dir().iterdir()), variant, *modules):
        integrity.require_verified(path)


_prechecked: set[str] = set()  # BLAKE3 of model files whose GGUF header passed the bounded walk


def verify_model(bundle: BundlePaths, manifest: BundleManifest, model: ModelEntry, progress=None, *,
                 seal: bool = False) -> None:
    """Hash the model's files (`seal`: while copying them into sealed memfds), then walk their GGUF
    headers with kit.ggufmeta's bounded reader: a hostile header (absurd counts or lengths) is
    refused before llama.cpp parses it, here or in a probe child. The bytes walked are the bytes
    just verified: the sealed copies themselves, or the files with their identity checked after."""
    what = f"model {model.id} is damaged"
    if seal:
        seal_files(bundle, manifest, model.files, what, progress)
    else:
        verify_files(bundle, manifest, model.files, what, progress)
    paths = model_paths(bundle, model) if seal else [bundle.resolve(p) for p in model.files]
    hashes = {integrity.require_verified(p) for p in paths}
    if not hashes <= _prechecked:
        from kit.ggufmeta import read_facts

        read_facts(paths)
        for p in paths:
            integrity.require_verified(p)  # not swapped while it was walked
        _prechecked.update(hashes)


def choose_load_mode(opened: OpenStick, plan: LaunchPlan) -> LoadMode:
    """Sealed copies where memfd works and RAM allows (kit.plan.load_mode), else by path."""
    model = opened.manifest.model(plan.model_id)
    return load_mode(opened.host, plan, model.model_facts(), memfd_problem=sealed.unsupported(),
                     runtime_backends=ggml.runtime_backends())


def smallest_model(manifest: BundleManifest) -> ModelEntry:
    return min(manifest.models, key=manifest.model_size)


def measured_speed(manifest: BundleManifest, kernel: kernels.KernelChoice) -> CpuSpeed | None:
    """The probe's generation speed with the smallest model: the planner scales it to the others."""
    chosen = next((r for r in kernel.results if r.variant == kernel.chosen), None)
    if chosen is None or not chosen.gen_tps:
        return None
    return CpuSpeed(manifest.model_size(smallest_model(manifest)), chosen.gen_tps)


def choose_kernel(opened: OpenStick, *, refresh: bool = False, on_probe=None,
                  progress=None, seal: bool = False) -> kernels.KernelChoice:
    """Verify the runtime's own libraries, then probe (or recall) the CPU kernel with the smallest
    model, verified first: the probe children load it (its sealed copy when there is one; each
    hashes it again).
    `seal` (start, not doctor): verify it into sealed copies when it could be loaded that way, so
    that a stick whose smallest model is the one chosen reads it once."""
    bundle, manifest = opened.bundle, opened.manifest
    verify_own_libraries(bundle, manifest, opened.host.platform)
    probe_model = smallest_model(manifest)
    verify_model(bundle, manifest, probe_model, progress, seal=seal and _could_seal(opened, probe_model))
    first, blake3 = _probe_model(opened)
    return kernels.choose_kernel(opened.host, first, blake3, state=opened.state, saved=bundle.kit / "state",
                                 refresh=refresh, on_result=on_probe)


def _probe_model(opened: OpenStick) -> tuple[Path, str]:
    """The smallest model, verified (choose_kernel), as the probe children get it: they inherit a
    sealed copy (kernels.spawn); a split model's other shards are found by name, which only the
    load's private links give, so a split one is probed from the stick."""
    probe_model = smallest_model(opened.manifest)
    paths = model_paths(opened.bundle, probe_model)
    first = paths[0] if len(paths) == 1 else opened.bundle.resolve(probe_model.files[0])
    return first, opened.manifest.file(probe_model.files[0]).blake3


def choose_gpu(opened: OpenStick, kernel: kernels.KernelChoice, overrides: Overrides, *, refresh: bool = False,
               on_probe=None) -> tuple[OpenStick, gpuprobe.GpuChoice]:
    """After the CPU kernel: which GPU the runtime's Vulkan backend may drive (kit.gpuprobe, with
    the same verified smallest model), and the stick as the plan then sees it: the host's GPUs
    are the devices the probe vetted. Forced GPU layers (--gpu-layers) probe software devices too
    and may use a working device slower than the CPU; a broken one never."""
    backend = ggml.gpu_backend_libs().get(gpuprobe.BACKEND) if gpuprobe.BACKEND in ggml.runtime_backends() else None
    if backend is None:
        return opened, gpuprobe.GpuChoice(reason="this runtime carries no GPU backend: CPU only", backend=None)
    if overrides.gpu_layers == 0:  # the way out of GPU trouble: no driver code runs at all
        choice = gpuprobe.GpuChoice(reason="--gpu-layers 0: CPU only, no GPU probed")
        return replace(opened, host=replace(opened.host, gpus=(), gpu_note=choice.reason)), choice
    forced = bool(overrides.gpu_layers and overrides.gpu_layers > 0)
    first, blake3 = _probe_model(opened)
    choice = gpuprobe.choose_gpu(opened.host, kernel, first, blake3, state=opened.state,
                                 saved=opened.bundle.kit / "state", backend=backend,
                                 carried_loader=ggml.carried_vulkan_loader(), refresh=refresh,
                                 on_result=on_probe, probe_software=forced or gpuprobe.probe_all_asked())
    gpus = choice.gpus(forced)
    host = replace(opened.host, gpus=gpus, gpu_note=None if gpus else choice.reason)
    return replace(opened, host=host), choice


def without_gpu_check(overrides: Overrides) -> Overrides:
    """Overrides to check before any probe: forced GPU layers wait for the GPU probe when the
    runtime has a GPU backend (the host's devices are known only then); a negative count does not."""
    forced = overrides.gpu_layers is not None and overrides.gpu_layers > 0
    return replace(overrides, gpu_layers=None) if forced and ggml.runtime_backends() else overrides


def _could_seal(opened: OpenStick, model: ModelEntry) -> bool:
    try:
        plan = plan_for(opened, Overrides(model=model.id))
    except PlanError:
        return False
    return choose_load_mode(opened, plan).sealed


def planning_host(opened: OpenStick, pool: Sequence[Worker] = ()) -> tuple[Host, frozenset[str]]:
    """The host and backends the plan sees: with a pool, the pool is its one device (a local GPU
    is left out: llama.cpp would split layers over both, which the memory model does not price)."""
    if not pool:
        return opened.host, ggml.runtime_backends()
    return replace(opened.host, gpus=(pool_gpu(pool),)), frozenset({POOL_BACKEND})


def plan_for(opened: OpenStick, overrides: Overrides, kernel: kernels.KernelChoice | None = None,
             pool: Sequence[Worker] = ()) -> LaunchPlan:
    """The plan; with the kernel's measured speed it skips a model that would answer slower than
    people read. Without a kernel it only checks the overrides (they fail before any probe)."""
    host, backends = planning_host(opened, pool)
    return make_plan(host, opened.options, runtime_backends=backends, overrides=overrides,
                     cpu_variant=kernel.chosen if kernel else None,
                     cpu_speed=measured_speed(opened.manifest, kernel) if kernel else None)


def plan_serve(opened: OpenStick, overrides: Overrides, kernel: kernels.KernelChoice | None,
               parallel: int | None, pool: Sequence[Worker] = ()) -> tuple[LaunchPlan, ServePlan]:
    """kit serve's plan: the chat's (model, threads, GPU layers), then its memory divided into
    llama-server's slots; --ctx is each slot's context. With a pool, its workers' memory counts."""
    plan = plan_for(opened, overrides, kernel, pool)
    model = opened.manifest.model(plan.model_id)
    budget = make_budget(*planning_host(opened, pool))
    return plan, plan_slots(plan, model.model_facts(), budget, slots=parallel, slot_ctx=overrides.n_ctx)


def as_launch_plan(plan: LaunchPlan, serve_plan: ServePlan) -> LaunchPlan:
    """The chat plan with the server's settings: what the load mode must fit in RAM."""
    return replace(plan, settings=serve_plan.settings, estimate=serve_plan.estimate)


def glibc_fit(opened: OpenStick) -> tuple[str, str] | None:
    """(the glibc this host's runtime on the stick needs, the host's glibc), on a Linux host.

    The launcher refuses a host older than the runtime needs; doctor shows how close it is."""
    try:
        have = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    platform_name = f"{opened.host.os}-{opened.host.arch}"
    runtime = next((r for r in opened.manifest.runtimes if r.platform == platform_name), None)
    if not have or not have.startswith("glibc ") or runtime is None:
        return None
    need = runtime_glibc(opened.bundle.resolve(runtime.folder))
    return (need, have.split()[1]) if need else None


def doctor(stick, overrides: Overrides, *, refresh: bool = False, on_probe=None, serve: bool = False,
           parallel: int | None = None, pool: Sequence[Worker] = (), on_knowledge=None,
           on_gpu_probe=None) -> DoctorReport:
    """Everything `kit doctor` shows: host, kernel probe table, plan (or why none); `serve`: the
    plan of `kit serve` (its slots, with their reasons) instead of the chat's; `pool`: with the
    workers' memory (kit.pool found them)."""
    opened = open_stick(stick)
    library = Library(opened.bundle, opened.manifest)
    try:
        knowledge = tuple(library.check_all(on_knowledge))  # every archive hashed: progress on a terminal
    finally:
        library.close()
    report = DoctorReport(str(opened.bundle.root), opened.trust.signer_label, opened.host,
                          ModelSummary.all_of(opened.manifest), tuple(sorted(ggml.runtime_backends())),
                          glibc=glibc_fit(opened), pool=tuple(pool), knowledge=knowledge)
    try:
        report = replace(report, kernel=choose_kernel(opened, refresh=refresh, on_probe=on_probe))
        if not pool:  # a pool is the plan's one device (planning_host), as kit serve has it
            opened, gpu = choose_gpu(opened, report.kernel, overrides, refresh=refresh, on_probe=on_gpu_probe)
            report = replace(report, host=opened.host, gpu=gpu)
        if serve or pool:
            plan, serve_plan = plan_serve(opened, overrides, report.kernel, parallel, pool)
            report = replace(report, plan=plan, serve=serve_plan)
            return replace(report, load_mode=choose_load_mode(opened, as_launch_plan(plan, serve_plan)))
        report = replace(report, plan=plan_for(opened, overrides, report.kernel))
        return replace(report, load_mode=choose_load_mode(opened, report.plan))
    except (KernelError, PlanError, IntegrityError) as err:
        return replace(report, error=f"{err} — {err.hint}")


def start(stick, overrides: Overrides | None = None, *, on_progress=None,
          on_status: Status = lambda s: None) -> Session:
    """Everything up to a loaded, answering model."""
    opened = open_stick(stick)
    manifest = opened.manifest
    overrides = overrides or Overrides()
    plan_for(opened, without_gpu_check(overrides))  # bad overrides fail fast, before any probe
    on_status("checking the stick's smallest model and choosing the CPU kernel")
    kernel = choose_kernel(opened, progress=on_progress, seal=True,
                           on_probe=lambda r: on_status(f"probed CPU kernel {r.variant}: {r.state}"))
    on_status("looking for a GPU the runtime can use")
    opened, gpu = choose_gpu(opened, kernel, overrides,
                             on_probe=lambda r: on_status(f"probed GPU {r.name}: {r.state}"))
    plan = plan_for(opened, overrides, kernel)
    model = manifest.model(plan.model_id)
    if model.id != smallest_model(manifest).id:
        release_sealed(opened.bundle, smallest_model(manifest))  # its RAM, before the chosen one's copy
    on_status(f"checking {model.id} against the stick's manifest")
    engine, plan, steps, mode = load_with_fallback(opened, plan, kernel, on_status, on_progress)
    return Session(opened.bundle, manifest, opened.host, plan, kernel, engine, opened.state, steps,
                   opened.trust.signer_label, mode, gpu=gpu)


def load_with_fallback(opened: OpenStick, plan: LaunchPlan, kernel: kernels.KernelChoice, on_status: Status,
                       on_progress) -> tuple[ChatEngine, LaunchPlan, list[str], LoadMode]:
    """Try the plan, then each step of the ladder when a load fails; the user sees steps, never a
    crash. Every model is verified before it loads (sealed where `choose_load_mode` says so);
    sealed copies of a model that did not load are freed before the next step."""
    from kit.engine import LlamaEngine

    bundle, manifest = opened.bundle, opened.manifest
    backends = ggml.runtime_backends()
    gpu_libs = ggml.gpu_backend_libs() if backends else {}
    attempts = [plan] + fallback_steps(plan, opened.host, opened.options, runtime_backends=backends)
    steps: list[str] = []
    last_error: Exception | None = None
    refused: set[str] = set()  # models whose chat template the sandbox refused: no setting helps
    for attempt in attempts:
        if attempt.model_id in refused:
            continue
        model = manifest.model(attempt.model_id)
        mode = verified_for_load(opened, attempt, model, on_progress, steps)
        on_status(f"loading {model.name}: {attempt_description(attempt)}")
        try:
            if attempt.gpu is not None and attempt.gpu.backend == gpuprobe.BACKEND:
                select_vulkan_device(attempt.gpu)
            with _load_names(bundle, model, mode) as files:
                engine = LlamaEngine.load(
                    files, attempt.settings, model_id=model.id,
                    chat_format_fallback=model.chat_format, variant=kernel.path,
                    gpu_backend=gpu_libs.get(attempt.gpu.backend) if attempt.gpu else None)
            return engine, attempt, steps, mode
        except (EngineError, OSError) as err:  # OSError: no folder to name a split model's shards in
            last_error = err
            if isinstance(err, ChatTemplateError):
                refused.add(model.id)
            step = attempt_description(attempt)
            steps.append(f"{step} failed: {err}")
            on_status(f"could not start {step}: {err}; trying a smaller setting")
            release_sealed(bundle, model)
    if isinstance(last_error, ChatTemplateError) and len(refused) == len({a.model_id for a in attempts}):
        raise last_error  # its own sentence names the model and says what to do
    raise EngineError(f"no setting worked on this host; last error: {last_error}")


def select_vulkan_device(gpu) -> None:
    """The device the GPU probe vetted, and a Vulkan loader, before ggml's Vulkan backend loads."""
    if gpu.device_index is None:  # not from kit.gpuprobe: never probed, never used
        raise EngineError(f"{gpu.name} was not vetted by the GPU probe", "run with --gpu-layers 0")
    try:
        gpuprobe.select_device(gpu.device_index, ggml.carried_vulkan_loader())
    except gpuprobe.VulkanError as err:
        raise EngineError(str(err), "run with --gpu-layers 0") from None


def verified_for_load(opened: OpenStick, attempt: LaunchPlan, model: ModelEntry, on_progress,
                       steps: list[str]) -> LoadMode:
    """Verify `model` for this attempt, sealed when the load mode says so; a memfd that cannot be
    filled (memory ran short after all) falls back to the path, as a step the user sees."""
    mode = choose_load_mode(opened, attempt)
    if not mode.sealed:
        release_sealed(opened.bundle, model)  # copied for the probe, but this attempt needs more RAM
    if mode.sealed:
        try:
            verify_model(opened.bundle, opened.manifest, model, on_progress, seal=True)
            return mode
        except integrity.SealFailed as err:
            release_sealed(opened.bundle, model)
            mode = LoadMode(BY_PATH, f"the sealed copy failed ({err.strerror or err}): loading by path")
            steps.append(mode.reason)
    verify_model(opened.bundle, opened.manifest, model, on_progress)
    return mode


@contextlib.contextmanager
def _load_names(bundle: BundlePaths, model: ModelEntry, mode: LoadMode) -> Iterator[list[Path]]:
    """The paths to hand llama.cpp: the sealed copies (named as llama.cpp derives a split model's
    shard names, kit.sealed.shard_names), or the stick's files."""
    if not mode.sealed:
        yield [bundle.resolve(p) for p in model.files]
        return
    names = [posixpath.basename(p) for p in model.files]
    with sealed.shard_names(model_paths(bundle, model), names) as links:
        yield links


def attempt_description(plan: LaunchPlan) -> str:
    gpu = f", {plan.gpu_layers} GPU layers" if plan.gpu_layers else ""
    return f"{plan.model_id} at {plan.n_ctx} tokens{gpu}"
