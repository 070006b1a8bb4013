"""Drive a program in a real terminal (tmux) and read its screen: for the TUI's end-to-end tests.

Reusable for any command, e.g. the frozen runtime on a built stick:

    with Tmux(width=100, height=30) as term:
        term.start(["STICK/START-linux.sh"], env={"NO_COLOR": "1"})
        term.wait_for("Enter sends", timeout=300)
        term.type("How do I purify water?")
        term.keys("Enter")
        screen = term.wait_for(lambda s: "tok/s" in s)
        term.keys("C-q")
        assert term.wait_exit() == 0

Each Tmux has its own server socket (-L), so tests never touch anyone's tmux sessions.
Also here: building the demo stick once per test session (the kernel probe is then cached in
its state/ folder for every later start). No pytest import: bench/chat_terminal.py drives the
chat with the same class.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = Path(sys.executable).parent / "kit"  # the venv's console script
EXIT_MARK = "KIT-EXITED"


def require_tmux() -> str:
    """tmux's path; installs it from Debian's packages when missing, fails when that is impossible."""
    found = shutil.which("tmux")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "tmux"], capture_output=True, timeout=300)
        found = shutil.which("tmux")
    if not found:  # an error, never a skip: the real-terminal tests must run
        raise RuntimeError("tmux is not installed and could not be installed (apt-get install tmux)")
    return found


class Tmux:
    """One detached tmux session of a fixed size, on a private server."""

    def __init__(self, *, width: int = 100, height: int = 30):
        self.tmux = require_tmux()
        self.width, self.height = width, height
        self.socket = f"kit-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.session = "kit"

    def _run(self, *args: str, check: bool = True) -> str:
        done = subprocess.run([self.tmux, "-L", self.socket, *args], capture_output=True, text=True,
                              timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def start(self, argv: Sequence[str | os.PathLike], *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> None:
        """Run argv in the terminal; when it ends, a line 'KIT-EXITED <code>' shows its exit code."""
        command = " ".join(shlex.quote(str(a)) for a in argv)
        script = f"{command}; echo; echo {EXIT_MARK} $?; sleep 3600"
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        self._run("new-session", "-d", "-s", self.session, "-x", str(self.width), "-y", str(self.height),
                  "-c", str(cwd or REPO), *env_args, "sh", "-c", script)
        self._run("set-option", "-t", self.session, "escape-time", "50")  # Esc reaches the app quickly

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", self.session, check=False)

    def type(self, text: str) -> None:
        """Literal text, as typed (no key names interpreted)."""
        self._run("send-keys", "-t", self.session, "-l", text)

    def keys(self, *keys: str) -> None:
        """Key names as tmux spells them: Enter, Escape, C-s, F1, Up ...

        A pause follows Escape: an ESC byte straight before another key's escape sequence reads as
        one Alt+key chord to the app, which no person types.
        """
        for key in keys:
            self._run("send-keys", "-t", self.session, key)
            if key in ("Escape", "Esc"):
                time.sleep(0.3)

    def wait_for(self, what: str | Callable[[str], bool], *, timeout: float = 60.0,
                 interval: float = 0.2) -> str:
        """The screen once `what` (text, or a test of the screen) holds; fails with the screen shown."""
        test = (lambda s: what in s) if isinstance(what, str) else what
        end = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < end:
            screen = self.screen()
            if test(screen):
                return screen
            if self.exit_code(screen) is not None:
                break
            time.sleep(interval)
        raise AssertionError(f"terminal never showed {what!r} within {timeout:.0f} s; screen:\n{screen}")

    @staticmethod
    def exit_code(screen: str) -> int | None:
        found = re.search(rf"^{EXIT_MARK} (\d+)$", screen, re.M)
        return int(found.group(1)) if found else None

    def wait_exit(self, timeout: float = 30.0) -> int:
        screen = self.wait_for(lambda s: self.exit_code(s) is not None, timeout=timeout)
        return self.exit_code(screen)  # type: ignore[return-value]

    def close(self) -> None:
        socket_path = self._run("display-message", "-p", "#{socket_path}", check=False).strip()
        self._run("kill-server", check=False)
        if socket_path:  # tmux leaves the socket file behind
            Path(socket_path).unlink(missing_ok=True)

    def __enter__(self) -> Tmux:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_demo_stick(target: Path, *, attempts: int = 3, wait_s: float = 120) -> Path:
    """`kit build` of manifests/demo.toml without a frozen runtime (the venv runs it)."""
    cmd = [str(KIT), "build", "--profile", str(REPO / "manifests" / "demo.toml"), "--target", str(target),
           "--no-freeze"]
    for attempt in range(attempts):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode == 0:
            return target
        if attempt + 1 < attempts:  # a builder module another engineer is still writing: wait, retry
            time.sleep(wait_s)
    raise AssertionError(f"kit build failed:\n{done.stdout}\n{done.stderr}")


def shared_demo_stick(tmp_path_factory) -> Path:
    """One demo stick per test session, shared by every module that asks (the probe runs once).

    TUI_DEMO_STICK=/path reuses a stick built before (its probe verdict cached): for quick reruns.
    """
    given = os.environ.get("TUI_DEMO_STICK")
    if given:
        return Path(given)
    target = tmp_path_factory.getbasetemp() / "demo-stick"
    if not (target / "KIT" / "bundle.json").exists():
        build_demo_stick(target)
    return target


LONG_PROMPTS = ("Tell me a long story about the sea.", "Tell me a long story about mountains.",
                "Write a numbered list of 30 things to pack for a hike.",
                "Write a long essay about the history of maps.",
                "List everything a family needs in an emergency kit, with details.")
STREAMING = re.compile(r"Answering\.\.\. \d+ tokens")


def ask_and_stop(term: Tmux, prompts: Sequence[str] = LONG_PROMPTS, timeout: float = 300) -> str:
    """Ask until an answer is still streaming when Esc arrives; returns the 'Stopped' screen.

    A tiny model sometimes ends an answer before a test can press Esc: that answer is fine, and
    the next prompt gets its chance (a new conversation each time, so context stays small)."""
    for prompt in prompts:
        term.type(prompt)
        term.keys("Enter")
        screen = term.wait_for(lambda s: STREAMING.search(s) is not None or "tok/s ·" in s, timeout=timeout)
        if STREAMING.search(screen):
            term.keys("Escape")
            screen = term.wait_for(lambda s: "Stopped ·" in s or "tok/s ·" in s, timeout=60)
            if "Stopped ·" in screen:
                return screen
        term.keys("C-n")
        term.wait_for(lambda s: "tok/s ·" not in s, timeout=30)
    raise AssertionError(f"every answer ended before Esc could stop it ({len(prompts)} prompts)")
