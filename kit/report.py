"""What both shells show: typed reports (doctor, verify, plan) and their one text rendering.

The CLI prints these, `--json` prints their `to_dict()`, and the TUI's hardware screen shows the
same text: one renderer, so a terminal and the chat never disagree. No textual, no llama_cpp.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kit.ftsindex import Hit
from kit.gpuprobe import GpuChoice
from kit.hardware import Host
from kit.htmltext import printable
from kit.integrity import VerifyReport
from kit.kernels import KernelChoice
from kit.knowledge import SourceState
from kit.manifest import BundleManifest
from kit.plan import LaunchPlan, LoadMode
from kit.poolplan import Worker, protocol_text
from kit.serveplan import ServePlan
from kit.units import human_bytes


@dataclass(frozen=True)
class ModelSummary:
    id: str
    name: str
    bytes: int
    quant: str | None
    params: int | None

    @classmethod
    def all_of(cls, manifest: BundleManifest) -> tuple[ModelSummary, ...]:
        return tuple(cls(m.id, m.name, manifest.model_size(m), m.quant, m.params) for m in manifest.models)


@dataclass(frozen=True)
class DoctorReport:
    """Everything `kit doctor` (and the chat's hardware screen) shows: host, kernel probe, plan."""

    stick: str
    signer: str
    host: Host
    models: tuple[ModelSummary, ...]
    runtime_backends: tuple[str, ...] = ()
    kernel: KernelChoice | None = None
    plan: LaunchPlan | None = None
    error: str | None = None  # why there is no plan: the error's sentence and what to do
    fallback_steps: tuple[str, ...] = field(default=())  # taken while starting (the chat only)
    load_mode: LoadMode | None = None  # sealed memory copy or by path, and why (kit.plan.load_mode)
    glibc: tuple[str, str] | None = None  # (the stick's runtime needs, this host has), on Linux
    serve: ServePlan | None = None  # `kit doctor --serve`: llama-server's slots, and why
    pool: tuple[Worker, ...] = ()  # `kit doctor --pool`: the workers as the lead found them
    knowledge: tuple[SourceState, ...] = ()  # the stick's documents and archives, checked or not
    gpu: GpuChoice | None = None  # the GPU probe: each Vulkan device's verdict, and the plan's reason

    def to_dict(self) -> dict:
        data = {"stick": self.stick, "signer": self.signer, "host": self.host.to_dict(),
                "kernel": self.kernel.to_dict() if self.kernel else None,
                "plan": self.plan.to_dict() if self.plan else None,
                "runtime_backends": list(self.runtime_backends),
                "models": [vars(m).copy() for m in self.models],
                "load_mode": self.load_mode.to_dict() if self.load_mode else None,
                "glibc": {"runtime_needs": self.glibc[0], "host_has": self.glibc[1]} if self.glibc else None}
        if self.serve:
            data["serve"] = self.serve.to_dict()
        if self.pool:
            data["pool"] = [{"endpoint": w.endpoint, **asdict(w.facts)} for w in self.pool]
        data["gpu_probe"] = self.gpu.to_dict() if self.gpu else None
        data["knowledge"] = [s.to_dict() for s in self.knowledge]
        if self.error:
            data["error"] = self.error
        return data


def render_doctor(report: DoctorReport) -> str:
    host = report.host
    out = [f"Stick: {report.stick}",
           f"Host: {host.os}-{host.arch}, {host.cpu_name}",
           f"      {host.physical_cores} cores ({host.logical_cores} threads), "
           f"RAM {human_bytes(host.ram_total)} total, {human_bytes(host.ram_available)} available"
           + (f", limit {human_bytes(host.memory_limit)}" if host.memory_limit else "")]
    for g in host.gpus:
        vram = human_bytes(g.vram_total) if g.vram_total else "unknown"
        out.append(f"      GPU: {g.name} ({g.backend}, {vram})")
    if not host.gpus:
        out.append(f"      GPU: {host.gpu_note or 'none found'}")
    for note in host.notes:
        out.append(f"      note: {note}")
    if report.glibc:
        out.append(f"      glibc: {report.glibc[1]}; this stick's runtime needs {report.glibc[0]} or newer")
    kernel = report.kernel
    if kernel:
        out.append("")
        out.append(f"CPU kernels ({'cached verdict' if kernel.cached else 'probed now'}):")
        out.append(f"  {'variant':16} {'state':8} {'prompt tok/s':>12} {'gen tok/s':>10}  detail")
        for r in sorted(kernel.results, key=lambda r: (r.state != "ok", r.seconds or 0)):
            mark = "*" if r.variant == kernel.chosen else " "
            pp = f"{r.prompt_tps:.0f}" if r.prompt_tps else "-"
            tg = f"{r.gen_tps:.1f}" if r.gen_tps else "-"
            out.append(f"{mark} {r.variant:16} {r.state:8} {pp:>12} {tg:>10}  {r.detail}")
        out.append(f"  chosen: {kernel.chosen}")
    if report.gpu and report.gpu.backend:
        out += ["", *render_gpu_probe(report.gpu)]
    out.append("")
    if report.plan:
        out.append(render_plan(report.plan))
    if report.serve:
        out.append(render_serve_plan(report.serve))
    for w in report.pool:
        f = w.facts
        out.append(f"  pool worker {w.endpoint}: offers {human_bytes(f.memory)}, {f.threads} threads, "
                   f"kernel {f.kernel}, kit {f.kit}, RPC protocol {protocol_text(f.protocol)}")
    if report.load_mode:
        out.append(f"  load: {report.load_mode.mode}: {report.load_mode.reason}")
    if report.error:
        out.append(f"No plan: {report.error}")
    if report.knowledge:
        out += ["", "Knowledge:", *(render_source_state(s) for s in report.knowledge)]
    return "\n".join(out)


def render_gpu_probe(gpu: GpuChoice) -> list[str]:
    out = [f"GPUs through {gpu.backend} ({'cached verdict' if gpu.cached else 'probed now'}):"]
    if gpu.results:
        out.append(f"  {'device':34} {'state':8} {'prompt tok/s':>12} {'gen tok/s':>10}  CPU gen tok/s  detail")
    for r in gpu.results:
        mark = "*" if r.index == gpu.chosen else " "
        pp = f"{r.prompt_tps:.0f}" if r.prompt_tps else "-"
        tg = f"{r.gen_tps:.1f}" if r.gen_tps else "-"
        cpu = f"{r.cpu_gen_tps:.1f}" if r.cpu_gen_tps else "-"
        out.append(f"{mark} {r.name[:34]:34} {r.state:8} {pp:>12} {tg:>10}  {cpu:>13}  {r.detail}")
    out.append(f"  {gpu.reason}")
    return out


def render_source_state(s: SourceState) -> str:
    unit = "passages" if s.kind == "docs" else "articles"
    state = f"{s.state}: {s.detail}" if s.detail else s.state
    return f"  {s.id:16} {s.name} ({s.kind}, {s.count} {unit}, {human_bytes(s.size)}): {state}"


def render_search(query: str, hits: list[Hit], states: list[SourceState]) -> str:
    """`kit search`: each passage with its citation, then any source that could not be used."""
    out = []
    for i, hit in enumerate(hits, 1):
        text = printable(hit.passage.text)
        text = text if len(text) <= 600 else text[:600].rsplit(" ", 1)[0] + " …"
        out += [f"[{i}] {hit.passage.citation()}", *("    " + line for line in text.splitlines()), ""]
    if not hits:
        out.append(f"Nothing on this stick matches {query!r}.")
    out += [s.line() for s in states if s.state != "verified"]
    return "\n".join(out).rstrip()


def render_serve_plan(plan: ServePlan) -> str:
    out = [f"Serve: {plan.slots} slot{'s' if plan.slots > 1 else ''} of {plan.slot_ctx} tokens "
           f"(llama-server context {plan.total_ctx}), {human_bytes(plan.estimate.ram)} RAM"]
    out += [f"  {d.topic}: {d.reason}" for d in plan.decisions]
    return "\n".join(out)


def render_plan(plan: LaunchPlan) -> str:
    out = [f"Plan: model {plan.model_id}, context {plan.n_ctx}, {plan.threads} threads, "
           f"{plan.gpu_layers} GPU layers, CPU kernel {plan.cpu_variant or '-'}"]
    for v in plan.verdicts:
        out.append(f"  model {v.model_id}: {v.reason}")
    for d in plan.decisions:
        out.append(f"  {d.topic}: {d.reason}")
    return "\n".join(out)


def render_verify(report: VerifyReport) -> str:
    lines = [f"  {f.state.upper():10} {f.path}: {f.detail}" for f in report.files if f.state != "ok"]
    c = report.counts()
    rate = report.bytes_hashed / report.seconds if report.seconds else 0
    summary = (f"{c['ok']} files ok, {c['corrupt']} corrupt, {c['missing']} missing, "
               f"{c['unexpected']} unexpected ({human_bytes(report.bytes_hashed)} in "
               f"{report.seconds:.1f} s, {human_bytes(rate)}/s)")
    verdict = "The stick is intact." if report.ok else \
        "The stick is damaged: do not trust the files above. Copy it again from a good stick."
    return "\n".join([*lines, summary, verdict])


def render_signer(signer: str | None, *, required: bool = False) -> str:
    if signer is None:
        return "Signature: unsigned (anyone who could write to the stick could have changed it and its manifest)"
    match = " — the key you gave" if required else "; compare this fingerprint with the one its maker gave you"
    return f"Signature: good, signed by {signer}{match}"
