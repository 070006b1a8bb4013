"""Starting the model on a stick: the one opening sequence every front end shares (ask, chat,
doctor; later serve).

Order: offline gate → stick and manifest (signature checked on the raw bytes before parsing,
then the rollback check) → host (`open_stick`) → the runtime's own libraries verified → plan
(from the manifest's facts, no model parsed yet) → verify the probe model's bytes and walk its
GGUF header with kit.ggufmeta's bounded reader → choose the CPU kernel (probe in children) → plan
with the probe's measured speed (`choose_kernel_and_plan`) → `start` then verifies the chosen
model and loads it, stepping down the fallback ladder when a load fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from kit import ggml, integrity, kernels, offline, rollback, signing
from kit.conversation import choose_preset, first_messages
from kit.engine import ChatEngine
from kit.errors import EngineError, IntegrityError, KernelError, PlanError
from kit.hardware import Host, detect
from kit.manifest import BundleManifest, ModelEntry
from kit.paths import BundlePaths, find_bundle, state_dir
from kit.plan import CpuSpeed, LaunchPlan, ModelOption, Overrides, fallback_steps, make_plan
from kit.report import DoctorReport, ModelSummary

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

    @property
    def model(self) -> ModelEntry:
        return self.manifest.model(self.plan.model_id)

    def messages(self, question: str, *, preset: str | None = None,
                 history: Sequence[dict] = ()) -> list[dict]:
        """The first messages of a question, the same for every front end: the stick's default
        preset when `preset` is None, none for kit.conversation.NO_PRESET, else the one named."""
        return first_messages(question, choose_preset(self.manifest.presets, preset), history)

    def report(self) -> DoctorReport:
        """What `kit doctor` would show, from what start() already found (nothing re-probed)."""
        return DoctorReport(str(self.bundle.root), self.signer, self.host, ModelSummary.all_of(self.manifest),
                            tuple(sorted(ggml.runtime_backends())), self.kernel, self.plan,
                            fallback_steps=tuple(self.steps))


def open_stick(stick: str | Path | None) -> OpenStick:
    """The first steps of every front end: offline, trusted manifest, rollback check, host."""
    offline.go_offline()
    bundle = find_bundle(stick)
    trust = signing.check_stick(bundle)  # refused if its signature is bad (unsigned is allowed)
    state = state_dir(bundle)
    rollback.check_bundle(bundle, trust.raw, state)
    return OpenStick(bundle, trust, state, detect())


def model_options(manifest: BundleManifest) -> list[ModelOption]:
    return [ModelOption(m.id, m.name, m.model_facts()) for m in manifest.models]


def model_paths(bundle: BundlePaths, model: ModelEntry) -> list[Path]:
    return [bundle.resolve(p) for p in model.files]


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


def verify_own_libraries(bundle: BundlePaths, manifest: BundleManifest, platform: str) -> None:
    """A frozen runtime on its stick checks its llama.cpp libraries before loading any of them."""
    if not getattr(sys, "frozen", False):
        return
    libs = [f.path for f in manifest.runtime_files(platform) if "/llama_cpp/lib/" in f.path]
    if libs:
        verify_files(bundle, manifest, libs, "the runtime's llama.cpp libraries are damaged")


_prechecked: set[str] = set()  # BLAKE3 of model files whose GGUF header passed the bounded walk


def verify_model(bundle: BundlePaths, manifest: BundleManifest, model: ModelEntry, progress=None) -> None:
    """Hash the model's files, then walk their GGUF headers with kit.ggufmeta's bounded reader:
    a hostile header (absurd counts or lengths) is refused before llama.cpp parses it, here or in
    a probe child. The bytes walked are the bytes just verified (identity check)."""
    verify_files(bundle, manifest, model.files, f"model {model.id} is damaged", progress)
    paths = model_paths(bundle, model)
    hashes = {integrity.require_verified(p) for p in paths}
    if not hashes <= _prechecked:
        from kit.ggufmeta import read_facts

        read_facts(paths)
        for p in paths:
            integrity.require_verified(p)  # not swapped while it was walked
        _prechecked.update(hashes)


def smallest_model(manifest: BundleManifest) -> ModelEntry:
    return min(manifest.models, key=manifest.model_size)


def measured_speed(manifest: BundleManifest, kernel: kernels.KernelChoice) -> CpuSpeed | None:
    """The probe's generation speed with the smallest model: the planner scales it to the others."""
    chosen = next((r for r in kernel.results if r.variant == kernel.chosen), None)
    if chosen is None or not chosen.gen_tps:
        return None
    return CpuSpeed(manifest.model_size(smallest_model(manifest)), chosen.gen_tps)


def choose_kernel(opened: OpenStick, *, refresh: bool = False, on_probe=None,
                  progress=None) -> kernels.KernelChoice:
    """Verify the runtime's own libraries, then probe (or recall) the CPU kernel with the smallest
    model, verified first: the probe children load it."""
    bundle, manifest = opened.bundle, opened.manifest
    verify_own_libraries(bundle, manifest, opened.host.platform)
    probe_model = smallest_model(manifest)
    verify_model(bundle, manifest, probe_model, progress)
    first = bundle.resolve(probe_model.files[0])
    return kernels.choose_kernel(opened.host, first, integrity.require_verified(first), state=opened.state,
                                 saved=bundle.kit / "state", refresh=refresh, on_result=on_probe)


def plan_for(opened: OpenStick, overrides: Overrides, kernel: kernels.KernelChoice | None = None) -> LaunchPlan:
    """The plan; with the kernel's measured speed it skips a model that would answer slower than
    people read. Without a kernel it only checks the overrides (they fail before any probe)."""
    return make_plan(opened.host, opened.options, runtime_backends=ggml.runtime_backends(), overrides=overrides,
                     cpu_variant=kernel.chosen if kernel else None,
                     cpu_speed=measured_speed(opened.manifest, kernel) if kernel else None)


def doctor(stick, overrides: Overrides, *, refresh: bool = False, on_probe=None) -> DoctorReport:
    """Everything `kit doctor` shows: host, kernel probe table, plan (or why none)."""
    opened = open_stick(stick)
    report = DoctorReport(str(opened.bundle.root), opened.trust.signer_label, opened.host,
                          ModelSummary.all_of(opened.manifest), tuple(sorted(ggml.runtime_backends())))
    try:
        report = replace(report, kernel=choose_kernel(opened, refresh=refresh, on_probe=on_probe))
        return replace(report, plan=plan_for(opened, overrides, report.kernel))
    except (KernelError, PlanError, IntegrityError) as err:
        return replace(report, error=f"{err} — {err.hint}")


def start(stick, overrides: Overrides | None = None, *, on_progress=None,
          on_status: Status = lambda s: None) -> Session:
    """Everything up to a loaded, answering model."""
    opened = open_stick(stick)
    manifest = opened.manifest
    overrides = overrides or Overrides()
    plan_for(opened, overrides)  # bad overrides fail fast, before any probe
    on_status("checking the stick's smallest model and choosing the CPU kernel")
    kernel = choose_kernel(opened, progress=on_progress,
                           on_probe=lambda r: on_status(f"probed CPU kernel {r.variant}: {r.state}"))
    plan = plan_for(opened, overrides, kernel)
    model = manifest.model(plan.model_id)
    on_status(f"checking {model.id} against the stick's manifest")
    verify_model(opened.bundle, manifest, model, on_progress)
    engine, plan, steps = load_with_fallback(opened, plan, kernel, on_status, on_progress)
    return Session(opened.bundle, manifest, opened.host, plan, kernel, engine, opened.state, steps,
                   opened.trust.signer_label)


def load_with_fallback(opened: OpenStick, plan: LaunchPlan, kernel: kernels.KernelChoice, on_status: Status,
                       on_progress) -> tuple[ChatEngine, LaunchPlan, list[str]]:
    """Try the plan, then each step of the ladder when a load fails; the user sees steps, never a
    crash. Smaller models on the ladder are verified before they load, like the first choice."""
    from kit.engine import LlamaEngine

    bundle, manifest = opened.bundle, opened.manifest
    backends = ggml.runtime_backends()
    gpu_libs = ggml.gpu_backend_libs() if backends else {}
    attempts = [plan] + fallback_steps(plan, opened.host, opened.options, runtime_backends=backends)
    steps: list[str] = []
    last_error: Exception | None = None
    for attempt in attempts:
        model = manifest.model(attempt.model_id)
        on_status(f"loading {model.name}: {attempt_description(attempt)}")
        if attempt.model_id != plan.model_id:
            verify_model(bundle, manifest, model, on_progress)
        try:
            engine = LlamaEngine.load(
                model_paths(bundle, model), attempt.settings, model_id=model.id,
                chat_format_fallback=model.chat_format, variant=kernel.path,
                gpu_backend=gpu_libs.get(attempt.gpu.backend) if attempt.gpu else None)
            return engine, attempt, steps
        except EngineError as err:
            last_error = err
            step = attempt_description(attempt)
            steps.append(f"{step} failed: {err}")
            on_status(f"could not start {step}: {err}; trying a smaller setting")
    raise EngineError(f"no setting worked on this host; last error: {last_error}")


def attempt_description(plan: LaunchPlan) -> str:
    gpu = f", {plan.gpu_layers} GPU layers" if plan.gpu_layers else ""
    return f"{plan.model_id} at {plan.n_ctx} tokens{gpu}"
