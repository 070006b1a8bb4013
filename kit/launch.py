"""Starting the model on a stick: the steps every front end shares (ask, chat, doctor).

Order: offline gate → stick and manifest (signature checked on the raw bytes before parsing,
then the rollback check) → host → plan (from the manifest's facts, no model parsed yet) → verify
the chosen model's bytes and walk its GGUF header with kit.ggufmeta's bounded reader → choose the
CPU kernel (probe in children) → load, stepping down the fallback ladder if loading or the first
decode fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kit import integrity, kernels, offline, rollback, signing
from kit.errors import EngineError, IntegrityError, KernelError, PlanError
from kit.hardware import Host, detect
from kit.manifest import BundleManifest, ModelEntry
from kit.paths import BundlePaths, find_bundle, state_dir
from kit.plan import CpuSpeed, LaunchPlan, ModelOption, Overrides, fallback_steps, make_plan

Status = Callable[[str], None]


@dataclass
class Session:
    bundle: BundlePaths
    manifest: BundleManifest
    host: Host
    plan: LaunchPlan
    kernel: kernels.KernelChoice
    engine: object  # kit.engine.ChatEngine
    state: Path | None
    steps: list[str] = field(default_factory=list)  # fallback steps taken, in words
    signer: str = "unsigned"  # the signer's fingerprint (kit.signing), or "unsigned"

    @property
    def model(self) -> ModelEntry:
        return self.manifest.model(self.plan.model_id)

    def messages(self, question: str, *, preset: str | None = None,
                 history: Sequence[dict] = ()) -> list[dict]:
        msgs: list[dict] = []
        if preset:
            chosen = next((p for p in self.manifest.presets if p.id == preset), None)
            if chosen is None:
                raise PlanError(f"this stick has no preset {preset!r}",
                                f"presets: {', '.join(p.id for p in self.manifest.presets) or 'none'}")
            msgs.append({"role": "system", "content": chosen.system})
        return msgs + list(history) + [{"role": "user", "content": question}]


def open_stick(stick: str | Path | None) -> tuple[BundlePaths, BundleManifest]:
    bundle, trust = open_trusted(stick)
    return bundle, trust.manifest


def open_trusted(stick: str | Path | None) -> tuple[BundlePaths, signing.Trust]:
    """The stick and its manifest, refused if its signature is bad (an unsigned stick is allowed)."""
    bundle = find_bundle(stick)
    return bundle, signing.check_stick(bundle)


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


def choose_cpu_kernel(bundle, manifest, host, state, *, refresh=False, on_probe=None,
                      progress=None) -> kernels.KernelChoice:
    """Probe with the smallest model (verified first: the probe child loads it)."""
    probe_model = smallest_model(manifest)
    verify_model(bundle, manifest, probe_model, progress)
    first = bundle.resolve(probe_model.files[0])
    return kernels.choose_kernel(host, first, integrity.require_verified(first), state=state,
                                 saved=bundle.kit / "state", refresh=refresh, on_result=on_probe)


def measured_speed(manifest: BundleManifest, kernel: kernels.KernelChoice) -> CpuSpeed | None:
    """The probe's generation speed with the smallest model: the planner scales it to the others."""
    chosen = next((r for r in kernel.results if r.variant == kernel.chosen), None)
    if chosen is None or not chosen.gen_tps:
        return None
    return CpuSpeed(manifest.model_size(smallest_model(manifest)), chosen.gen_tps)


def runtime_backends() -> frozenset[str]:
    try:
        return frozenset(kernels.gpu_backend_libs())
    except KernelError:
        return frozenset()


def doctor(stick, overrides: Overrides, *, refresh: bool = False, on_probe=None) -> dict:
    """Everything `kit doctor` shows, as data: host, kernel probe table, plan (or why none)."""
    offline.go_offline()
    bundle, trust = open_trusted(stick)
    manifest, state = trust.manifest, state_dir(bundle)
    rollback.check_bundle(bundle, trust.raw, state)
    host = detect()
    report: dict = {"stick": str(bundle.root), "signer": trust.signer_label,
                    "host": host.to_dict(), "kernel": None, "plan": None,
                    "runtime_backends": sorted(runtime_backends()),
                    "models": [{"id": m.id, "name": m.name, "bytes": manifest.model_size(m),
                                "quant": m.quant, "params": m.params} for m in manifest.models]}
    try:
        verify_own_libraries(bundle, manifest, host.platform)
        kernel = choose_cpu_kernel(bundle, manifest, host, state, refresh=refresh,
                                   on_probe=on_probe)
        report["kernel"] = kernel.to_dict()
        plan = make_plan(host, model_options(manifest), runtime_backends=runtime_backends(),
                         cpu_variant=kernel.chosen, overrides=overrides,
                         cpu_speed=measured_speed(manifest, kernel))
        report["plan"] = plan.to_dict()
    except (KernelError, PlanError, IntegrityError) as err:
        report["error"] = f"{err} — {err.hint}"
    return report


def start(stick, overrides: Overrides | None = None, *, on_progress=None,
          on_status: Status = lambda s: None) -> Session:
    """Everything up to a loaded, answering model."""
    offline.go_offline()
    bundle, trust = open_trusted(stick)
    manifest, state = trust.manifest, state_dir(bundle)
    rollback.check_bundle(bundle, trust.raw, state)
    host = detect()
    verify_own_libraries(bundle, manifest, host.platform)
    options = model_options(manifest)
    backends = runtime_backends()
    overrides = overrides or Overrides()
    make_plan(host, options, runtime_backends=backends, overrides=overrides)  # bad overrides fail fast
    on_status("checking the stick's smallest model and choosing the CPU kernel")
    kernel = choose_cpu_kernel(bundle, manifest, host, state, progress=on_progress,
                               on_probe=lambda r: on_status(f"probed CPU kernel {r.variant}: {r.state}"))
    # The probe's measured speed lets the plan skip a model that would answer slower than people read.
    plan = make_plan(host, options, runtime_backends=backends, overrides=overrides, cpu_variant=kernel.chosen,
                     cpu_speed=measured_speed(manifest, kernel))
    model = manifest.model(plan.model_id)
    on_status(f"checking {model.id} against the stick's manifest")
    verify_model(bundle, manifest, model, on_progress)
    engine, plan, steps = load_with_fallback(bundle, manifest, host, plan, options, backends,
                                             kernel, on_status, on_progress)
    return Session(bundle, manifest, host, plan, kernel, engine, state, steps, trust.signer_label)


def load_with_fallback(bundle, manifest, host, plan, options, backends, kernel, on_status,
                       on_progress):
    """Try the plan, then each step of the ladder; the user sees steps, never a crash.

    Smaller models on the ladder are verified before they load, like the first choice."""
    from kit.engine import LlamaEngine

    gpu_libs = kernels.gpu_backend_libs() if backends else {}
    attempts = [plan] + fallback_steps(plan, host, options, runtime_backends=backends)
    steps: list[str] = []
    last_error: Exception | None = None
    for attempt in attempts:
        model = manifest.model(attempt.model_id)
        on_status(f"loading {model.name}: {attempt_description(attempt)}")
        if attempt.model_id != plan.model_id:
            verify_model(bundle, manifest, model, on_progress)
        try:
            engine = LlamaEngine.load(
                model_paths(bundle, model), model_id=model.id, n_ctx=attempt.n_ctx,
                threads=attempt.threads, gpu_layers=attempt.gpu_layers,
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
