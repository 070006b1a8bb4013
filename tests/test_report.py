"""kit.report: the typed doctor report, its --json shape and its one text rendering."""

from __future__ import annotations

from kit.hardware import Gpu, Host
from kit.kernels import KernelChoice, ProbeResult
from kit.plan import BY_PATH, SEALED, LoadMode
from kit.report import DoctorReport, ModelSummary, render_doctor
from kit.units import GiB, MiB

HOST = Host(os="linux", arch="x86_64", cpu_name="Test CPU", physical_cores=4, logical_cores=8,
            ram_total=16 * GiB, ram_available=int(7.5 * GiB), memory_limit=12 * GiB,
            gpus=(Gpu("nvidia", "RTX Test", "cuda", vram_total=8 * GiB),), notes=("cpuinfo unreadable",))
KERNEL = KernelChoice("haswell", None, (ProbeResult("haswell", "ok", "", 500.0, 40.0, 0.5),
                                        ProbeResult("zen4", "crashed", "SIGILL")), cached=False)


def report(**changes) -> DoctorReport:
    models = (ModelSummary("m", "Model", 250 * MiB, "Q4_K_M", 270_000_000),)
    base = DoctorReport("/media/stick", "unsigned", HOST, models, ("cuda",), KERNEL)
    return DoctorReport(**{**vars(base), **changes})


def test_doctor_text_uses_one_unit_for_every_size():
    text = render_doctor(report(error="no model fits — free memory"))
    assert "RAM 16.0 GiB total, 7.5 GiB available, limit 12.0 GiB" in text
    assert "GPU: RTX Test (cuda, 8.0 GiB)" in text and "note: cpuinfo unreadable" in text
    assert "* haswell" in text and "  zen4" in text and "crashed" in text and "chosen: haswell" in text
    assert text.endswith("No plan: no model fits — free memory")
    assert " GB" not in text and " MB" not in text


def test_doctor_json_keeps_its_keys():
    data = report().to_dict()
    assert set(data) == {"stick", "signer", "host", "kernel", "plan", "runtime_backends", "models", "load_mode",
                         "glibc", "knowledge", "gpu_probe"}
    assert data["models"] == [{"id": "m", "name": "Model", "bytes": 250 * MiB, "quant": "Q4_K_M",
                               "params": 270_000_000}]
    assert data["kernel"]["chosen"] == "haswell" and data["plan"] is None
    assert report(error="why").to_dict()["error"] == "why"
    assert data["load_mode"] is None  # doctor found no plan: no load mode either


def test_doctor_says_how_the_model_is_loaded_and_why():
    mode = LoadMode(SEALED, "copied into sealed memory as it is checked")
    assert report(load_mode=mode).to_dict()["load_mode"] == {"mode": "sealed",
                                                             "reason": "copied into sealed memory as it is checked"}
    text = render_doctor(report(load_mode=LoadMode(BY_PATH, "memfd is Linux-only (this is darwin): by path")))
    assert "load: path: memfd is Linux-only (this is darwin): by path" in text


def test_doctor_shows_the_glibc_the_runtime_needs_beside_the_hosts():
    text = render_doctor(report(glibc=("2.31", "2.36")))
    assert "glibc: 2.36; this stick's runtime needs 2.31 or newer" in text
    assert report(glibc=("2.31", "2.36")).to_dict()["glibc"] == {"runtime_needs": "2.31", "host_has": "2.36"}
    assert "glibc" not in render_doctor(report())  # not Linux, or no runtime for this host
