"""The stick's launchers (launchers/START-*): find the runtime for this host, explain what blocks it, run it.

A stub runtime stands in for the frozen one: it prints KIT_BUNDLE and each argument it got.
The POSIX launchers run under every shell found here (dash is Debian's /bin/sh).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import apt_install

from kit.builder.freeze import host_platform
from kit.builder.sticktext import LAUNCHER_DIR

SHELLS = [s for s in ("dash", "bash", "sh") if shutil.which(s)]
POSIX_LAUNCHERS = ["START-linux.sh", "START-macos.command"]
STUB = """#!/bin/sh
printf 'bundle=%s\\n' "$KIT_BUNDLE"
for arg in "$@"; do printf 'arg=[%s]\\n' "$arg"; done
exit "${STUB_EXIT:-0}"
"""
pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="runs the launchers on Linux")


def make_stick(root: Path, platforms: list[str], executable: bool = True) -> Path:
    """A stick in a folder whose name has spaces and non-ASCII letters, with stub runtimes."""
    stick = root / "Survival Kit — été ü"
    (stick / "KIT" / "runtimes").mkdir(parents=True)
    for plat in platforms:
        folder = stick / "KIT" / "runtimes" / plat
        folder.mkdir(parents=True)
        entry = folder / ("kit.exe" if plat.startswith("windows") else "kit")
        entry.write_text(STUB)
        entry.chmod(0o755 if executable else 0o644)
    for name in POSIX_LAUNCHERS:
        shutil.copy2(LAUNCHER_DIR / name, stick / name)
    return stick


def run_launcher(shell: str, stick: Path, *args: str, launcher: str = "START-linux.sh",
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run from another folder, as a double-click or a terminal elsewhere would."""
    return subprocess.run([shell, str(stick / launcher), *args], capture_output=True, text=True, cwd="/",
                          env=dict(os.environ, **(env or {})), timeout=60)


@pytest.fixture(params=SHELLS)
def shell(request) -> str:
    return request.param


@pytest.mark.parametrize("launcher", POSIX_LAUNCHERS)
def test_runs_the_runtime_with_the_arguments_and_the_stick(tmp_path, shell, launcher):
    stick = make_stick(tmp_path, [host_platform(), "windows-x86_64"])
    args = ["ask", "two words", "it's $HOME and `id`", "ünïcødé", ""]
    proc = run_launcher(shell, stick, *args, launcher=launcher)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"bundle={stick}"
    assert lines[1:] == [f"arg=[{a}]" for a in args]


def test_no_arguments_pass_no_arguments(tmp_path, shell):
    stick = make_stick(tmp_path, [host_platform()])
    proc = run_launcher(shell, stick)
    assert proc.returncode == 0 and proc.stdout.splitlines() == [f"bundle={stick}"]


@pytest.mark.parametrize("launcher", POSIX_LAUNCHERS)
def test_the_runtimes_exit_status_is_kept(tmp_path, shell, launcher):
    stick = make_stick(tmp_path, [host_platform()])
    proc = run_launcher(shell, stick, "verify", launcher=launcher, env={"STUB_EXIT": "4"})
    assert proc.returncode == 4


@pytest.mark.parametrize("launcher", POSIX_LAUNCHERS)
def test_a_missing_runtime_lists_the_ones_present(tmp_path, shell, launcher):
    stick = make_stick(tmp_path, ["windows-x86_64", "linux-riscv99"])
    proc = run_launcher(shell, stick, launcher=launcher)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"kit: this stick has no runtime for {host_platform()}; "
                                   "it has: linux-riscv99, windows-x86_64")
    assert proc.stdout == ""


def test_a_stick_without_runtimes_says_none(tmp_path, shell):
    stick = make_stick(tmp_path, [])
    proc = run_launcher(shell, stick)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("it has: none")


@pytest.mark.parametrize("launcher", POSIX_LAUNCHERS)
def test_a_runtime_without_exec_permission_is_explained(tmp_path, shell, launcher):
    stick = make_stick(tmp_path, [host_platform()], executable=False)
    proc = run_launcher(shell, stick, launcher=launcher)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "execute permission" in proc.stderr and "exFAT" in proc.stderr
    assert "copy the whole stick folder" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="mounts a noexec tmpfs (root)")
def test_a_noexec_mount_is_explained(tmp_path, shell):
    """The runtime has its exec bit, but the filesystem (as Linux mounts FAT32 sticks) forbids running it."""
    mount_point = tmp_path / "no exec mount"
    mount_point.mkdir()
    script = (f'mount -t tmpfs -o noexec tmpfs "$1" && cp -r "$2" "$1/stick" '
              f'&& {shell} "$1/stick/START-linux.sh" ask hello')
    stick = make_stick(tmp_path, [host_platform()])
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(mount_point), str(stick)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "mounted 'noexec' (tmpfs at " in proc.stderr and "exFAT" in proc.stderr


def test_an_incomplete_stick_says_so(tmp_path, shell):
    stick = make_stick(tmp_path, [host_platform()])
    (stick / "KIT" / "INCOMPLETE").write_text("build started\n")
    proc = run_launcher(shell, stick)
    assert proc.returncode == 1 and "incomplete" in proc.stderr and proc.stdout == ""


def test_a_glibc_older_than_the_runtime_needs_is_refused_with_both_versions(tmp_path, shell):
    stick = make_stick(tmp_path, [host_platform()])
    (stick / "KIT" / "runtimes" / host_platform() / "kit-runtime.json").write_text('{"glibc": "9.99"}')
    proc = run_launcher(shell, stick, "x")
    have = os.confstr("CS_GNU_LIBC_VERSION").split()[1]
    assert proc.returncode == 1 and "arg=" not in proc.stdout
    assert f"needs glibc 9.99 or newer; this Linux has glibc {have}" in proc.stderr


def test_a_glibc_at_least_as_new_as_needed_starts_the_runtime(tmp_path, shell):
    stick = make_stick(tmp_path, [host_platform()])
    (stick / "KIT" / "runtimes" / host_platform() / "kit-runtime.json").write_text('{"glibc": "2.17"}')
    proc = run_launcher(shell, stick, "x")
    assert proc.returncode == 0 and "arg=[x]" in proc.stdout and "glibc" not in proc.stderr


def test_macos_launcher_explains_gatekeeper_when_the_runtime_is_killed(tmp_path, shell):
    stick = make_stick(tmp_path, [host_platform()])
    proc = run_launcher(shell, stick, launcher="START-macos.command", env={"STUB_EXIT": "137"})
    assert proc.returncode == 137
    assert "Gatekeeper" in proc.stderr and f'xattr -dr com.apple.quarantine "{stick}"' in proc.stderr


@pytest.mark.parametrize("launcher", POSIX_LAUNCHERS)
def test_launchers_pass_shellcheck_as_posix_sh(launcher):
    apt_install("shellcheck")
    proc = subprocess.run(["shellcheck", "-s", "dash", str(LAUNCHER_DIR / launcher)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_windows_launcher_maps_the_architectures_and_passes_the_arguments():
    """cmd.exe cannot run here: check the parts a typo would break."""
    text = (LAUNCHER_DIR / "START-windows.bat").read_text()
    assert '"%RUNTIME%" %*' in text
    assert 'set "KIT_BUNDLE=%STICK%"' in text
    for cpu, arch in (("AMD64", "x86_64"), ("ARM64", "arm64")):
        assert f'if /i "%ARCH%"=="{cpu}" set "ARCH={arch}"' in text
    assert "it has: %HAVE%" in text and "PROCESSOR_ARCHITEW6432" in text
