"""GPUs through Vulkan: which devices really work with the model, and whether they beat the CPU.

Probed like the CPU kernels (kit.kernels), in child processes where a driver that crashes or hangs
costs nothing: one child lists the Vulkan devices; then, per device, a child times the smallest
model on the chosen CPU kernel, then with every layer on that device, and compares their first
greedy tokens. A device that crashes, hangs, fails to load the model or answers differently is
never loaded in the user's process; one that works but generates slower than the CPU kernel is
declined (`--gpu-layers` can still force it). Verdicts are cached per device, driver and model.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from kit.errors import KitError
from kit.hardware import Gpu, Host
from kit.htmltext import printable
from kit.kernels import (
    KernelChoice,
    answer_line,
    kit_command,
    protocol_out,
    read_verdicts,
    signal_name,
    spawn,
    write_verdicts,
)
from kit.vulkan import VulkanError

__all__ = ["BACKEND", "DeviceResult", "GpuChoice", "VulkanError", "choose_gpu", "select_device"]

BACKEND = "vulkan"
LIST_TIMEOUT_S = 30
# lavapipe compiles its compute pipelines on first use: tens of seconds on 2 cores
PROBE_TIMEOUT_S = 240
PROMPT_TOKENS, GEN_TOKENS, ROUNDS = 32, 8, 2
MATCH_TOKENS = GEN_TOKENS  # the first greedy tokens, which must be the CPU's
DECISIVE = 2.0  # a first timed round this many times the CPU's: no second round
ALL_LAYERS = 999  # llama.cpp clamps n_gpu_layers to the model's layers + output
VERDICTS = "gpu-probe.json"
CACHE_FORMAT = "gpu-v1"
VISIBLE_DEVICES = "GGML_VK_VISIBLE_DEVICES"  # ggml-vulkan's device filter: the index the kit chose
# A software device (Mesa's lavapipe: Vulkan on the CPU) is on most Linux desktops and always
# slower than the CPU kernel it competes with; probing it would cost every new laptop its first
# answer's time. It is probed when GPU layers are forced, or with KIT_GPU_PROBE=all (tests, bench).
PROBE_ALL = "KIT_GPU_PROBE"
SOFTWARE_SKIPPED = ("a software Vulkan device (it runs on the CPU, slower than the CPU kernel): not probed; "
                    "--gpu-layers or KIT_GPU_PROBE=all probes it")


@dataclass(frozen=True)
class DeviceResult:
    index: int  # the Vulkan loader's numbering (VISIBLE_DEVICES)
    name: str
    kind: str  # kit.vulkan.DEVICE_TYPES: "discrete", "integrated", "cpu" (a software device) ...
    vendor: str
    driver: str
    state: str  # "ok" | "crashed" | "failed" | "mismatch" | "skipped"
    detail: str = ""
    memory_total: int | None = None  # what ggml's Vulkan backend reports, bytes
    memory_free: int | None = None
    prompt_tps: float | None = None
    gen_tps: float | None = None
    cpu_prompt_tps: float | None = None  # the CPU kernel's, measured in the same child just before
    cpu_gen_tps: float | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    @property
    def faster(self) -> bool:
        """Generation is what a reader waits for: the device must beat the CPU kernel at it."""
        return self.ok and bool(self.gen_tps and self.cpu_gen_tps and self.gen_tps > self.cpu_gen_tps)

    @property
    def speed_text(self) -> str:
        return (f"{self.gen_tps:.1f} tok/s generation through Vulkan vs the CPU kernel's "
                f"{self.cpu_gen_tps:.1f}")

    @property
    def why_not(self) -> str:
        """Why the plan does not choose it by itself."""
        if self.state == "crashed":
            return f"{self.name}: its driver crashed in the probe ({self.detail})"
        if self.state != "ok":  # mismatch, failed, skipped: the detail says it
            return f"{self.name}: {self.detail}"
        return f"{self.name}: {self.speed_text}, slower than the CPU"


@dataclass(frozen=True)
class GpuChoice:
    """The GPU probe's outcome: every device's result, the one chosen (a Vulkan index) and why."""

    results: tuple[DeviceResult, ...] = ()
    chosen: int | None = None
    reason: str = ""
    cached: bool = False
    backend: str | None = BACKEND  # None: the runtime carries no GPU backend

    def gpus(self, forced: bool = False) -> tuple[Gpu, ...]:
        """The one device the plan may use, as a kit.hardware Gpu: the chosen one; with `forced`
        (--gpu-layers) the fastest that works when none was chosen, even one slower than the CPU.
        Broken devices never. Its memory is the total the probe read, not the free memory then
        (another program may hold some now): the plan keeps its margin of it."""
        working = [r for r in self.results if r.ok]
        pick = next((r for r in working if r.index == self.chosen), None)
        if pick is None and forced and working:
            pick = max(working, key=lambda r: r.gen_tps or 0)
        if pick is None:
            return ()
        return (Gpu(vendor=pick.vendor, name=pick.name, backend=BACKEND, vram_total=pick.memory_total,
                    unified_memory=pick.kind in ("integrated", "cpu"), driver=pick.driver, device_index=pick.index),)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "chosen": self.chosen, "reason": self.reason, "cached": self.cached,
                "results": [asdict(r) for r in self.results]}


def decide(results: list[DeviceResult]) -> tuple[int | None, str]:
    """The fastest device that works and beats the CPU kernel, and the plan's sentence for it."""
    faster = [r for r in results if r.faster]
    if faster:
        best = max(faster, key=lambda r: r.gen_tps)
        return best.index, f"{best.name}: {best.speed_text}"
    if not results:
        return None, "no GPU backend usable: Vulkan lists no device on this host"
    return None, "no GPU backend usable: " + "; ".join(r.why_not for r in results)


# ---------------------------------------------------------------- the children (`kit _gpu-probe`)

def list_child(carried_loader: Path | None) -> int:
    """`kit _gpu-probe --list`: one line, {"devices": [...]} or {"error": sentence}."""
    from kit import offline, vulkan

    offline.go_offline()
    out = protocol_out()
    try:
        devices = vulkan.list_devices(vulkan.open_loader(carried_loader))
        answer = {"devices": [{**asdict(d), "vendor": d.vendor, "driver": d.driver_text} for d in devices]}
    except vulkan.VulkanError as err:
        answer = {"error": str(err)}
    print(json.dumps(answer), file=out, flush=True)
    return 0


def device_child(index: int, kernel: Path, backend: Path, carried_loader: Path | None, model: Path,
                 blake3: str, threads: int) -> int:
    """`kit _gpu-probe --device N`: the CPU kernel's figures and tokens, then the device's; one line."""
    from kit import offline

    offline.go_offline()
    return answer_line(protocol_out(),
                       lambda: _measure_device(index, kernel, backend, carried_loader, model, blake3, threads))


def _measure_device(index: int, kernel: Path, backend: Path, carried_loader: Path | None, model: Path,
                    blake3: str, threads: int) -> dict:
    from kit import engine, ggml, integrity
    from kit.settings import EngineSettings

    if not integrity.verify_file(model, blake3):
        raise KitError("model bytes do not match the manifest")
    settings = EngineSettings(n_ctx=engine.bench_context(PROMPT_TOKENS, GEN_TOKENS), threads=threads,
                              n_batch=PROMPT_TOKENS)
    engine.ensure_backend(kernel)
    cpu = _timed(model, settings)  # before the Vulkan backend exists in this process: the CPU alone
    select_device(index, carried_loader)
    try:
        engine.ensure_backend(backend)
    except KitError:
        raise KitError("ggml's Vulkan backend did not load with this host's Vulkan loader") from None
    devices = ggml.gpu_devices()
    if not devices:
        raise KitError("ggml's Vulkan backend does not support this device")
    gpu = _timed(model, settings.with_(gpu_layers=ALL_LAYERS), against=cpu)
    return {"cpu": cpu, "gpu": gpu, "memory_free": devices[0].free, "memory_total": devices[0].total}


def _timed(model: Path, settings, against: dict | None = None) -> dict:
    """Load, one untimed round (first-use costs: buffers, a driver's pipeline compiles; its greedy
    tokens are every round's), then up to ROUNDS timed ones, each figure the best seen. A device
    whose first timed round is DECISIVE times slower than `against` (the CPU's) gets no second."""
    from kit import engine

    bench = engine.BenchModel.load(model, settings, prompt_tokens=PROMPT_TOKENS)
    try:
        bench.round(GEN_TOKENS)
        tokens = list(bench.generated)
        rounds = [bench.round(GEN_TOKENS)]
        while len(rounds) < ROUNDS and not (against and sum(rounds[0]) > DECISIVE * against["seconds"]):
            rounds.append(bench.round(GEN_TOKENS))
    finally:
        bench.llm.close()
    prompt_s, gen_s = min(r[0] for r in rounds), min(r[1] for r in rounds)
    return {"prompt_tps": len(bench.tokens) / prompt_s, "gen_tps": GEN_TOKENS / gen_s, "seconds": prompt_s + gen_s,
            "tokens": tokens}


def select_device(index: int, carried_loader: Path | None) -> None:
    """Before ggml's Vulkan backend loads: only device `index`, and a Vulkan loader to bind to (the
    host's, else the runtime's own). In the user's process too: the device the probe vetted."""
    from kit import vulkan

    os.environ[VISIBLE_DEVICES] = str(index)
    vulkan.open_loader(carried_loader)


# ---------------------------------------------------------------- driving the children

def _run_child(command: list[str], timeout: float) -> tuple[dict | None, str]:
    """The child's one answer line, or None and what went wrong ("crashed: SIGSEGV", ...)."""
    proc = spawn(command)
    try:
        out, _ = proc.communicate("", timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, f"failed: no answer within {timeout:.0f} s (a hung driver)"
    if proc.returncode < 0:
        return None, f"crashed: {signal_name(proc.returncode)}"
    lines = out.strip().splitlines()
    try:
        answer = json.loads(lines[0]) if len(lines) == 1 else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        return None, f"failed: the probe gave no result line (exit code {proc.returncode})"
    return answer, ""


def list_devices(carried_loader: Path | None) -> tuple[list[dict], str]:
    args = ["--list"] + (["--loader", str(carried_loader)] if carried_loader else [])
    answer, problem = _run_child(kit_command("_gpu-probe", *args), LIST_TIMEOUT_S)
    if answer is None:
        return [], f"listing Vulkan devices {problem}"
    if "error" in answer:
        return [], str(answer["error"])
    devices = answer.get("devices")
    if not isinstance(devices, list) or not all(isinstance(d, dict) and {"index", "name", "kind", "vendor", "driver"}
                                                <= d.keys() for d in devices):
        return [], "listing Vulkan devices failed: a malformed answer"
    for d in devices:  # a driver's words reach the terminal: no control characters, a sane length
        d["name"], d["driver"] = printable(str(d["name"]))[:80], printable(str(d["driver"]))[:40]
    return devices, ""


def probe_device(device: dict, kernel: KernelChoice, backend: Path, carried_loader: Path | None, model: Path,
                 blake3: str, threads: int, timeout: float = PROBE_TIMEOUT_S) -> DeviceResult:
    base = DeviceResult(int(device["index"]), str(device["name"]), str(device["kind"]), str(device["vendor"]),
                        str(device["driver"]), "failed")
    args = ["--device", str(base.index), "--kernel", str(kernel.path), "--backend", str(backend),
            "--model", str(model), "--blake3", blake3, "--threads", str(threads)]
    answer, problem = _run_child(
        kit_command("_gpu-probe", *args, *(["--loader", str(carried_loader)] if carried_loader else [])), timeout)
    if answer is None:
        state, _, detail = problem.partition(": ")
        return replace(base, state=state, detail=detail)
    if "error" in answer:
        return replace(base, detail=str(answer["error"])[:200])
    try:
        cpu, gpu = answer["cpu"], answer["gpu"]
        figures = {"memory_total": int(answer["memory_total"]), "memory_free": int(answer["memory_free"]),
                   "prompt_tps": float(gpu["prompt_tps"]), "gen_tps": float(gpu["gen_tps"]),
                   "cpu_prompt_tps": float(cpu["prompt_tps"]), "cpu_gen_tps": float(cpu["gen_tps"])}
        same = list(gpu["tokens"][:MATCH_TOKENS]) == list(cpu["tokens"][:MATCH_TOKENS])
    except (KeyError, TypeError, ValueError):
        return replace(base, detail="a malformed probe answer")
    if not same:
        return replace(base, state="mismatch", **figures,
                       detail=f"its first {MATCH_TOKENS} greedy tokens differ from the CPU kernel's")
    lie = memory_lie(figures["memory_free"], figures["memory_total"])
    if lie:
        return replace(base, state="failed", **figures, detail=lie)
    return replace(base, state="ok", **figures)


MAX_DEVICE_MEMORY = 1 << 40  # 1 TiB: no GPU a stick meets has more; a driver that says so is wrong


def memory_lie(free: int, total: int) -> str | None:
    """Why the memory a driver reports cannot be true, or None: the plan sizes layers by it."""
    if total <= 0 or free < 0 or free > total or total > MAX_DEVICE_MEMORY:
        return f"its driver reports impossible memory ({free} bytes free of {total}): not trusted"
    return None


_RESULT_FIELDS = {f.name for f in fields(DeviceResult)}
_STATES = {"ok", "crashed", "failed", "mismatch"}
_FIGURES = ("prompt_tps", "gen_tps", "cpu_prompt_tps", "cpu_gen_tps", "memory_total", "memory_free")


def cached_result(entry, device: dict) -> DeviceResult | None:
    """A cached verdict for `device`, checked as a probe's answer is (state/ is not signed: a
    damaged or planted file must not get a device loaded unprobed); None: probe it again."""
    if not isinstance(entry, dict) or not _RESULT_FIELDS <= entry.keys():
        return None
    if entry["state"] not in _STATES or entry["index"] != device["index"] or entry["name"] != device["name"]:
        return None
    if not all(entry[k] is None or (isinstance(entry[k], (int, float)) and not isinstance(entry[k], bool)
                                    and entry[k] >= 0) for k in _FIGURES):
        return None
    if entry["state"] == "ok" and (not all(entry[k] for k in _FIGURES if k != "memory_free")
                                   or memory_lie(entry["memory_free"] or 0, entry["memory_total"])):
        return None
    texts = {k: printable(str(entry[k]))[:200] for k in ("kind", "vendor", "driver", "detail")}
    return DeviceResult(**{**{k: entry[k] for k in _RESULT_FIELDS}, **texts, "name": device["name"]})


def _cache_key(host: Host, device: dict, kernel: KernelChoice, backend: Path, blake3: str) -> str:
    try:
        size = backend.stat().st_size  # another runtime's backend: probed again
    except OSError:
        size = 0
    # the index too: two identical cards would otherwise share (and overwrite) one verdict
    return "|".join(map(str, (CACHE_FORMAT, host.cpu_signature(), kernel.chosen, size, blake3, device["index"],
                              device["name"], device.get("vendor_id"), device.get("device_id"),
                              device.get("driver_version"), device.get("api_version"))))


def probe_all_asked() -> bool:
    return os.environ.get(PROBE_ALL, "").lower() == "all"


def choose_gpu(host: Host, kernel: KernelChoice, model: Path, blake3: str, *, state: Path | None,
               saved: Path | None = None, backend: Path | None, carried_loader: Path | None = None,
               refresh: bool = False, on_result=None, probe_software: bool = False) -> GpuChoice:
    """Which GPU the plan may use: the runtime's Vulkan backend on each device the host lists,
    from the cache for that device and driver, else probed."""
    if backend is None:
        return GpuChoice(reason="this runtime carries no GPU backend: CPU only", backend=None)
    devices, problem = list_devices(carried_loader)
    if problem:
        return GpuChoice(reason=f"no GPU backend usable: {problem}")
    cache = read_verdicts(state, saved, VERDICTS)
    threads = max(1, host.physical_cores)
    results, all_cached, changed, probed = [], True, False, 0
    for device in devices:
        if device.get("kind") == "cpu" and not probe_software:
            results.append(DeviceResult(int(device["index"]), str(device["name"]), "cpu", str(device["vendor"]),
                                        str(device["driver"]), "skipped", SOFTWARE_SKIPPED))
            continue
        probed += 1
        key = _cache_key(host, device, kernel, backend, blake3)
        result = None if refresh else cached_result(cache.get(key), device)
        if result is None:
            all_cached = False
            result = probe_device(device, kernel, backend, carried_loader, model, blake3, threads)
            cache[key] = {**asdict(result), "probed_at": time.time()}
            changed = True
        results.append(result)
        if on_result:
            on_result(result)
    if changed:
        write_verdicts(state, cache, VERDICTS)
    chosen, reason = decide(results)
    return GpuChoice(tuple(results), chosen, reason, cached=all_cached and probed > 0)


def probe_child_main(args) -> int:
    """`kit _gpu-probe`'s body (kit.cli)."""
    loader = Path(args.loader) if args.loader else None
    if args.list:
        return list_child(loader)
    return device_child(args.device, Path(args.kernel), Path(args.backend), loader, Path(args.model), args.blake3,
                        args.threads)

