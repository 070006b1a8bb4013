"""Verification of a real stick: every kind of damage is named, and hand-check files agree."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import blake3
import pytest

from kit import integrity
from kit.errors import NotVerifiedError
from kit.manifest import load_bundle_manifest
from kit.paths import find_bundle


def open_copy(stick):
    bundle = find_bundle(stick)
    return bundle, load_bundle_manifest(bundle)


def model_file(bundle, manifest):
    return bundle.resolve(manifest.models[0].files[0])


def test_intact_stick_verifies(stick_copy):
    bundle, manifest = open_copy(stick_copy)
    seen = []
    report = integrity.verify_bundle(bundle.kit, manifest, progress=seen.append)
    assert report.ok, report.to_dict()
    assert report.counts()["ok"] == len(manifest.files) + len(manifest.root_files)  # launchers, README.txt
    assert report.bytes_hashed == sum(f.size for f in manifest.files + manifest.root_files)
    last = seen[-1]
    assert last.all_done == last.all_total == report.bytes_hashed and last.rate > 0
    assert all(a.all_done <= b.all_done for a, b in zip(seen, seen[1:], strict=False))


def test_flipped_byte_is_corrupt(stick_copy):
    bundle, manifest = open_copy(stick_copy)
    path = model_file(bundle, manifest)
    with open(path, "r+b") as fh:
        fh.seek(123_456_789)
        byte = fh.read(1)
        fh.seek(123_456_789)
        fh.write(bytes([byte[0] ^ 0x01]))
    report = integrity.verify_bundle(bundle.kit, manifest)
    bad = report.with_state(integrity.CORRUPT)
    assert [f.path for f in bad] == [manifest.models[0].files[0]]
    assert "BLAKE3 mismatch" in bad[0].detail
    assert not report.ok


def test_truncated_file_is_corrupt(stick_copy):
    bundle, manifest = open_copy(stick_copy)
    path = model_file(bundle, manifest)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 1000)
    (bad,) = integrity.verify_bundle(bundle.kit, manifest).with_state(integrity.CORRUPT)
    assert bad.detail.startswith("truncated") and bad.actual_size == size - 1000


def test_missing_and_unexpected_files(stick_copy):
    bundle, manifest = open_copy(stick_copy)
    extra = [p for p in manifest.files if not p.path.endswith(".gguf")][0]
    bundle.resolve(extra.path).unlink()
    (bundle.kit / "models" / "gemma-3-270m" / "evil.gguf").write_bytes(b"GGUF")
    (bundle.kit / "state").mkdir(exist_ok=True)
    (bundle.kit / "state" / "history.json").write_text("{}")  # run-time state is not "unexpected"
    report = integrity.verify_bundle(bundle.kit, manifest)
    assert [f.path for f in report.with_state(integrity.MISSING)] == [extra.path]
    assert [f.path for f in report.with_state(integrity.UNEXPECTED)] == ["models/gemma-3-270m/evil.gguf"]


def test_link_in_place_of_a_file_is_not_followed(stick_copy, tmp_path):
    bundle, manifest = open_copy(stick_copy)
    path = model_file(bundle, manifest)
    moved = tmp_path / "elsewhere.gguf"
    shutil.move(path, moved)
    path.symlink_to(moved)  # same bytes, but through a link: refused all the same
    (bad,) = integrity.verify_bundle(bundle.kit, manifest).with_state(integrity.CORRUPT)
    assert "link" in bad.detail


def test_hash_file_matches_reference_implementations(gemma_path):
    digest = integrity.hash_file(gemma_path, sha256=True)
    data = gemma_path.read_bytes()
    assert digest.blake3 == blake3.blake3(data).hexdigest()
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.size == len(data)


@pytest.mark.parametrize("start, limit", [(0, None), (5, None), (0, 40), (5, 16), (5, 33), (7, 0), (90, 50)])
def test_hashed_blocks_reads_at_most_limit_bytes_from_where_the_file_is(tmp_path, monkeypatch, start, limit):
    monkeypatch.setattr(integrity, "BLOCK", 16)  # several blocks, and limits that end inside one
    data = bytes(range(100))
    path = tmp_path / "data"
    path.write_bytes(data)
    expected = data[start:] if limit is None else data[start:start + limit]  # past the end: what is there
    hasher, counted = integrity.Hasher(sha256=True), []
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        blocks = [bytes(b) for b in integrity.hashed_blocks(fh, hasher, counted.append, limit=limit)]
        assert fh.tell() == start + len(expected)  # not a byte read past the limit
    assert b"".join(blocks) == expected
    assert all(0 < len(b) <= 16 for b in blocks)
    assert counted == [len(b) for b in blocks]
    assert hasher.digest() == integrity.Digest(len(expected), blake3.blake3(expected).hexdigest(),
                                               hashlib.sha256(expected).hexdigest())


def test_hand_check_files_pass_sha256sum(demo_stick):
    kit = demo_stick / "KIT"
    done = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=kit, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (kit / "B3SUMS").read_text().splitlines()
    _, manifest = open_copy(demo_stick)
    assert len(lines) == len(manifest.files)
    for line in lines:
        hexdigest, path = line.split("  ", 1)
        assert blake3.blake3((kit / path).read_bytes()).hexdigest() == hexdigest


def test_only_verified_files_may_load(stick_copy):
    bundle, manifest = open_copy(stick_copy)
    path = model_file(bundle, manifest)
    integrity.forget_verified()
    with pytest.raises(NotVerifiedError, match="not verified"):
        integrity.require_verified(path)
    integrity.verify_bundle(bundle.kit, manifest, only=[manifest.models[0].files[0]])
    assert integrity.require_verified(path) == manifest.file(manifest.models[0].files[0]).blake3
    integrity.forget_verified()  # verified, then forgotten: refused again, until verified anew
    with pytest.raises(NotVerifiedError, match="not verified in this process"):
        integrity.require_verified(path)
    integrity.verify_bundle(bundle.kit, manifest, only=[manifest.models[0].files[0]])
    assert integrity.require_verified(path) == manifest.file(manifest.models[0].files[0]).blake3
    with open(path, "ab") as fh:  # changed after the check: the identity no longer matches
        fh.write(b"x")
    with pytest.raises(NotVerifiedError, match="changed after") as info:
        integrity.require_verified(path)
    assert info.value.hint == "the stick may be failing or was modified while in use"  # not the class's
