"""kit.hardware: recorded hosts (tests/fixtures/hosts/<name>/) and this real machine.

A recorded host is a folder:
  fixture.json   description, platform.system()/machine() to pretend, and `live`: what psutil,
                 RLIMIT_AS, NVML and the Windows APIs answer there (a missing key fails like the
                 real call would, except NVML and RLIMIT_AS, which are then simply absent)
  root/          a fake / : proc/cpuinfo, proc/meminfo, proc/self/cgroup, sys/...
  commands/      recorded stdout, one file per command: <program>.txt, or
                 <program>_<first argument>.txt when that argument is not an option
                 (sysctl_hw.txt); a command with no file is "not installed"
  host.json      what detect() makes of it (Host.to_dict). Regenerate after a deliberate change:
                 python tests/test_hardware.py --regen
"""

from __future__ import annotations

import json
import platform
import shutil
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

if __name__ == "__main__":  # the --regen script: make `kit` importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.hardware import (  # noqa: E402
    GIB,
    MIB,
    Gpu,
    Host,
    LiveApis,
    default_run,
    detect,
    normalise_arch,
    normalise_os,
    nvml_gpus,
    parse_nvidia_smi,
    parse_rocm_smi,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hosts"
RECORDED = sorted(p.name for p in FIXTURES.iterdir() if (p / "fixture.json").is_file())
PROMISED = [  # the planning tests load these by name
    "netbook-4gb",
    "laptop-8gb",
    "desktop-16gb-rtx3060",
    "workstation-32gb-rtx4090",
    "macbook-m2-16gb",
    "rpi5-8gb",
    "container-2gb",
    "partly-unreadable",
]


# --- recorded hosts -------------------------------------------------------------------------


def command_key(argv: list[str]) -> str:
    if len(argv) > 1 and not argv[1].startswith("-"):
        return f"{argv[0]}_{argv[1]}"
    return argv[0]


def recorded_run(folder: Path, calls: list[list[str]] | None = None):
    def run(argv):
        if calls is not None:
            calls.append(list(argv))
        path = folder / "commands" / f"{command_key(list(argv))}.txt"
        return path.read_text() if path.is_file() else None

    return run


def recorded_live(spec: dict) -> LiveApis:
    def answer(key):
        def call():
            if key not in spec:
                raise RuntimeError("no answer")
            return tuple(spec[key])

        return call

    def nvidia():
        gpus = spec.get("nvidia_gpus")
        return None if gpus is None else [Gpu(**g) for g in gpus]

    def windows_cpu():
        name, flags = answer("windows_cpu")()
        return name, frozenset(flags)

    return LiveApis(
        memory=answer("memory"),
        cpu_counts=answer("cpu_counts"),
        address_space_limit=lambda: spec.get("address_space_limit"),
        nvidia_gpus=nvidia,
        windows_cpu=windows_cpu,
    )


def detect_recorded(name: str, calls: list[list[str]] | None = None, **live_overrides) -> Host:
    folder = FIXTURES / name
    meta = json.loads((folder / "fixture.json").read_text())
    return detect(
        root=folder / "root",
        run=recorded_run(folder, calls),
        system=meta["system"],
        machine=meta["machine"],
        live=recorded_live({**meta.get("live", {}), **live_overrides}),
    )


def host_json(host: Host) -> str:
    return json.dumps(host.to_dict(), indent=2, sort_keys=True) + "\n"


def regenerate() -> None:
    for name in RECORDED:
        (FIXTURES / name / "host.json").write_text(host_json(detect_recorded(name)))
        print(f"wrote {name}/host.json")


@pytest.mark.parametrize("name", RECORDED)
def test_host_json_is_what_detect_makes_of_the_recording(name):
    saved = (FIXTURES / name / "host.json").read_text()
    assert saved == host_json(detect_recorded(name)), "python tests/test_hardware.py --regen"
    assert Host.from_dict(json.loads(saved)) == detect_recorded(name)


@pytest.mark.parametrize("name", PROMISED)
def test_a_promised_host_is_recorded_and_read_whole(name):
    # the planning tests plan on these hosts' host.json: each must be recorded and fully read
    assert name in RECORDED
    host = detect_recorded(name)
    assert 0 < host.ram_available <= host.ram_total
    assert host.logical_cores >= host.physical_cores >= 1
    if name != "partly-unreadable":
        assert host.cpu_name != "unknown CPU" and host.cpu_flags
        assert host.notes == ()


def test_netbook_has_sse42_but_no_avx():
    host = detect_recorded("netbook-4gb")
    assert (host.os, host.arch, host.platform) == ("linux", "x86_64", "linux-x86_64")
    assert host.cpu_name == "Intel(R) Atom(TM) x5-Z8350 CPU @ 1.44GHz"
    assert {"sse2", "ssse3", "sse4_1", "sse4_2", "popcnt"} <= host.cpu_flags
    assert not host.cpu_flags & {"avx", "avx2", "fma", "f16c"}
    assert (host.physical_cores, host.logical_cores) == (4, 4)
    assert host.ram_total == 3946412 * 1024
    assert host.ram_available == 2211840 * 1024
    assert host.memory_limit is None  # the session cgroup says "max"
    assert host.gpus == () and host.notes == ()


def test_haswell_laptop_without_gpu():
    host = detect_recorded("laptop-8gb")
    assert {"avx", "avx2", "fma", "f16c", "bmi2"} <= host.cpu_flags
    assert "avx512f" not in host.cpu_flags
    assert (host.physical_cores, host.logical_cores) == (2, 4)
    assert host.ram_total == 8052816 * 1024 and host.ram_available == 5364224 * 1024
    assert host.gpus == () and host.notes == ()


def test_rtx3060_from_nvidia_smi():
    calls = []
    host = detect_recorded("desktop-16gb-rtx3060", calls)
    assert host.gpus == (
        Gpu(
            vendor="nvidia",
            name="NVIDIA GeForce RTX 3060",
            backend="cuda",
            vram_total=6144 * MIB,
            vram_free=5806 * MIB,
            driver="550.54.14",
            compute_capability="8.6",
        ),
    )
    assert (host.physical_cores, host.logical_cores) == (6, 12)
    assert host.ram_total == 16303104 * 1024
    assert [
        "nvidia-smi",
        "--query-gpu=name,memory.total,memory.free,driver_version,compute_cap",
        "--format=csv,noheader,nounits",
    ] in calls


def test_rtx4090_counted_once_and_llvmpipe_ignored():
    host = detect_recorded("workstation-32gb-rtx4090")
    [gpu] = host.gpus
    assert (gpu.name, gpu.backend, gpu.vram_total) == ("NVIDIA GeForce RTX 4090", "cuda", 24564 * MIB)
    assert gpu.compute_capability == "8.9"
    assert {"avx512f", "avx512_bf16", "avx512_vnni"} <= host.cpu_flags
    assert (host.physical_cores, host.logical_cores) == (16, 32)


def test_m2_macbook_from_sysctl():
    host = detect_recorded("macbook-m2-16gb")
    assert (host.os, host.arch, host.platform) == ("macos", "arm64", "macos-arm64")
    assert host.cpu_name == "Apple M2"
    assert {"fp", "asimd", "asimddp", "i8mm", "bf16", "fphp", "asimdhp", "crc32"} <= host.cpu_flags
    assert not host.cpu_flags & {"sve", "sme", "pauth2"}  # 0 in sysctl, or never mapped
    assert (host.physical_cores, host.logical_cores) == (8, 8)
    assert (host.ram_total, host.ram_available) == (16 * GIB, 9126805504)
    assert host.gpus == (Gpu("apple", "Apple M2 GPU", "metal", vram_total=16 * GIB * 2 // 3, unified_memory=True),)
    assert host.notes == ()


def test_apple_gpu_share_is_three_quarters_above_36_gib(tmp_path):
    big = (FIXTURES / "macbook-m2-16gb" / "commands" / "sysctl_hw.txt").read_text()
    big = big.replace("hw.memsize: 17179869184", f"hw.memsize: {64 * GIB}")

    def run(argv):
        return big if argv == ["sysctl", "hw"] else "machdep.cpu.brand_string: Apple M2 Max\n"

    host = detect(tmp_path, run, "Darwin", "arm64", recorded_live({"memory": [64 * GIB, GIB]}))
    assert host.gpus[0].vram_total == 48 * GIB
    assert host.gpus[0].name == "Apple M2 Max GPU"


def test_raspberry_pi5_features_and_name():
    host = detect_recorded("rpi5-8gb")
    assert (host.os, host.arch) == ("linux", "arm64")
    assert host.cpu_name == "ARM Cortex-A76 (Raspberry Pi 5 Model B Rev 1.0)"
    assert {"fp", "asimd", "asimddp", "asimdhp", "crc32"} <= host.cpu_flags
    assert "i8mm" not in host.cpu_flags
    assert (host.physical_cores, host.logical_cores) == (4, 4)  # from sysfs topology
    assert host.ram_total == 8245616 * 1024
    assert host.gpus == () and host.notes == ()  # v3d/vc4 are not PCI GPUs


def test_arm_features_come_from_the_process_hwcaps_not_an_emulators_cpuinfo(tmp_path):
    """Under qemu-user /proc/cpuinfo is the x86 host's; the auxiliary vector is the emulated CPU's
    (here a Neoverse N1: dot product and fp16 arithmetic, no SVE), as ggml's ARM variants read it."""
    folder = tmp_path / "qemu-neoverse-n1"
    shutil.copytree(FIXTURES / "rpi5-8gb", folder)
    root = folder / "root"
    shutil.copy(FIXTURES / "laptop-8gb" / "root" / "proc" / "cpuinfo", root / "proc" / "cpuinfo")
    hwcap = sum(1 << bit for bit in (0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 20))  # fp asimd ... asimddp
    (root / "proc" / "self").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "self" / "auxv").write_bytes(struct.pack("=8Q", 6, 4096, 16, hwcap, 26, 0, 0, 0))
    meta = json.loads((folder / "fixture.json").read_text())
    host = detect(root=root, run=recorded_run(folder), system="Linux", machine="aarch64",
                  live=recorded_live(meta.get("live", {})))
    assert {"fp", "asimd", "asimddp", "asimdhp", "atomics"} <= host.cpu_flags
    assert not host.cpu_flags & {"avx2", "sse4_2", "sve", "sve2", "i8mm", "sme"}
    (root / "proc" / "self" / "auxv").write_bytes(struct.pack("=8Q", 16, hwcap, 26, 1 << 1 | 1 << 13 | 1 << 23, 0, 0,
                                                               0, 0))
    host = detect(root=root, run=recorded_run(folder), system="Linux", machine="aarch64",
                  live=recorded_live(meta.get("live", {})))
    assert {"sve2", "i8mm", "sme", "asimddp"} <= host.cpu_flags


def test_container_cgroup_v2_limit_is_the_ceiling():
    host = detect_recorded("container-2gb")
    assert host.memory_limit == 2 * GIB
    assert host.ram_total == 2 * GIB
    # 700 MiB charged, 200 MiB of it reclaimable page cache
    assert host.ram_available == 2 * GIB - (734003200 - 209715200)
    assert (host.physical_cores, host.logical_cores) == (4, 8)
    assert host.notes == ()


def test_container_cgroup_v1_limit_at_the_mount_root():
    host = detect_recorded("container-v1-4gb")
    assert host.memory_limit == host.ram_total == 4 * GIB
    assert host.ram_available == 4 * GIB - (1342177280 - 268435456)
    assert host.notes == ()


def test_cgroup_v1_absurd_limit_means_none():
    host = detect_recorded("container-v1-unlimited")
    assert host.memory_limit is None
    assert host.ram_total == 24684092 * 1024 and host.ram_available == 23984464 * 1024


def test_partly_unreadable_host_says_what_it_could_not_read():
    host = detect_recorded("partly-unreadable")
    assert (host.cpu_name, host.cpu_flags) == ("unknown CPU", frozenset())
    assert (host.physical_cores, host.logical_cores) == (4, 4)  # psutil's logical count
    assert (host.ram_total, host.ram_available) == (12 * GIB, 6 * GIB)  # psutil's numbers
    assert host.memory_limit is None and host.gpus == ()
    text = " ".join(host.notes)
    assert "/proc/cpuinfo could not be read" in text
    assert "Could not read /proc/meminfo (Is a directory)" in text
    assert "'lots' is not a number" in text
    assert "Physical core count unknown" in text
    assert str(FIXTURES) not in text  # notes name the host's paths, not the recording's


def test_amd_gpu_from_sysfs_only():
    host = detect_recorded("desktop-32gb-rx6800")
    assert host.gpus == (
        Gpu("amd", "AMD GPU 0x73bf", "vulkan", vram_total=17163091968, vram_free=17163091968 - 402653184),
    )  # card0-DP-1 is a connector


def test_amd_gpu_from_rocm_smi_counted_once():
    host = detect_recorded("desktop-64gb-rx7900xtx-rocm")
    assert host.gpus == (
        Gpu("amd", "Radeon RX 7900 XTX", "rocm", vram_total=25753026560, vram_free=25753026560 - 1103101952),
    )


def test_intel_igpu_named_by_vulkan():
    host = detect_recorded("laptop-16gb-intel-igpu")
    assert host.gpus == (Gpu("intel", "Intel(R) Xe Graphics (TGL GT2)", "vulkan", unified_memory=True),)


def test_windows_host_through_live_apis():
    host = detect_recorded("windows-laptop-16gb-rtx4060")
    assert (host.os, host.arch, host.platform) == ("windows", "x86_64", "windows-x86_64")
    assert host.cpu_name == "13th Gen Intel(R) Core(TM) i7-13700H"
    assert {"avx2", "fma", "sse4_2"} <= host.cpu_flags
    assert (host.physical_cores, host.logical_cores) == (14, 20)
    assert (host.ram_total, host.ram_available) == (16856084480, 8791429120)
    assert [g.name for g in host.gpus] == ["NVIDIA GeForce RTX 4060 Laptop GPU"]


# --- limits, odd answers, failures ----------------------------------------------------------


def test_rlimit_as_caps_ram_minus_what_the_process_maps():
    host = detect_recorded("laptop-8gb", address_space_limit=3 * GIB)
    assert host.memory_limit == host.ram_total == 3 * GIB
    assert host.ram_available == 3 * GIB - 262144 * 1024  # VmSize in proc/self/status


def test_rlimit_above_ram_does_not_bind():
    host = detect_recorded("laptop-8gb", address_space_limit=64 * GIB)
    assert host.memory_limit is None and host.ram_total == 8052816 * 1024


def test_a_parent_cgroup_limit_applies(tmp_path):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/a/b\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal: 8388608 kB\nMemAvailable: 6291456 kB\n")
    leaf = tmp_path / "sys/fs/cgroup/a/b"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.current").write_text(f"{GIB}\n")
    (leaf.parent / "memory.max").write_text(f"{3 * GIB}\n")
    (leaf.parent / "memory.current").write_text(f"{2 * GIB}\n")
    host = detect(tmp_path, lambda argv: None, "Linux", "x86_64", recorded_live({}))
    assert host.memory_limit == host.ram_total == 3 * GIB
    assert host.ram_available == GIB


def test_an_empty_root_and_no_answers_never_raise(tmp_path):
    host = detect(tmp_path / "nowhere", lambda argv: None, "Linux", "x86_64", recorded_live({}))
    assert (host.physical_cores, host.logical_cores, host.ram_total) == (1, 1, 0)
    text = " ".join(host.notes)
    assert "cpuinfo" in text and "RAM size unknown" in text and "core count unknown" in text


def test_failing_runner_and_live_apis_never_raise(tmp_path):
    def boom(*_args):
        raise RuntimeError("boom")

    broken = LiveApis(boom, boom, boom, boom, boom)
    for system, machine in [("Linux", "x86_64"), ("Darwin", "arm64"), ("Windows", "ARM64"), ("FreeBSD", "amd64")]:
        host = detect(tmp_path, boom, system, machine, broken)
        assert host.logical_cores >= 1 and host.notes
        assert host.ram_total == 0  # no source answered: no RAM is made up
        assert "Could not ask psutil for memory (RuntimeError: boom)." in host.notes
        assert "Could not read RLIMIT_AS (RuntimeError: boom)." in host.notes


def test_garbage_command_output_is_ignored(tmp_path):
    host = detect(
        tmp_path,
        lambda argv: "\x00garbage, [N/A]\n{not json",
        "Linux",
        "x86_64",
        recorded_live({"memory": [GIB, GIB], "cpu_counts": [1, 1]}),
    )
    assert host.gpus == ()


def test_a_gpu_only_vulkan_knows_is_added(tmp_path):
    vulkan = (FIXTURES / "desktop-64gb-rx7900xtx-rocm" / "commands" / "vulkaninfo.txt").read_text()
    live = recorded_live({"memory": [GIB, GIB], "cpu_counts": [1, 1], "windows_cpu": ["x", []]})

    def run(argv):
        return vulkan if argv[0] == "vulkaninfo" else None

    host = detect(tmp_path, run, "Windows", "AMD64", live)
    assert host.gpus == (Gpu("amd", "AMD Radeon RX 7900 XTX (RADV NAVI31)", "vulkan", driver="Mesa 24.0.5-1ubuntu1"),)


def test_rosetta_is_noted(tmp_path):
    def run(argv):
        return "hw.memsize: 8589934592\nhw.optional.arm64: 1\n" if argv == ["sysctl", "hw"] else None

    host = detect(tmp_path, run, "Darwin", "x86_64", recorded_live({"memory": [GIB, GIB]}))
    assert any("Rosetta" in note for note in host.notes)
    assert host.gpus == ()


def test_cpu_signature_follows_the_cpu_and_nothing_else():
    laptop = detect_recorded("laptop-8gb")
    capped = detect_recorded("laptop-8gb", address_space_limit=3 * GIB)
    assert capped.ram_total < laptop.ram_total
    assert capped.cpu_signature() == laptop.cpu_signature()  # less RAM is the same CPU
    assert replace(laptop, cpu_flags=laptop.cpu_flags - {"avx2"}).cpu_signature() != laptop.cpu_signature()
    assert replace(laptop, cpu_name="Intel(R) Core(TM) i5").cpu_signature() != laptop.cpu_signature()
    assert replace(laptop, os="windows").cpu_signature() != laptop.cpu_signature()
    cpus = ["netbook-4gb", "laptop-8gb", "workstation-32gb-rtx4090", "macbook-m2-16gb", "rpi5-8gb"]
    assert len({detect_recorded(name).cpu_signature() for name in cpus}) == len(cpus)


def test_nvidia_smi_odd_cells():
    [gpu] = parse_nvidia_smi("Tesla K80, 11441, [N/A], 470.256.02\n\n")
    assert (gpu.vram_total, gpu.vram_free, gpu.compute_capability) == (11441 * MIB, None, None)


def test_nvidia_smi_without_compute_cap_is_asked_again():
    calls = []

    def old_driver(argv):
        calls.append(argv)
        return None if "compute_cap" in argv[1] else "Quadro P1000, 4040, 3900, 470.82\n"

    host = detect("/nonexistent", old_driver, "Linux", "x86_64", recorded_live({}))
    assert [g.name for g in host.gpus] == ["Quadro P1000"]
    assert len([c for c in calls if c[0] == "nvidia-smi"]) == 2


def test_rocm_smi_with_a_warning_before_the_json():
    text = (
        'WARNING: AMD GPU device(s) is/are in a low-power state.\n{"card0": '
        '{"VRAM Total Memory (B)": "8589934592", "VRAM Total Used Memory (B)": "0", '
        '"Card series": "Navi 23"}, "system": {"Driver version": "6.7.0"}}\n'
    )
    assert parse_rocm_smi(text) == [Gpu("amd", "Navi 23", "rocm", 8 * GIB, 8 * GIB)]


def test_nvml_through_a_fake_library():
    class FakeNvml:
        shut = False

        def nvmlInit_v2(self):
            return 0

        def nvmlShutdown(self):
            FakeNvml.shut = True
            return 0

        def nvmlSystemGetDriverVersion(self, buf, size):
            buf.value = b"550.54.15"
            return 0

        def nvmlDeviceGetCount_v2(self, count):
            count._obj.value = 2
            return 0

        def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
            handle._obj.value = index.value + 1
            return 0

        def nvmlDeviceGetName(self, handle, buf, size):
            buf.value = b"NVIDIA H100 80GB HBM3"
            return 0

        def nvmlDeviceGetMemoryInfo(self, handle, memory):
            if handle.value == 2:
                return 3  # NVML_ERROR_NOT_SUPPORTED
            memory._obj.total, memory._obj.free = 80 * GIB, 79 * GIB
            return 0

        def nvmlDeviceGetCudaComputeCapability(self, handle, major, minor):
            major._obj.value, minor._obj.value = 9, 0
            return 0

    first, second = nvml_gpus(load=FakeNvml)
    assert first == Gpu(
        "nvidia", "NVIDIA H100 80GB HBM3", "cuda", 80 * GIB, 79 * GIB, driver="550.54.15", compute_capability="9.0"
    )
    assert second.vram_total is None and FakeNvml.shut
    assert nvml_gpus(load=lambda: None) is None


@pytest.mark.parametrize(
    ("machine", "arch"),
    [
        ("x86_64", "x86_64"),
        ("AMD64", "x86_64"),
        ("aarch64", "arm64"),
        ("ARM64", "arm64"),
        ("arm64", "arm64"),
        ("i686", "x86"),
        ("riscv64", "riscv64"),
        ("", "unknown"),
    ],
)
def test_arch_names(machine, arch):
    assert normalise_arch(machine) == arch


def test_os_names():
    assert [normalise_os(s) for s in ("Linux", "Darwin", "Windows", "FreeBSD")] == [
        "linux",
        "macos",
        "windows",
        "freebsd",
    ]


def test_default_run_gives_up_quickly():
    assert default_run(["/nonexistent/tool"]) is None
    assert default_run([sys.executable, "-c", "import sys; sys.exit(3)"]) is None
    assert default_run([sys.executable, "-c", "print('hi')"]) == "hi\n"
    start = time.monotonic()
    assert default_run([sys.executable, "-c", "import time; time.sleep(30)"]) is None
    assert time.monotonic() - start < 10


# --- this machine -----------------------------------------------------------------------------


def test_this_machine():
    host = detect()
    assert host.os == normalise_os(platform.system())
    assert host.logical_cores >= host.physical_cores >= 1
    assert 0 < host.ram_available <= host.ram_total
    if host.arch == "x86_64":
        assert "sse2" in host.cpu_flags
    assert host.cpu_name != "unknown CPU" or host.notes
    assert len(host.cpu_signature()) == 16
    assert host.cpu_signature() == detect().cpu_signature()  # the kernel probe's cache key is stable
    assert Host.from_dict(json.loads(json.dumps(host.to_dict()))) == host


if __name__ == "__main__":
    if sys.argv[1:] != ["--regen"]:
        sys.exit("usage: python tests/test_hardware.py --regen")
    regenerate()
