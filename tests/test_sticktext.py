"""README.txt and the launchers at the stick's root (kit.builder.sticktext)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kit.builder import sticktext
from kit.builder.sticktext import LAUNCHER_DIR, LAUNCHERS, write_stick_texts
from kit.manifest import BundleManifest, FileEntry, ModelEntry, RuntimeEntry

MODEL_FILE = "models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf"


def manifest(runtimes=("linux-x86_64", "windows-x86_64")) -> BundleManifest:
    model = ModelEntry(id="gemma-3-270m", name="Gemma 3 270M (Q4_K_M)", files=(MODEL_FILE,), quant="Q4_K_M",
                       params=268_098_176, context_length=32768, licence="Gemma Terms of Use")
    entries = [RuntimeEntry(p, f"runtimes/{p}/{'kit.exe' if p.startswith('windows') else 'kit'}") for p in runtimes]
    files = [FileEntry(MODEL_FILE, 253_112_096, "a" * 64, "b" * 64)]
    files += [FileEntry(r.entry, 10, "c" * 64, "d" * 64) for r in entries]
    return BundleManifest(kit_version="0.1.0", created="2025-11-22T16:00:00Z", profile="demo",
                          models=(model,), runtimes=tuple(entries), files=tuple(files))


@pytest.fixture
def target(tmp_path) -> Path:
    stick = tmp_path / "stick"
    runtime = stick / "KIT" / "runtimes" / "linux-x86_64"
    runtime.mkdir(parents=True)
    (runtime / "kit-runtime.json").write_text(json.dumps({"platform": "linux-x86_64", "glibc": "2.36"}))
    return stick


def read_readme(stick: Path) -> str:
    raw = (stick / "README.txt").read_bytes()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout, for Notepad
    return raw.decode("utf-8").replace("\r\n", "\n")


def test_readme_says_what_how_to_start_and_how_to_check(target):
    write_stick_texts(target, manifest())
    text = read_readme(target)
    for expected in ("offline", "START-windows.bat", "START-macos.command", "sh START-linux.sh",
                     "exFAT", "FAT32", "Permission denied", "noexec",
                     "xattr -dr com.apple.quarantine", "b3sum -c B3SUMS", "sha256sum -c SHA256SUMS", "cd KIT",
                     "Gemma 3 270M (Q4_K_M)", "licence: Gemma Terms of Use", "268M parameters", "241.4 MiB",
                     "linux-x86_64, windows-x86_64", "glibc 2.36 or newer", "kit 0.1.0", "2025-11-22T16:00:00Z"):
        assert expected in text, expected
    assert max(len(line) for line in text.splitlines()) <= 100


def test_readme_without_linux_runtime_does_not_mention_glibc(tmp_path):
    write_stick_texts(tmp_path, manifest(runtimes=("windows-x86_64",)))
    text = read_readme(tmp_path)
    assert "glibc" not in text and "programs for: windows-x86_64." in text


def test_launchers_are_copied_executable_with_their_line_endings(target):
    write_stick_texts(target, manifest())
    for name, newline in LAUNCHERS.items():
        written = (target / name).read_bytes()
        source = (LAUNCHER_DIR / name).read_bytes().replace(b"\r\n", b"\n")
        assert written.replace(b"\r\n", b"\n") == source
        if newline == "\n":
            assert b"\r" not in written and os.access(target / name, os.X_OK)
        else:
            assert written.count(b"\n") == written.count(b"\r\n")


def test_a_crlf_checkout_still_gives_working_shell_launchers(target, tmp_path, monkeypatch):
    """A Windows checkout (core.autocrlf) must not put '\\r' into the shell scripts on the stick."""
    crlf_dir = tmp_path / "crlf-launchers"
    crlf_dir.mkdir()
    for name in LAUNCHERS:
        lf = (LAUNCHER_DIR / name).read_bytes().replace(b"\r\n", b"\n")
        (crlf_dir / name).write_bytes(lf.replace(b"\n", b"\r\n"))
    monkeypatch.setattr(sticktext, "LAUNCHER_DIR", crlf_dir)
    write_stick_texts(target, manifest())
    assert b"\r" not in (target / "START-linux.sh").read_bytes()


def test_rewriting_replaces_the_texts_and_leaves_no_temp_files(target):
    write_stick_texts(target, manifest())
    (target / "README.txt").write_text("stale")
    write_stick_texts(target, manifest())
    assert "SURVIVAL KIT" in read_readme(target)
    assert sorted(p.name for p in target.iterdir()) == ["KIT", "README.txt", *sorted(LAUNCHERS)]


def test_texts_stay_outside_kit_and_the_manifest(target):
    m = manifest()
    write_stick_texts(target, m)
    listed = {f.path for f in m.files}
    assert not any(name in p for p in listed for name in [*LAUNCHERS, "README.txt"])
    assert not (target / "KIT" / "README.txt").exists()
