"""Which stick a command uses: --stick, KIT_BUNDLE, the runtime's own stick, or the folder it runs in."""

from __future__ import annotations

import json

import pytest
from conftest import run_kit

from kit.errors import BundleNotFoundError
from kit.paths import enclosing_bundle, find_bundle


@pytest.fixture
def fake_stick(tmp_path):
    """The shape find_bundle looks for: STICK/KIT/bundle.json (contents are not read here)."""
    stick = tmp_path / "stick"
    (stick / "KIT" / "models" / "demo").mkdir(parents=True)
    (stick / "KIT" / "bundle.json").write_text("{}")
    return stick


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("KIT_BUNDLE", raising=False)


@pytest.mark.parametrize("below", ["", "KIT", "KIT/models", "KIT/models/demo"])
def test_the_stick_is_found_from_its_root_and_any_folder_below_it(fake_stick, below, monkeypatch, no_env):
    monkeypatch.chdir(fake_stick / below)
    found = find_bundle()
    assert found.root == fake_stick and found.kit == fake_stick / "KIT"


def test_a_folder_named_kit_without_a_manifest_is_not_a_stick(tmp_path, monkeypatch, no_env):
    (tmp_path / "projects" / "KIT" / "notes").mkdir(parents=True)
    assert enclosing_bundle(tmp_path / "projects" / "KIT" / "notes") is None
    monkeypatch.chdir(tmp_path / "projects" / "KIT" / "notes")
    with pytest.raises(BundleNotFoundError) as err:
        find_bundle()
    assert "not on a stick" in str(err.value) and "inside the stick's folder" in err.value.hint


def test_an_interrupted_build_is_still_found_so_it_can_say_incomplete(fake_stick, no_env):
    (fake_stick / "KIT" / "bundle.json").unlink()
    (fake_stick / "KIT" / "INCOMPLETE").write_text("build")
    assert enclosing_bundle(fake_stick / "KIT" / "models").root == fake_stick


def test_an_explicit_stick_or_kit_bundle_wins_over_the_working_folder(fake_stick, tmp_path, monkeypatch):
    other = tmp_path / "other"
    (other / "KIT").mkdir(parents=True)
    monkeypatch.chdir(fake_stick / "KIT" / "models")
    assert find_bundle(other).root == other
    monkeypatch.setenv("KIT_BUNDLE", str(other))
    assert find_bundle().root == other
    monkeypatch.setenv("KIT_BUNDLE", str(tmp_path / "nowhere"))
    with pytest.raises(BundleNotFoundError, match="KIT_BUNDLE"):
        find_bundle()


@pytest.mark.slow
def test_verify_and_doctor_run_from_inside_a_real_stick(demo_stick):
    inside = demo_stick / "KIT" / "models"
    env = {"KIT_BUNDLE": ""}
    done = run_kit("verify", "--json", cwd=inside, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stick"] == str(demo_stick)
    doctor = run_kit("doctor", cwd=inside, env=env, timeout=900)
    assert doctor.returncode == 0, doctor.stderr
    assert f"Stick: {demo_stick}" in doctor.stdout  # which stick it used
    outside = run_kit("verify", cwd=demo_stick.parent, env=env)
    assert outside.returncode != 0 and outside.stderr.count("\n") <= 2
    assert "not on a stick" in outside.stderr and "--stick" in outside.stderr
