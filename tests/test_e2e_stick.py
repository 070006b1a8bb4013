"""The whole promise: `kit build` makes a stick whose launcher answers a question on a bare Linux
with no Python and no network.

The bare host is a Debian minbase root made with debootstrap (cached under CACHE, so only the first
run downloads it); the stick is bind-mounted into it and the launcher runs under `chroot` inside
`unshare -m -n` (a private mount table and no network at all).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import apt_install, run_kit

from kit.builder.freeze import host_platform

CACHE = Path("/var/cache/kit-test-debootstrap")
# Debian 11 has glibc 2.31, the floor build/base.py freezes for (Ubuntu 20.04 has the same);
# Debian 12 (2.36) stands for every newer Linux.
SUITES = {"bullseye": "11.", "bookworm": "12."}
FALLBACK_MIRROR = "http://deb.debian.org/debian"
STICK_NAME = "Survival Kit — clé USB"  # spaces and non-ASCII, as real volume names have
QUESTION = "How do I purify water?"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/etc/debian_version").exists() or os.name != "posix",
                       reason="builds a Debian root with debootstrap"),
]


def debian_mirror() -> str:
    """The Debian archive apt already uses here (deb822 `URIs:` or one-line `deb URL SUITE`)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for url in re.findall(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.MULTILINE):
            if url.rstrip("/").endswith("/debian"):
                return url
    return FALLBACK_MIRROR


def require_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the end-to-end stick test needs root (debootstrap, chroot, unshare, mount)")
    apt_install("debootstrap")
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing; install util-linux / coreutils")


def minbase_root(suite: str, arch: str | None = None) -> Path:
    """A minimal Debian root without Python (another CPU's: run by qemu-user), made once and kept
    under CACHE."""
    require_root_tools()
    root = CACHE / (f"{suite}-{arch}-minbase" if arch else f"{suite}-minbase")
    if (root / ".kit-complete").exists():
        return root
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    mirror = debian_mirror()
    argv = ["debootstrap", "--variant=minbase", *([f"--arch={arch}"] if arch else []), suite, str(partial), mirror]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv[:-2])} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    (root / ".kit-complete").write_text(" ".join(argv[:-2]) + f" {mirror}\n")
    return root


@pytest.fixture(scope="session", params=sorted(SUITES))
def debian_root(request) -> Path:
    """A minimal Debian root without Python per release, kept under CACHE."""
    return minbase_root(request.param)


@pytest.fixture(scope="session")
def built_stick(tmp_path_factory) -> Path:
    """A complete stick from manifests/demo.toml, runtime frozen for this host."""
    target = tmp_path_factory.mktemp("e2e") / STICK_NAME
    proc = run_kit("build", "--profile", "manifests/demo.toml", "--target", str(target), timeout=1800)
    assert proc.returncode == 0, f"kit build failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return target


@pytest.fixture(scope="session")
def zim_stick(tmp_path_factory) -> Path:
    """The demo profile plus a real Kiwix archive (python-libzim's Creator, full-text index), frozen
    runtime and all: libzim runs from the stick, not from this host's Python."""
    from knowledgekit import make_zim

    folder = tmp_path_factory.mktemp("zim-profile")
    archive = make_zim(folder / "first-aid.zim")
    manifests = Path(__file__).resolve().parents[1] / "manifests"
    shutil.copytree(manifests / "knowledge", folder / "knowledge")  # demo.toml's pack, beside it
    profile = folder / "with-zim.toml"
    profile.write_text((manifests / "demo.toml").read_text() + f"""
[[knowledge]]
id = "first-aid"
name = "First aid archive (test)"
kind = "zim"
licence = "CC0-1.0"
language = "en"
path = "{archive}"
""")
    target = tmp_path_factory.mktemp("e2e-zim") / STICK_NAME
    proc = run_kit("build", "--profile", str(profile), "--target", str(target), timeout=1800)
    assert proc.returncode == 0, f"kit build failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return target


def bare_host_argv(root: Path, stick: Path, *args: str, network: str = "none",
                   env: dict[str, str] | None = None) -> list[str]:
    """START-linux.sh ARGS inside the Debian root, the stick bind-mounted at /media/<name>, a clean
    environment (plus env). network: "none" (a namespace of its own, loopback down), "loopback" (its
    own, with loopback up and a RAM /dev/shm, as a laptop without Wi-Fi has) or "host" (this machine's)."""
    (root / "media" / STICK_NAME).mkdir(parents=True, exist_ok=True)
    mounts = 'mount --bind "$2" "$1/media/$3"; mount -t proc proc "$1/proc"; mount -t sysfs sysfs "$1/sys" || true; '
    if network == "loopback":
        mounts += ('mount -t tmpfs tmpfs "$1/dev/shm" || true; '
                   'python3 -c "import socket, fcntl, struct; s = socket.socket(); '
                   "fcntl.ioctl(s, 0x8914, struct.pack('16sh22x', b'lo', 1 | 0x40))\"; ")  # SIOCSIFFLAGS: lo up
    script = f'set -e; {mounts}shift 3; exec chroot "$@"'
    namespaces = ["--mount"] if network == "host" else ["--mount", "--net"]
    return ["unshare", *namespaces, "sh", "-c", script, "sh", str(root), str(stick), STICK_NAME,
            str(root), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
            "LANG=C.UTF-8", *[f"{k}={v}" for k, v in (env or {}).items()], "/bin/sh",
            f"/media/{STICK_NAME}/START-linux.sh", *args]


@contextlib.contextmanager
def running_on_bare_host(argv: list[str], ready: str,
                         timeout: float = 600) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """A long-running launcher command (bare_host_argv): started, its output collected, awaited until
    a line holds `ready`; then SIGTERM (the unshare's sh has exec'd chroot -> sh -> the runtime, so
    it reaches the kit) and, if it lingers, SIGKILL. The caller checks the exit code after."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(ln.rstrip() for ln in proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not any(ready in ln for ln in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "\n".join(lines[-40:])
            time.sleep(0.5)
        yield proc, lines
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_on_bare_host(root: Path, stick: Path, *args: str, timeout: float = 900,
                     env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """START-linux.sh ARGS inside the Debian root, the stick bind-mounted at /media/<name>, no network."""
    command = bare_host_argv(root, stick, *args, env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_stick_has_everything(built_stick):
    for name in ("START-linux.sh", "START-macos.command", "START-windows.bat", "README.txt",
                 "KIT/bundle.json", "KIT/B3SUMS", "KIT/SHA256SUMS", f"KIT/runtimes/{host_platform()}/kit"):
        assert (built_stick / name).is_file(), name
    assert not (built_stick / "KIT" / "INCOMPLETE").exists()
    assert os.access(built_stick / "START-linux.sh", os.X_OK)
    assert not any(p.is_symlink() for p in built_stick.rglob("*"))


def test_the_bare_host_has_no_python_and_no_openmp(debian_root):
    suite = debian_root.name.removesuffix("-minbase")
    assert (debian_root / "etc" / "debian_version").read_text().startswith(SUITES[suite])
    assert (debian_root / "bin" / "sh").exists()
    assert not list((debian_root / "usr" / "bin").glob("python*"))
    # A minbase root has no OpenMP runtime: the runtime must need none, or bring its own.
    assert not list(debian_root.glob("usr/lib/*/libgomp.so*"))


def test_the_frozen_runtime_verifies_the_stick_offline(debian_root, built_stick):
    proc = run_on_bare_host(debian_root, built_stick, "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "The stick is intact." in proc.stdout


def test_doctor_on_the_bare_host_names_its_glibc_and_the_runtimes(debian_root, built_stick):
    proc = run_on_bare_host(debian_root, built_stick, "doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    shown = re.search(r"glibc: (\S+); this stick's runtime needs (\S+) or newer", proc.stdout)
    assert shown, proc.stdout
    host_glibc = {"bullseye": "2.31", "bookworm": "2.36"}[debian_root.name.removesuffix("-minbase")]
    needs = json.loads((built_stick / "KIT" / "runtimes" / host_platform() / "kit-runtime.json").read_text())["glibc"]
    assert shown.groups() == (host_glibc, needs)


def test_ask_answers_offline_on_a_bare_host(debian_root, built_stick):
    proc = run_on_bare_host(debian_root, built_stick, "ask", QUESTION, "--max-tokens", "48", "--temperature", "0")
    diagnostics = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    print(diagnostics)
    assert proc.returncode == 0, diagnostics
    assert "checking gemma-3-270m against the stick's manifest" in proc.stderr, diagnostics
    # Probed now, or on the other bare host or by doctor: the verdict is kept on the stick, per CPU.
    probed_ok = set(re.findall(r"probed CPU kernel (\S+): ok", proc.stderr))
    verdicts = json.loads((built_stick / "KIT" / "state" / "kernel-probe.json").read_text())
    probed_ok |= {r["variant"] for v in verdicts.values() for r in v["results"] if r["state"] == "ok"}
    stats = re.search(r"\[(\d+) tokens, [\d.]+ tok/s, model gemma-3-270m, kernel (\S+)\]", proc.stderr)
    assert stats, diagnostics
    assert int(stats.group(1)) > 0 and stats.group(2) in probed_ok, diagnostics
    assert len(proc.stdout.strip()) >= 10 and re.search(r"[A-Za-z]{3}", proc.stdout), diagnostics
    assert (built_stick / "KIT" / "state" / "kernel-probe.json").is_file()  # the verdict is kept on the stick


def test_knowledge_is_verified_and_searched_offline_on_a_bare_host(debian_root, zim_stick):
    """Both kinds from the frozen runtime on an old and a new glibc: the demo pack's FTS5 index (the
    runtime's own sqlite) and a ZIM archive through the runtime's own libzim, stripped on the way."""
    proc = run_on_bare_host(debian_root, zim_stick, "search", "rewarming blankets hypothermia", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert [s["state"] for s in data["knowledge"]] == ["verified", "verified"], data["knowledge"]
    found = [(r["source"], r["path"], r["section"]) for r in data["results"]]
    assert ("first-aid", "Hypothermia", "Rewarming") in found, found
    water = json.loads(run_on_bare_host(debian_root, zim_stick, "search", "purify water", "--json").stdout)
    assert {r["source"] for r in water["results"]} == {"survival-demo", "first-aid"}
    assert all("PWNED" not in r["text"] for r in water["results"])  # the archive's script is never text


def _mapped_paths(pid: int) -> set[str]:
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:  # the process has ended
        return set()
    return {fields[5].strip() for fields in (line.split(None, 5) for line in lines) if len(fields) == 6}


def test_ask_maps_one_libggml_from_the_stick(built_stick):
    """docs/ARCHITECTURE.md trap 2, on the stick itself: the launcher execs the runtime (same pid), whose
    libllama and CPU kernel must share the one libggml in its llama_cpp/lib."""
    launcher = built_stick / "START-linux.sh"
    proc = subprocess.Popen(["sh", str(launcher), "ask", QUESTION, "--max-tokens", "8"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    seen: set[str] = set()
    while proc.poll() is None:
        seen |= _mapped_paths(proc.pid)
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    lib = built_stick / "KIT" / "runtimes" / host_platform() / "_internal" / "llama_cpp" / "lib"
    ggml = sorted(p for p in seen if Path(p).name.startswith(("libggml.so", "libggml-base.so")))
    assert ggml == [str(lib / "libggml-base.so.0"), str(lib / "libggml.so.0")]
    assert any(Path(p).name.startswith("libggml-cpu-") for p in seen) and out.strip()


def test_launcher_opens_the_chat_in_a_real_terminal(built_stick):
    """The frozen runtime's chat, started by the launcher with no arguments, in tmux with no network:
    start, verification, a question, a streamed answer, stop, quit."""
    from tmuxdrv import Tmux, ask_and_stop

    launcher = built_stick / "START-linux.sh"
    with Tmux(width=100, height=30) as term:
        term.start(["unshare", "-n", "sh", launcher], env={"NO_COLOR": "1"})
        screen = term.wait_for("Enter sends", timeout=900)
        assert "Gemma 3 270M" in screen
        term.type(QUESTION)
        term.keys("Enter")
        screen = term.wait_for(lambda s: re.search(r"[\d.]+ tok/s · context \d+ of \d+", s) is not None,
                               timeout=300)  # the streamed answer ended: its speed and context use show
        assert QUESTION in screen
        term.keys("C-n")
        term.wait_for(lambda s: "tok/s ·" not in s, timeout=30)
        screen = ask_and_stop(term)
        assert re.search(r"Stopped · [\d.]+ tok/s · context \d+ of \d+ tokens", screen)
        term.keys("C-q")
        assert term.wait_exit(timeout=60) == 0


def test_serve_answers_offline_on_a_bare_host(debian_root, built_stick):
    """`START-linux.sh serve` in the bare root with no network but its own loopback: the frozen
    runtime starts the stick's llama-server, which answers a real client (curl, entering that
    network namespace from outside) and stops with the launcher."""
    from servekit import free_port

    apt_install("nsenter", "curl")
    port = free_port()
    argv = bare_host_argv(debian_root, built_stick, "serve", "--port", str(port), "--parallel", "2", network="loopback")
    with running_on_bare_host(argv, "Ctrl+C stops the server") as (proc, lines):
        body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32,
                           "temperature": 0})  # greedy: a sampled first token may be the end of turn
        answer = subprocess.run(["nsenter", "-t", str(proc.pid), "-n", "curl", "-sS", "--max-time", "120",
                                 "-H", "Content-Type: application/json", "-d", body,
                                 f"http://127.0.0.1:{port}/v1/chat/completions"],
                                capture_output=True, text=True, timeout=150)
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["choices"][0]["message"]["content"].strip(), answer.stdout
        assert any(ln.startswith("Serving Gemma 3 270M") and ln.endswith("sealed") for ln in lines), lines
    assert proc.returncode == 0, "\n".join(lines[-20:])
    assert any("llama-server has exited" in ln for ln in lines)


def test_serve_refuses_a_stick_whose_llama_server_was_changed(built_stick, tmp_path):
    stick = tmp_path / "stick"
    shutil.copytree(built_stick, stick, ignore=shutil.ignore_patterns("state"))
    server = stick / "KIT" / "runtimes" / host_platform() / "_internal" / "llama_cpp" / "bin" / "llama-server"
    data = bytearray(server.read_bytes())
    data[len(data) // 2] ^= 0xFF
    server.write_bytes(bytes(data))
    from servekit import free_port

    proc = subprocess.run(["sh", str(stick / "START-linux.sh"), "serve", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "llama-server and its libraries are damaged" in proc.stderr
    assert "_internal/llama_cpp/bin/llama-server is corrupt" in proc.stderr, proc.stderr[-2000:]


def test_serve_refuses_a_file_the_manifest_does_not_list_beside_llama_server(built_stick, tmp_path):
    """ggml loads every backend module beside the executable: one file more would run unchecked."""
    from servekit import free_port

    stick = tmp_path / "stick"
    shutil.copytree(built_stick, stick, ignore=shutil.ignore_patterns("state"))
    runtime = stick / "KIT" / "runtimes" / host_platform() / "_internal" / "llama_cpp"
    shutil.copy(runtime / "lib" / "libggml-cpu-x64.so", runtime / "bin" / "libggml-cpu-x64.so")
    proc = subprocess.run(["sh", str(stick / "START-linux.sh"), "serve", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "llama-server's folder holds libggml-cpu-x64.so, which this stick's manifest does not list" in proc.stderr


def test_a_pool_worker_on_a_bare_host_lends_its_memory_to_a_lead(debian_root, built_stick):
    """`START-linux.sh pool worker` in the bare root (its own mount namespace on this machine's
    network: loopback 127.0.0.2), and the lead, `START-linux.sh ask --pool` on this host: the frozen
    runtime's rpc-server, RPC module and llama-server --rpc, each verified on its own side."""
    from poolkit import free_port_pair

    port = free_port_pair("127.0.0.2")
    argv = bare_host_argv(debian_root, built_stick, "pool", "worker", "--bind", "127.0.0.2", "--port", str(port),
                          network="host")
    with running_on_bare_host(argv, "Ctrl+C stops the worker.") as (worker, lines):
        assert any("WARNING: rpc-server has no password" in ln for ln in lines)
        lead = subprocess.run(["sh", str(built_stick / "START-linux.sh"), "ask", "--pool", f"127.0.0.2:{port}",
                               "--temperature", "0", "--max-tokens", "16", QUESTION],
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert lead.returncode == 0, lead.stderr[-3000:]
        assert lead.stdout.strip()
        assert f"pool worker 127.0.0.2:{port}: kit" in lead.stderr, lead.stderr
    assert worker.returncode == 0, "\n".join(lines[-20:])
    assert any("rpc-server has exited" in ln for ln in lines)
