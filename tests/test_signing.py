"""Signing: keys, signatures over bundle.json's exact bytes, and `kit verify --key/--fingerprint`
on real signed sticks (tampered, re-signed by someone else, half-signed, mixed from two sticks)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nacl.signing
import pytest
from conftest import ROOT, run_kit

from kit import launch, signing
from kit.errors import SignatureError
from kit.fsutil import atomic_write
from kit.integrity import hash_file
from kit.paths import find_bundle

# ---------------------------------------------------------------- the primitives (no stick)


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    private, public = tmp_path / "keys" / "kit.key", tmp_path / "keys" / "kit.pub"
    fp = signing.keygen(private, public)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("ed25519-private:") and public.read_text().startswith("ed25519:")
    assert [p.name for p in private.parent.iterdir() if p.name.endswith(".part")] == []  # atomic: no temp left
    key, pub = signing.load_private_key(private), signing.load_public_key(public)
    assert bytes(key.verify_key) == bytes(pub) and signing.fingerprint(pub) == fp
    with pytest.raises(signing.KeyFileError, match="already exists"):
        signing.keygen(private, tmp_path / "other.pub")  # never overwrites a key


def test_keygen_ignores_a_loose_umask(tmp_path):
    old = os.umask(0)
    try:
        signing.keygen(tmp_path / "k", tmp_path / "k.pub")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


@pytest.mark.parametrize("where", ["KIT/k.key", "deep/inside/k.key", "KIT/state/k.key"])
def test_keygen_refuses_a_stick_folder(tmp_path, where):
    (tmp_path / "KIT").mkdir()
    with pytest.raises(signing.KeyFileError, match="inside the stick"):
        signing.keygen(tmp_path / where, tmp_path / "k.pub")
    assert not (tmp_path / where).exists()


def test_sign_and_verify_exact_bytes():
    key = nacl.signing.SigningKey.generate()
    data = b'{"created": "2026-01-01T00:00:00Z"}\n'
    sig = signing.sign(data, key)
    assert len(sig) == 64
    signing.verify(data, sig, key.verify_key)
    for bad_data, bad_sig, bad_key in [
        (data + b" ", sig, key.verify_key),  # one more byte
        (data.replace(b"01", b"02"), sig, key.verify_key),  # a changed date
        (data, bytes([sig[0] ^ 1]) + sig[1:], key.verify_key),  # a flipped signature bit
        (data, sig, nacl.signing.SigningKey.generate().verify_key),  # someone else's key
    ]:
        with pytest.raises(SignatureError):
            signing.verify(bad_data, bad_sig, bad_key)


def test_fingerprint_is_short_stable_and_forgiving_to_type():
    key = nacl.signing.SigningKey(bytes(range(32))).verify_key
    fp = signing.fingerprint(key)
    assert fp == signing.fingerprint(bytes(key))
    assert fp.startswith("ed25519:") and len(fp.split(":")[1].split("-")) == 8
    other = signing.fingerprint(nacl.signing.SigningKey(bytes(range(1, 33))).verify_key)
    assert other != fp
    typed = fp.upper().replace("-", " ").removeprefix("ED25519:")
    assert signing.normalise_fingerprint(typed) == fp
    for bad in ["", "ed25519:1234", "zz" * 16, fp + "00"]:
        with pytest.raises(signing.KeyFileError):
            signing.normalise_fingerprint(bad)


def test_private_key_file_checks(tmp_path):
    private = tmp_path / "k"
    signing.keygen(private, tmp_path / "k.pub")
    private.chmod(0o644)
    with pytest.raises(signing.KeyFileError, match="other users"):
        signing.load_private_key(private)
    private.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(private)
    with pytest.raises(signing.KeyFileError, match="not a regular file"):
        signing.load_private_key(link)
    bad = tmp_path / "bad"
    bad.write_text("ed25519-private:1234\n")
    bad.chmod(0o600)
    with pytest.raises(signing.KeyFileError, match="malformed"):
        signing.load_private_key(bad)
    with pytest.raises(signing.KeyFileError, match="does not exist"):
        signing.load_private_key(tmp_path / "none")
    with pytest.raises(signing.KeyFileError, match="malformed"):
        signing.load_public_key("ed25519:abcd")


# ---------------------------------------------------------------- real signed sticks

@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("maker", "mallory"):
        signing.keygen(folder / name, folder / f"{name}.pub")
        out[name], out[f"{name}.pub"] = folder / name, folder / f"{name}.pub"
    return out


@pytest.fixture(scope="module")
def signed_stick(tmp_path_factory, keys, demo_stick) -> Iterator[Path]:
    target = tmp_path_factory.mktemp("signed") / "stick"
    done = run_kit("build", "--profile", "manifests/demo.toml", "--target", str(target), "--no-freeze",
                   "--sign", str(keys["maker"]), check=True)
    assert "signed by: ed25519:" in done.stdout
    yield target
    shutil.rmtree(target.parent, ignore_errors=True)  # a stick per module: CI's disk is not endless


@pytest.fixture
def signed_copy(signed_stick, tmp_path) -> Path:
    target = tmp_path / "stick"
    shutil.copytree(signed_stick, target, ignore=shutil.ignore_patterns("state"))
    return target


def fp_of(pub: Path) -> str:
    return signing.fingerprint(signing.load_public_key(pub))


def refused(done, *words: str) -> None:
    """Non-zero exit, a one-sentence error and its fix, no traceback."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-2].startswith("kit: ") and "what to do:" in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


@pytest.mark.slow
def test_signed_stick_verifies_with_its_fingerprint(signed_stick, keys):
    kit = signed_stick / "KIT"
    assert (kit / "bundle.json.sig").exists() and (kit / "signer.pub").exists()
    assert (kit / "signer.pub").read_text() == keys["maker.pub"].read_text()
    fp = fp_of(keys["maker.pub"])
    done = run_kit("verify", str(signed_stick))
    assert done.returncode == 0 and f"signed by {fp}" in done.stdout, done.stdout + done.stderr
    assert json.loads(run_kit("verify", str(signed_stick), "--json").stdout)["signer"] == fp
    for option in (["--key", str(keys["maker.pub"])], ["--fingerprint", fp],
                   ["--fingerprint", fp.upper().replace("-", "")], ["--key", keys["maker.pub"].read_text().strip()]):
        done = run_kit("verify", str(signed_stick), *option)
        assert done.returncode == 0 and "the key you gave" in done.stdout, (option, done.stderr)


@pytest.mark.slow
def test_someone_elses_key_is_refused(signed_stick, keys):
    refused(run_kit("verify", str(signed_stick), "--key", str(keys["mallory.pub"])),
            "not signed by the expected key", fp_of(keys["maker.pub"]))
    refused(run_kit("verify", str(signed_stick), "--fingerprint", fp_of(keys["mallory.pub"])), "expected key")


@pytest.mark.slow
def test_unsigned_stick_says_so(demo_stick, keys):
    done = run_kit("verify", str(demo_stick))
    assert done.returncode == 0 and "Signature: unsigned" in done.stdout
    assert json.loads(run_kit("verify", str(demo_stick), "--json").stdout)["signer"] == "unsigned"
    refused(run_kit("verify", str(demo_stick), "--key", str(keys["maker.pub"])), "the stick is unsigned")


@pytest.mark.slow
def test_changed_after_signing_is_refused_everywhere(signed_copy):
    """One byte of bundle.json changed (the profile's name): every front end refuses before parsing."""
    manifest = signed_copy / "KIT" / "bundle.json"
    raw = manifest.read_bytes()
    changed = raw.replace(b'"profile": "demo"', b'"profile": "deme"', 1)
    assert changed != raw
    manifest.write_bytes(changed)
    for command in (["verify", str(signed_copy)], ["ask", "--stick", str(signed_copy), "hi"],
                    ["doctor", "--stick", str(signed_copy)]):
        refused(run_kit(*command, timeout=120), "does not match its signature")


@pytest.mark.slow
def test_resigned_by_someone_else(signed_copy, keys):
    """Mallory changes a file, rewrites the manifest to match and signs it with her own key: the stick
    is self-consistent, so only the signer's identity tells. --key/--fingerprint refuse it, and a plain
    verify prints her fingerprint, not the maker's."""
    kit = signed_copy / "KIT"
    notice = kit / "models" / "gemma-3-270m" / "NOTICE.md"
    notice.write_text("Trust me.\n")
    data = json.loads((kit / "bundle.json").read_bytes())
    digest = hash_file(notice, sha256=True)
    for entry in data["files"]:
        if entry["path"].endswith("NOTICE.md"):
            entry.update(size=digest.size, blake3=digest.blake3, sha256=digest.sha256)
    raw = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    (kit / "bundle.json").write_bytes(raw)
    signing.write_signature(kit, raw, signing.load_private_key(keys["mallory"]))
    done = run_kit("verify", str(signed_copy))
    assert done.returncode == 0 and fp_of(keys["mallory.pub"]) in done.stdout
    assert fp_of(keys["maker.pub"]) not in done.stdout
    refused(run_kit("verify", str(signed_copy), "--key", str(keys["maker.pub"])), fp_of(keys["mallory.pub"]))
    refused(run_kit("verify", str(signed_copy), "--fingerprint", fp_of(keys["maker.pub"])), "expected key")


@pytest.mark.slow
def test_mix_and_match_of_two_sticks_is_refused(signed_copy, tmp_path, keys):
    """bundle.json of one build with the signature (or signer.pub) of another: refused."""
    other = tmp_path / "other"
    run_kit("build", "--profile", "manifests/demo.toml", "--target", str(other), "--no-freeze",
            "--sign", str(keys["mallory"]), check=True)
    kit, okit = signed_copy / "KIT", other / "KIT"
    original = {n: (kit / n).read_bytes() for n in ("bundle.json.sig", "signer.pub")}
    for name in ("bundle.json.sig", "signer.pub"):
        shutil.copy(okit / name, kit / name)
        refused(run_kit("verify", str(signed_copy)), "does not match its signature")
        (kit / name).write_bytes(original[name])
    assert run_kit("verify", str(signed_copy)).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["no signer.pub", "no signature", "garbage signature",
                                    "signature is a FIFO", "signer.pub is a link", "huge signer.pub"])
def test_broken_signature_files_are_refused(signed_copy, damage):
    kit = signed_copy / "KIT"
    sig, pub = kit / "bundle.json.sig", kit / "signer.pub"
    if damage == "no signer.pub":
        pub.unlink()
    elif damage == "no signature":
        sig.unlink()
    elif damage == "garbage signature":
        sig.write_text("not hex\n")
    elif damage == "signature is a FIFO":  # reading it would hang: lstat refuses it first
        sig.unlink()
        os.mkfifo(sig)
    elif damage == "signer.pub is a link":
        target = signed_copy / "elsewhere.pub"
        shutil.move(pub, target)
        pub.symlink_to(target)
    else:
        pub.write_bytes(b"ed25519:" + b"0" * 10_000)
    refused(run_kit("verify", str(signed_copy), timeout=60))


@pytest.mark.slow
def test_unsigned_rebuild_drops_the_old_signature(signed_copy):
    run_kit("build", "--profile", "manifests/demo.toml", "--target", str(signed_copy), "--no-freeze", check=True)
    assert not (signed_copy / "KIT" / "bundle.json.sig").exists()
    done = run_kit("verify", str(signed_copy))
    assert done.returncode == 0 and "unsigned" in done.stdout


@pytest.mark.slow
def test_build_refuses_a_key_on_the_stick_before_copying(tmp_path):
    target = tmp_path / "stick"
    key = target / "keys" / "k"
    key.parent.mkdir(parents=True)
    atomic_write(key, b"ed25519-private:" + b"00" * 32 + b"\n", mode=signing.PRIVATE_MODE)
    refused(run_kit("build", "--profile", "manifests/demo.toml", "--target", str(target), "--no-freeze",
                    "--sign", str(key)), "inside the stick")
    assert not (target / "KIT").exists()


def test_keygen_command(tmp_path):
    done = run_kit("keygen", str(tmp_path / "me.key"))
    assert done.returncode == 0 and "fingerprint: ed25519:" in done.stdout
    assert fp_of(tmp_path / "me.key.pub") in done.stdout
    refused(run_kit("keygen", str(tmp_path / "me.key")), "already exists")


# ---------------------------------------------------------------- the runtime's own checks


@pytest.mark.slow
def test_launch_reports_the_signer(signed_copy, demo_stick, keys):
    # In a child: the opening sequence goes offline and records what it saw, for good.
    code = ("import json, sys; from kit import launch; o = launch.open_stick(sys.argv[1]); "
            "print(json.dumps([o.trust.signer_label, o.trust.raw == o.bundle.manifest.read_bytes()]))")
    done = subprocess.run([sys.executable, "-c", code, str(signed_copy)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [fp_of(keys["maker.pub"]), True]
    assert signing.check_stick(find_bundle(demo_stick)).signer_label == "unsigned"


def add_runtime(stick: Path, platform: str = "linux-x86_64") -> Path:
    """A stand-in runtime (an entry and a llama.cpp library) listed in the stick's manifest, as a
    frozen runtime would be; returns the library's path."""
    kit = stick / "KIT"
    base = kit / "runtimes" / platform
    lib = base / "_internal" / "llama_cpp" / "lib" / "libllama.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF" + os.urandom(4096))
    (base / "kit").write_bytes(b"#!/bin/sh\n")
    data = json.loads((kit / "bundle.json").read_bytes())
    for path in (lib, base / "kit"):
        d = hash_file(path, sha256=True)
        data["files"].append({"path": path.relative_to(kit).as_posix(), "size": d.size, "blake3": d.blake3,
                              "sha256": d.sha256})
    data["runtimes"].append({"platform": platform, "entry": f"runtimes/{platform}/kit"})
    (kit / "bundle.json").write_bytes(json.dumps(data, indent=2).encode())
    return lib


@pytest.mark.slow
def test_runtime_checks_its_own_libraries(stick_copy, monkeypatch):
    lib = add_runtime(stick_copy)
    bundle = find_bundle(stick_copy)
    manifest = signing.check_stick(bundle).manifest
    assert any(f.path.endswith("libllama.so") for f in manifest.runtime_files("linux-x86_64"))
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    launch.verify_own_libraries(bundle, manifest, "linux-x86_64")  # intact: passes
    with open(lib, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x90\x90")
    with pytest.raises(Exception, match="llama.cpp libraries are damaged: .*libllama.so is corrupt"):
        launch.verify_own_libraries(bundle, manifest, "linux-x86_64")
    done = run_kit("verify", str(stick_copy))  # and the manifest covers the runtime for kit verify too
    assert done.returncode == 4 and "libllama.so" in done.stdout


@pytest.mark.slow
def test_a_library_dropped_into_the_runtime_is_unexpected(stick_copy):
    lib = add_runtime(stick_copy)
    (lib.parent / "libggml-cpu-evil.so").write_bytes(b"\x7fELF")
    done = run_kit("verify", str(stick_copy))
    assert done.returncode == 4 and "UNEXPECTED" in done.stdout and "libggml-cpu-evil.so" in done.stdout
