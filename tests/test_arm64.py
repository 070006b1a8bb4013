"""linux-arm64: one stick carries the x86_64 and the ARM runtime; the ARM one verifies, probes and
answers inside a bare arm64 Debian root run by qemu-user, on a plain ARMv8.0 core (cortex-a53)
and on one with dot product and half-precision arithmetic (neoverse-n1), with no network.

The ARM runtime is frozen by build/base.py in its arm64 build root (`bash build/install.sh --test`
makes it as root: ~15 min the first time). qemu-user runs the ARM code at a few tokens a second, so
the questions ask for few tokens.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import assert_notices_complete, run_kit
from test_e2e_stick import STICK_NAME, minbase_root, run_on_bare_host

from kit.builder.elfglibc import ELF_MAGIC, glibc_floor
from kit.builder.freeze import check_can_freeze, walk_regular_files
from kit.errors import BuildError

ARM = "linux-arm64"
QEMU_BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
EM_AARCH64 = 183
# QEMU_CPU model -> the CPU variants ggml may pick there: ARMv8.0 has no dot product; Neoverse N1
# (ARMv8.2) has dot product and fp16 arithmetic, no SVE.
CPUS = {"cortex-a53": {"armv8.0_1"}, "neoverse-n1": {"armv8.0_1", "armv8.2_1", "armv8.2_2"}}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/etc/debian_version").exists() or platform.machine() != "x86_64",
                       reason="the ARM runtime is built across from x86_64 Debian"),
]


@pytest.fixture(scope="module")
def arm_root() -> Path:
    """A minimal arm64 Debian root without Python (kept under CACHE), run through qemu-user."""
    try:  # the check kit build makes: the arm64 build root is ready and we may enter it
        check_can_freeze(ARM)
    except BuildError as exc:
        pytest.fail(f"{exc} (`bash build/install.sh --test` as root makes it)")
    assert "F" in re.search(r"^flags: (\S*)", QEMU_BINFMT.read_text(), re.M).group(1)
    return minbase_root("bookworm", "arm64")


@pytest.fixture(scope="module")
def two_runtime_stick(tmp_path_factory):
    """manifests/demo.toml with both Linux runtimes frozen here; removed at the module's end."""
    target = tmp_path_factory.mktemp("arm64") / STICK_NAME
    proc = run_kit("build", "--profile", "manifests/demo.toml", "--target", str(target),
                   "--platform", "linux-x86_64", "--platform", ARM, timeout=3600)
    assert proc.returncode == 0, f"kit build failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    yield target, proc.stderr
    shutil.rmtree(target.parent, ignore_errors=True)


def _elf_machine(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(20)
    return int.from_bytes(head[18:20], "little") if head[:4] == ELF_MAGIC else None


def test_the_stick_lists_both_runtimes_and_each_is_built_for_its_cpu(two_runtime_stick):
    stick, build_log = two_runtime_stick
    bundle = json.loads((stick / "KIT" / "bundle.json").read_text())
    assert sorted(r["platform"] for r in bundle["runtimes"]) == ["linux-arm64", "linux-x86_64"]
    listed = {f["path"] for f in bundle["files"]}
    folder = stick / "KIT" / "runtimes" / ARM
    files = list(walk_regular_files(folder))
    assert {f"runtimes/{ARM}/{rel}" for rel in files} <= listed  # every file hashed in the manifest
    machines = {rel: _elf_machine(folder / rel) for rel in files}
    elves = {rel: machine for rel, machine in machines.items() if machine is not None}
    assert elves and set(elves.values()) == {EM_AARCH64}, {r: m for r, m in elves.items() if m != EM_AARCH64}
    variants = sorted(p.name for p in (folder / "_internal/llama_cpp/lib").glob("libggml-cpu-*.so"))
    assert variants == [f"libggml-cpu-{v}.so" for v in ("armv8.0_1", "armv8.2_1", "armv8.2_2", "armv8.2_3",
                                                          "armv8.6_1", "armv8.6_2", "armv9.2_1", "armv9.2_2")]
    assert (folder / "_internal/llama_cpp/bin/llama-server").is_file()
    # the glibc floor: read from the files, recorded in the runtime's metadata, printed by kit build
    meta = json.loads((folder / "kit-runtime.json").read_text())
    assert meta["platform"] == ARM and meta["glibc"] == glibc_floor(folder, files).text
    assert re.search(rf"runtime {ARM} frozen .*needs glibc >= {re.escape(meta['glibc'])}", build_log), build_log
    assert sum((folder / rel).stat().st_size for rel in files) <= 100e6  # BENCHMARKS §5


def test_the_arm_runtime_has_a_licence_for_every_bundled_file(two_runtime_stick):
    assert_notices_complete(two_runtime_stick[0] / "KIT" / "runtimes" / ARM)


def test_verify_on_this_host_checks_both_runtimes(two_runtime_stick):
    proc = run_kit("verify", str(two_runtime_stick[0]), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert json.loads(proc.stdout)["ok"] is True


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_the_arm_runtime_answers_offline_under_qemu(arm_root, two_runtime_stick, cpu):
    stick = two_runtime_stick[0]
    assert not list((arm_root / "usr" / "bin").glob("python*"))
    # the model alone, a short context, one timed probe round: minutes, not tens, on the emulated CPU
    proc = run_on_bare_host(arm_root, stick, "ask", "Name one way to purify water.", "--max-tokens", "16",
                            "--temperature", "0", "--no-knowledge", "--ctx", "512",
                            env={"QEMU_CPU": cpu, "KIT_PROBE_ROUNDS": "1"}, timeout=1500)
    diagnostics = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    print(diagnostics)
    assert proc.returncode == 0, diagnostics
    stats = re.search(r"\[(\d+) tokens, ([\d.]+) tok/s, model gemma-3-270m, kernel (\S+)\]", proc.stderr)
    assert stats and int(stats.group(1)) > 0, diagnostics
    assert stats.group(3) in CPUS[cpu], diagnostics  # a variant this CPU runs, never one it lacks
    assert re.search(r"[A-Za-z]{3}", proc.stdout), diagnostics
    # probed now (a CPU this stick has not met): only variants this CPU runs, each timed once; the
    # verdicts are kept on the stick under this CPU's key
    probed = set(re.findall(r"probed CPU kernel (\S+): ok", proc.stderr))
    assert stats.group(3) in probed and probed <= CPUS[cpu], diagnostics
    verdicts = json.loads((stick / "KIT" / "state" / "kernel-probe.json").read_text())
    mine = [v["results"] for v in verdicts.values() if {r["variant"] for r in v["results"] if r["state"] == "ok"}
            == probed]
    assert len(mine) == 1 and all(r["rounds"] == 1 for r in mine[0] if r["state"] == "ok"), verdicts


def test_the_launcher_starts_the_x86_64_runtime_here(two_runtime_stick):
    proc = subprocess.run(["sh", str(two_runtime_stick[0] / "START-linux.sh"), "--version"], capture_output=True,
                          text=True, timeout=300, env={"PATH": os.environ["PATH"], "HOME": "/root"})
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
