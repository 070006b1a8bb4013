"""Sealed in-memory copies (kit.sealed, kit.integrity): the seals really refuse writes, the registry
accepts the copies, and with the real model and stick the loaded bytes are the bytes checked —
a model changed on disk or a stick that is gone changes nothing; without memfd, the path load."""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, run_kit

from kit import integrity, sealed
from kit.builder.split import split_gguf
from kit.manifest import FileEntry

pytestmark = pytest.mark.skipif(sealed.unsupported() is not None, reason="memfd sealing needs Linux")


def _entry(path: Path, name: str) -> FileEntry:
    digest = integrity.hash_file(path, sha256=True)
    return FileEntry(name, digest.size, digest.blake3, digest.sha256)


def test_seals_refuse_writes_resizes_and_new_seals(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + os.urandom(100_000))
    status, copy = integrity.seal_entry(tmp_path, _entry(tmp_path / "m.gguf", "m.gguf"))
    assert status.state == integrity.OK and copy is not None
    try:
        assert sealed.is_sealed(copy.fd)
        assert copy.path.read_bytes() == (tmp_path / "m.gguf").read_bytes()
        for attempt in (lambda: os.pwrite(copy.fd, b"x", 0), lambda: os.ftruncate(copy.fd, 10),
                        lambda: os.ftruncate(copy.fd, 1 << 20)):
            with pytest.raises(PermissionError) as err:
                attempt()
            assert err.value.errno == errno.EPERM
        with pytest.raises(PermissionError):  # a fresh open for writing, by its /proc name
            with open(copy.path, "r+b", buffering=0) as fh:
                fh.write(b"x")
        with pytest.raises(PermissionError):  # a writable shared mapping is refused too
            mmap.mmap(copy.fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):  # F_SEAL_SEAL: no seal can be added any more
            fcntl.fcntl(copy.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        copy.close()


def test_the_registry_accepts_the_copy_and_ignores_the_file_changing(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(os.urandom(3 * integrity.BLOCK + 5))  # several blocks and a short one
    entry = _entry(model, "m.gguf")
    _, copy = integrity.seal_entry(tmp_path, entry)
    try:
        assert integrity.require_verified(copy.path) == entry.blake3
        model.write_bytes(os.urandom(entry.size))  # the stick's file changes: the copy does not
        assert integrity.require_verified(copy.path) == entry.blake3
        assert integrity.hash_file(copy.path).blake3 == entry.blake3
        with pytest.raises(integrity.NotVerifiedError):
            integrity.require_verified(model)  # the file itself was never verified
    finally:
        copy.close()
    with pytest.raises(integrity.NotVerifiedError):
        integrity.require_verified(copy.path)  # closed: forgotten


def test_a_mismatch_keeps_no_copy(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(os.urandom(1000))
    entry = _entry(model, "m.gguf")
    model.write_bytes(os.urandom(1000))
    before = set(os.listdir("/proc/self/fd"))
    status, copy = integrity.seal_entry(tmp_path, entry)
    assert copy is None and status.state == integrity.CORRUPT and "BLAKE3" in status.detail
    assert set(os.listdir("/proc/self/fd")) <= before  # the memfd was closed


def test_shard_names_follow_llama_cpp_and_go_away(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    names = ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    with sealed.shard_names([a, b], names) as links:
        assert [p.name for p in links] == names and links[0].parent == links[1].parent
        assert links[1].read_bytes() == b"two"
        folder = links[0].parent
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        assert str(folder).startswith(sealed.LINK_ROOTS)  # RAM only, never the host's disk
    assert not folder.exists()


# ---------------------------------------------------------------- the real model, in children

# A kernel is loaded into a process for good, and a crash must not take pytest: children.
CHAT = textwrap.dedent("""
    import json, os, shutil, subprocess, sys
    if sys.argv[2] == "no-memfd":
        del os.memfd_create  # as on a Python or OS without memfd: the kit must see it by itself
    from kit import launch
    stick = sys.argv[1]
    out = {}
    session = launch.start(stick)
    ask = [{"role": "user", "content": "How do I purify water?"}]

    def answer():
        return "".join(session.engine.answer(ask, max_tokens=16, temperature=0.0))

    def maps():
        return sorted({line.split(None, 5)[5].strip() for line in open("/proc/self/maps")
                       if line.count(" ") >= 5 and (".gguf" in line)})

    out["mode"] = session.load_mode.to_dict()
    out["report"] = session.report().to_dict()["load_mode"]
    out["maps"] = maps()
    out["first"] = answer()
    model = launch.model_paths(session.bundle, session.model)
    real = session.bundle.resolve(session.model.files[0])
    with open(real, "r+b") as fh:  # change the model on disk, in place, after it was verified
        size = fh.seek(0, 2)
        fh.seek(size // 3)
        fh.write(b"\\0" * (16 << 20))
    out["after_change"] = answer()
    if sys.argv[2] == "memfd":
        shutil.rmtree(stick)  # the stick's folder is gone ...
        mount = os.path.dirname(stick)
        out["umount"] = subprocess.run(["umount", "-l", mount], capture_output=True, text=True).returncode
        out["after_removal"] = answer()  # ... and the next answer still streams
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def probed_stick(demo_stick, tmp_path_factory) -> Iterator[Path]:
    """A copy of the demo stick whose CPU kernel verdict is cached in its state/ (one probe)."""
    target = tmp_path_factory.mktemp("probed") / "stick"
    shutil.copytree(demo_stick, target)
    run_kit("doctor", "--stick", str(target), check=True)
    yield target
    shutil.rmtree(target.parent, ignore_errors=True)  # a stick per module: CI's disk is not endless


def _chat_child(stick: Path, mode: str, prefix: list[str] = ()) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KIT_LAUNCHER", None)
    proc = subprocess.run([*prefix, sys.executable, "-c", CHAT, str(stick), mode], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_sealed_model_ignores_its_file_changing_and_the_stick_going(probed_stick, tmp_path):
    # the stick on a tmpfs mounted in this child's own mount namespace: it can be unmounted
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=1g kit-test {mount} && cp -a {probed_stick} {mount}/stick && "
              'exec "$@"')
    out = _chat_child(mount / "stick", "memfd", ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                                                 "sh"])
    assert out["mode"]["mode"] == "sealed" and out["report"]["mode"] == "sealed"
    assert out["maps"] and all(m.startswith("/memfd:kit-") for m in out["maps"]), out["maps"]
    assert out["first"].strip()
    assert out["after_change"] == out["first"]
    assert out["umount"] == 0
    assert out["after_removal"] == out["first"]


@pytest.mark.slow
def test_without_memfd_the_model_is_loaded_by_path_and_doctor_says_so(probed_stick, tmp_path):
    stick = tmp_path / "stick"
    shutil.copytree(probed_stick, stick)
    out = _chat_child(stick, "no-memfd")
    assert out["mode"]["mode"] == "path" and "memfd" in out["mode"]["reason"]
    assert out["report"] == out["mode"]
    model = stick / "KIT" / "models"
    assert out["maps"] and all(m.startswith(str(model)) for m in out["maps"]), out["maps"]
    # the control: a model mapped from its file sees the change (what sealing protects against)
    assert out["after_change"] != out["first"]


SPLIT = textwrap.dedent("""
    import json, pathlib, sys
    from kit import engine, ggml, integrity, sealed
    from kit.manifest import FileEntry
    from kit.settings import EngineSettings
    shards = [pathlib.Path(p) for p in sys.argv[1:]]
    copies = []
    for s in shards:
        d = integrity.hash_file(s, sha256=True)
        status, copy = integrity.seal_entry(s.parent, FileEntry(s.name, d.size, d.blake3, d.sha256))
        copies.append(copy)
    for s in shards:
        s.write_bytes(b"")  # the files are gone: only the sealed copies are left
    with sealed.shard_names([c.path for c in copies], [s.name for s in shards]) as links:
        eng = engine.LlamaEngine.load(links, EngineSettings(n_ctx=512, threads=2), model_id="m",
                                      chat_format_fallback="gemma",
                                      variant=ggml.lib_dir() / "libggml-cpu-haswell.so")
        folder = links[0].parent
    ask = [{"role": "user", "content": "How do I purify water?"}]
    print(json.dumps({"answer": "".join(eng.stream(ask, max_tokens=8, temperature=0.0)),
                      "folder_left": folder.exists()}))
""")


@pytest.mark.slow
def test_a_split_model_loads_from_sealed_shards(gemma_path, tmp_path):
    shards = split_gguf(gemma_path, tmp_path / "shards", 180 << 20)  # token_embd alone is 170 MiB
    assert len(shards) == 2
    proc = subprocess.run([sys.executable, "-c", SPLIT, *map(str, shards)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["answer"].strip() and out["folder_left"] is False


@pytest.mark.slow
def test_doctor_says_which_load_mode_and_why(probed_stick):
    data = json.loads(run_kit("doctor", "--stick", str(probed_stick), "--json", check=True).stdout)
    assert data["load_mode"]["mode"] == "sealed" and "sealed memory" in data["load_mode"]["reason"]
    text = run_kit("doctor", "--stick", str(probed_stick), check=True).stdout
    assert "  load: sealed: the model is copied into sealed memory" in text


@pytest.mark.slow
def test_probe_children_inherit_the_sealed_copy_not_the_file(gemma_path, tmp_path):
    """The kernel probe is handed the sealed copy's /proc/self/fd/N: its child gets the same
    descriptor, hashes and loads those bytes, and works with the file gone from disk."""
    from kit import ggml, kernels
    from kit.hardware import detect

    model = tmp_path / "m.gguf"
    shutil.copyfile(gemma_path, model)
    entry = _entry(model, "m.gguf")
    _, copy = integrity.seal_entry(tmp_path, entry)
    model.unlink()  # only the descriptor holds the bytes now
    try:
        variant = next(v for v in ggml.list_variants() if v.name == "haswell")
        result = kernels.probe_variant(variant, copy.path, entry.blake3, 1)
        choice = kernels.choose_kernel(detect(), copy.path, entry.blake3, state=None, refresh=True)
    finally:
        copy.close()
    assert result.state == "ok" and result.gen_tps > 1, result
    assert choice.chosen and any(r.state == "ok" for r in choice.results)


def test_the_descriptor_a_path_names():
    assert sealed.fd_of(sealed.fd_path(7)) == 7
    assert sealed.fd_of("/proc/self/fd/12") == 12
    assert sealed.fd_of("/sticks/a/KIT/models/m.gguf") is None and sealed.fd_of("/proc/self/fd/x") is None
