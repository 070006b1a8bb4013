"""The GPU room (issue 17): Vulkan devices listed by the loader, probed against the CPU kernel in a
child, declined when slower, forced with --gpu-layers, and a host without Vulkan runs on the CPU.

The device is real: Mesa's lavapipe (`mesa-vulkan-drivers`), a software Vulkan device on the CPU,
driven by the runtime's own libggml-vulkan through the host's loader (or the runtime's own).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import servekit
from conftest import apt_install, run_kit

from kit import ggml
from kit.ggufmeta import read_facts
from kit.gpuprobe import DeviceResult, GpuChoice, _cache_key, _run_child, cached_result, decide, memory_lie
from kit.hardware import Host
from kit.plan import ModelOption, Overrides, make_plan

LAVAPIPE_PACKAGES = ("mesa-vulkan-drivers", "libvulkan1")


def result(index=0, name="Radeon 780M", state="ok", gen=40.0, cpu=20.0, kind="integrated") -> DeviceResult:
    return DeviceResult(index, name, kind, "amd", "2.0.0", state, "" if state == "ok" else "why",
                        memory_total=4 << 30, memory_free=3 << 30, prompt_tps=300.0, gen_tps=gen,
                        cpu_prompt_tps=100.0, cpu_gen_tps=cpu)


# ---------------------------------------------------------------- the decision (pure)

def test_the_fastest_device_that_beats_the_cpu_is_chosen():
    chosen, reason = decide([result(0, "slow iGPU", gen=15.0), result(1, "dGPU", gen=90.0),
                             result(2, "dGPU 2", gen=60.0)])
    assert chosen == 1 and reason.startswith("dGPU: 90.0 tok/s generation through Vulkan")


def test_a_device_slower_than_the_cpu_is_declined_with_its_figures():
    chosen, reason = decide([result(0, "llvmpipe", gen=1.3, cpu=60.0, kind="cpu")])
    assert chosen is None
    assert reason == ("no GPU backend usable: llvmpipe: 1.3 tok/s generation through Vulkan vs the CPU kernel's "
                      "60.0, slower than the CPU")


def test_broken_devices_are_never_offered_even_when_forced():
    results = (result(0, "crashy", state="crashed"), result(1, "liar", state="mismatch"), result(2, "slow", gen=5.0))
    choice = GpuChoice(results, *decide(list(results)))
    assert choice.chosen is None and choice.gpus() == ()
    forced = choice.gpus(forced=True)
    assert [g.name for g in forced] == ["slow"] and forced[0].device_index == 2 and forced[0].backend == "vulkan"
    assert "crashy: its driver crashed in the probe" in choice.reason and "liar: why" in choice.reason


@pytest.mark.parametrize(("free", "total"), [(0, 0), (5 << 30, 4 << 30), (-1, 4 << 30), (1 << 41, 1 << 42)])
def test_a_driver_that_lies_about_memory_is_not_trusted(free, total):
    assert "impossible memory" in memory_lie(free, total)
    assert memory_lie(3 << 30, 4 << 30) is None


def test_forced_layers_take_the_chosen_device_else_the_fastest_working_one_never_the_biggest():
    big_slow = replace(result(0, "llvmpipe", gen=1.5, kind="cpu"), memory_total=30 << 30)
    fast = replace(result(1, "RTX", gen=200.0, kind="discrete"), memory_total=11 << 30)
    choice = GpuChoice((big_slow, fast), *decide([big_slow, fast]))
    assert [g.name for g in choice.gpus()] == ["RTX"] and [g.name for g in choice.gpus(forced=True)] == ["RTX"]
    slow_only = GpuChoice((big_slow, replace(fast, gen_tps=2.0, cpu_gen_tps=90.0)))
    assert slow_only.gpus() == () and [g.name for g in slow_only.gpus(forced=True)] == ["RTX"]
    (gpu,) = slow_only.gpus(forced=True)
    assert gpu.vram_free is None and gpu.vram_total == 11 << 30  # the plan keeps its margin of the total


DEVICE = {"index": 0, "name": "Radeon 780M", "kind": "integrated", "vendor": "amd", "driver": "2.0.0",
          "vendor_id": 0x1002, "device_id": 0x15BF, "driver_version": 8388608, "api_version": 4206847}


def test_a_cached_verdict_is_checked_like_a_probe_answer():
    good = asdict(result())
    assert cached_result(good, DEVICE) == result()
    for bad in ({"state": "excellent"}, {"gen_tps": "fast"}, {"gen_tps": True}, {"memory_total": 1 << 50},
                {"memory_free": -1}, {"index": 1}, {"name": "Other GPU"}, {"prompt_tps": None}):
        assert cached_result({**good, **bad}, DEVICE) is None, bad
    assert cached_result({k: v for k, v in good.items() if k != "state"}, DEVICE) is None
    assert cached_result("ok", DEVICE) is None
    escaped = cached_result({**good, "detail": "\x1b[2Jcleared", "driver": "\x1b]0;x\x07"}, DEVICE)
    assert "\x1b" not in escaped.detail + escaped.driver


def test_two_identical_cards_keep_two_verdicts():
    from kit.kernels import KernelChoice

    kernel = KernelChoice("zen4", Path("/x/libggml-cpu-zen4.so"), (), cached=True)
    host = Host("linux", "x86_64")
    keys = {_cache_key(host, {**DEVICE, "index": i}, kernel, Path("/x/libggml-vulkan.so"), "b3") for i in (0, 1)}
    assert len(keys) == 2


def test_a_child_that_crashes_hangs_or_babbles_is_a_verdict_not_an_error():
    assert _run_child(["sh", "-c", "kill -SEGV $$"], 10) == (None, "crashed: SIGSEGV")
    answer, problem = _run_child(["sleep", "30"], 1)
    assert answer is None and problem.startswith("failed: no answer within 1 s")
    answer, problem = _run_child(["sh", "-c", "echo '{}'; echo '{}'"], 10)
    assert answer is None and "no result line" in problem
    assert _run_child(["sh", "-c", "echo '{\"devices\": []}'"], 10) == ({"devices": []}, "")


def test_the_device_structs_are_read_at_the_offsets_the_vulkan_header_gives(tmp_path):
    """kit.vulkan reads VkPhysicalDeviceProperties and VkPhysicalDeviceMemoryProperties by offset:
    compiled against the header, the offsets and sizes must be the ones it uses."""
    apt_install("libvulkan-dev", libraries=True)
    from kit import vulkan

    source = tmp_path / "offsets.c"
    source.write_text("""#include <stdio.h>
#include <stddef.h>
#include <vulkan/vulkan_core.h>
int main(void) {
  printf("%zu %zu %zu %zu %zu %zu %zu %zu\\n", offsetof(VkPhysicalDeviceProperties, deviceType),
         offsetof(VkPhysicalDeviceProperties, deviceName), sizeof(VkPhysicalDeviceProperties),
         offsetof(VkPhysicalDeviceMemoryProperties, memoryHeapCount),
         offsetof(VkPhysicalDeviceMemoryProperties, memoryHeaps), sizeof(VkMemoryHeap),
         offsetof(VkMemoryHeap, flags), sizeof(VkPhysicalDeviceMemoryProperties));
  return 0;
}
""")
    subprocess.run(["gcc", "-o", str(tmp_path / "offsets"), str(source)], check=True)
    kind, name, props, heap_count, heaps, heap_size, heap_flags, memory = map(
        int, subprocess.run([str(tmp_path / "offsets")], capture_output=True, text=True, check=True).stdout.split())
    assert (kind, name, heap_count, heaps, heap_size, heap_flags) == (
        16, vulkan._NAME_OFFSET, vulkan._HEAP_COUNT_OFFSET, vulkan._HEAPS_OFFSET, 16, 8)
    assert props <= vulkan._PROPERTIES_SIZE and memory <= vulkan._MEMORY_SIZE


def test_without_gpu_layers_no_operation_is_offloaded_to_a_registered_gpu():
    from kit.engine import context_params
    from kit.settings import EngineSettings

    assert context_params(EngineSettings(n_ctx=512, threads=2))["op_offload"] is False
    assert context_params(EngineSettings(n_ctx=512, threads=2, gpu_layers=4))["op_offload"] is True


def test_the_plan_says_why_no_gpu_is_used_and_uses_the_chosen_one(gemma_path):
    options = [ModelOption("gemma-3-270m", "Gemma 3 270M", read_facts([gemma_path]))]
    host = Host("linux", "x86_64", physical_cores=2, logical_cores=2, ram_total=8 << 30, ram_available=6 << 30,
                gpu_note="no GPU backend usable: this host has no Vulkan loader (libvulkan.so.1: not found)")
    plan = make_plan(host, options, runtime_backends=frozenset({"vulkan"}))
    assert plan.gpu_layers == 0 and plan.decision("gpu").reason.startswith("no GPU backend usable: this host has")
    choice = GpuChoice((result(),), *decide([result()]))
    plan = make_plan(Host("linux", "x86_64", physical_cores=2, logical_cores=2, ram_total=8 << 30,
                          ram_available=6 << 30, gpus=choice.gpus()), options,
                     runtime_backends=frozenset({"vulkan"}), overrides=Overrides())
    assert plan.gpu is not None and plan.gpu.device_index == 0 and plan.gpu_layers > 0


# ---------------------------------------------------------------- real Vulkan, real model

@pytest.fixture(scope="module")
def lavapipe() -> None:
    """The software Vulkan device, and the runtime's Vulkan backend to drive it (never skipped:
    build/llama-cpp.env builds it)."""
    apt_install(*LAVAPIPE_PACKAGES, libraries=True)
    assert ggml.gpu_backend_libs().get("vulkan"), "the llama step was built without -DGGML_VULKAN=ON"


@pytest.fixture(scope="module")
def gpu_stick(demo_stick, tmp_path_factory) -> Iterator[Path]:
    """One copy of the demo stick for this module: its state/ keeps the GPU probe's verdict, so
    lavapipe is probed once (about a minute) and the later tests read the cache as a user's would."""
    target = tmp_path_factory.mktemp("gpu") / "stick"
    shutil.copytree(demo_stick, target, ignore=shutil.ignore_patterns("state"))
    yield target
    shutil.rmtree(target.parent, ignore_errors=True)


def test_the_loader_lists_lavapipe_as_a_software_device(lavapipe):
    done = run_kit("_gpu-probe", "--list", check=True)
    devices = json.loads(done.stdout)["devices"]
    lvp = [d for d in devices if d["name"].startswith("llvmpipe")]
    assert lvp and lvp[0]["kind"] == "cpu" and lvp[0]["local_memory"] > 0 and lvp[0]["vendor_id"] == 0x10005


@pytest.mark.slow
def test_lavapipe_is_probed_matches_the_cpu_and_is_declined_as_slower(lavapipe, gpu_stick):
    env = {"KIT_GPU_PROBE": "all"}
    done = run_kit("doctor", "--json", "--stick", str(gpu_stick), env=env, check=True, timeout=900)
    data = json.loads(done.stdout)
    probe = data["gpu_probe"]
    lvp = next(r for r in probe["results"] if r["name"].startswith("llvmpipe"))
    # the device loaded every layer, gave the CPU's greedy tokens ("ok", not "mismatch"), was timed
    assert lvp["state"] == "ok", lvp
    assert lvp["gen_tps"] > 0 and lvp["cpu_gen_tps"] > lvp["gen_tps"] and lvp["memory_total"] > 0
    assert probe["chosen"] is None
    reason = next(d["reason"] for d in data["plan"]["decisions"] if d["topic"] == "gpu")
    assert reason.startswith("no GPU backend usable: llvmpipe") and "slower than the CPU" in reason
    assert data["plan"]["gpu_layers"] == 0
    again = json.loads(run_kit("doctor", "--json", "--stick", str(gpu_stick), env=env, check=True).stdout)
    assert again["gpu_probe"]["cached"] and again["gpu_probe"]["results"] == probe["results"]
    text = run_kit("doctor", "--stick", str(gpu_stick), env=env, check=True).stdout
    assert "GPUs through vulkan (cached verdict)" in text and "no GPU backend usable: llvmpipe" in text


@pytest.mark.slow
def test_a_software_device_is_not_probed_unless_asked(lavapipe, gpu_stick):
    data = json.loads(run_kit("doctor", "--json", "--stick", str(gpu_stick), check=True).stdout)
    lvp = next(r for r in data["gpu_probe"]["results"] if r["name"].startswith("llvmpipe"))
    assert lvp["state"] == "skipped" and "software Vulkan device" in lvp["detail"] and lvp["gen_tps"] is None


@pytest.mark.slow
def test_forced_gpu_layers_answer_through_lavapipe(lavapipe, gpu_stick):
    done = run_kit("ask", "--stick", str(gpu_stick), "--gpu-layers", "99", "--no-knowledge", "--max-tokens", "6",
                   "--temperature", "0", "Name one fruit.", check=True, timeout=900)
    assert "probed GPU llvmpipe" in done.stderr and ": ok" in done.stderr, done.stderr
    loading = [line for line in done.stderr.splitlines() if line.startswith("loading ")]
    assert loading and "GPU layers" in loading[-1], done.stderr
    assert done.stdout.strip()


@pytest.mark.slow
def test_no_vulkan_driver_is_cpu_only_never_an_error(lavapipe, gpu_stick):
    env = {"VK_ICD_FILENAMES": "/nonexistent/icd.json", "VK_DRIVER_FILES": "/nonexistent/icd.json"}
    data = json.loads(run_kit("doctor", "--json", "--stick", str(gpu_stick), env=env, check=True).stdout)
    reason = next(d["reason"] for d in data["plan"]["decisions"] if d["topic"] == "gpu")
    assert reason == "no GPU backend usable: no Vulkan driver is installed"
    done = run_kit("ask", "--stick", str(gpu_stick), "--no-knowledge", "--max-tokens", "4", "Hello", env=env,
                   check=True)
    assert done.stdout.strip()


def _hidden(paths: list[Path], *args: str) -> subprocess.CompletedProcess:
    """kit with each of `paths` replaced by an empty file, in a private mount namespace."""
    binds = " && ".join(f"mount --bind /dev/null {p}" for p in paths)
    return run_kit(*args, prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                  f'{binds} && exec "$@"', "sh"])


@pytest.mark.slow
def test_without_a_host_loader_the_runtimes_own_is_used_and_without_both_the_cpu(lavapipe, gpu_stick):
    if shutil.which("unshare") is None:
        pytest.fail("util-linux's unshare is missing")
    host_loaders = [p for p in Path("/usr/lib").rglob("libvulkan.so.1*") if p.is_file() and not p.is_symlink()]
    carried = ggml.carried_vulkan_loader()
    assert host_loaders and carried is not None and carried.is_file()
    done = _hidden(host_loaders, "_gpu-probe", "--list", "--loader", str(carried))
    assert any(d["name"].startswith("llvmpipe") for d in json.loads(done.stdout)["devices"]), done.stdout
    done = _hidden([*host_loaders, carried], "doctor", "--json", "--stick", str(gpu_stick))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    reason = next(d["reason"] for d in data["plan"]["decisions"] if d["topic"] == "gpu")
    assert reason.startswith("no GPU backend usable: this host has no Vulkan loader"), reason



@pytest.mark.slow
def test_kit_serve_drives_the_same_device_through_llama_server(lavapipe, gpu_stick):
    with servekit.serving(gpu_stick, "--gpu-layers", "99", "--parallel", "1", wait=False) as served:
        servekit.wait_ready(served, timeout=900)
        (pid,) = served.server_pids()
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        assert environ["GGML_VK_VISIBLE_DEVICES"] == "0"
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libggml-vulkan.so" in maps and "lvp" in maps  # the backend, and Mesa's lavapipe driver in it
        code, body = served.request("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 3}, timeout=600)
        assert code == 200 and body["choices"][0]["message"]["content"] is not None, body


@pytest.mark.slow
def test_gpu_layers_zero_runs_no_driver_code(lavapipe, gpu_stick):
    data = json.loads(run_kit("doctor", "--json", "--gpu-layers", "0", "--stick", str(gpu_stick),
                              env={"KIT_GPU_PROBE": "all"}, check=True).stdout)
    assert data["gpu_probe"]["results"] == []
    assert data["gpu_probe"]["reason"] == "--gpu-layers 0: CPU only, no GPU probed"
    reason = next(d["reason"] for d in data["plan"]["decisions"] if d["topic"] == "gpu")
    assert reason == "--gpu-layers 0: CPU only, no GPU probed"
