"""The command line on a real stick: verify (and its --json contract), doctor, ask offline, errors."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_kit

from kit.medium import ROOT_FILES

pytestmark = pytest.mark.slow

VERIFY_KEYS = {"ok", "counts", "bytes_hashed", "seconds", "files", "stick", "signer"}
FILE_KEYS = {"path", "state", "detail", "expected_size", "actual_size"}


def test_verify_json_contract(demo_stick):
    done = run_kit("verify", str(demo_stick), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == VERIFY_KEYS
    # KIT/'s files (the model and its licence texts, the demo pack's index and licence), then
    # README.txt and the launchers at the stick's root
    ok = 5 + len(ROOT_FILES)
    assert report["ok"] is True and report["counts"] == {"ok": ok, "corrupt": 0, "missing": 0, "unexpected": 0}
    assert all(set(f) == FILE_KEYS and f["state"] == "ok" for f in report["files"])


def test_verify_damaged_stick_exits_non_zero(stick_copy):
    model = next((stick_copy / "KIT" / "models").rglob("*.gguf"))
    with open(model, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02")
    done = run_kit("verify", str(stick_copy))
    assert done.returncode == 4
    assert "CORRUPT" in done.stdout and "BLAKE3 mismatch" in done.stdout and "damaged" in done.stdout
    report = json.loads(run_kit("verify", str(stick_copy), "--json").stdout)
    assert report["ok"] is False and report["counts"]["corrupt"] == 1


def test_doctor_names_a_working_fast_kernel(demo_stick):
    done = run_kit("doctor", "--stick", str(demo_stick), "--json", timeout=900)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    kernel = report["kernel"]
    assert kernel["chosen"] not in ("sapphirerapids", "x64", "sse42")
    states = {r["variant"]: r["state"] for r in kernel["results"]}
    assert states[kernel["chosen"]] == "ok"
    assert report["plan"]["model_id"] == "gemma-3-270m"
    assert report["plan"]["cpu_variant"] == kernel["chosen"]
    assert report["plan"]["threads"] >= 1 and report["plan"]["n_ctx"] >= 512
    text = run_kit("doctor", "--stick", str(demo_stick)).stdout
    assert f"* {kernel['chosen']}" in text and "Plan: model gemma-3-270m" in text


def test_ask_answers_with_no_network(demo_stick):
    assert shutil.which("unshare"), "util-linux unshare is needed"
    done = run_kit("ask", "--stick", str(demo_stick), "--max-tokens", "40", "--temperature", "0",
                   "How do I purify water?",
                   prefix=["unshare", "-n"], timeout=900)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) >= 8 and "water" in done.stdout.lower()
    assert "tok/s" in done.stderr and "kernel" in done.stderr


def test_errors_are_one_line_with_a_fix(tmp_path, stick_copy):
    done = run_kit("verify", str(tmp_path))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.startswith("kit: ") and "what to do:" in done.stderr
    (stick_copy / "KIT" / "INCOMPLETE").write_text("")
    done = run_kit("ask", "--stick", str(stick_copy), "hello")
    assert done.returncode == 3 and "incomplete" in done.stderr and "Traceback" not in done.stderr
    done = run_kit("ask", "--stick", str(tmp_path), "")
    assert done.returncode != 0 and "Traceback" not in done.stderr


def test_bad_override_is_refused(demo_stick):
    done = run_kit("ask", "--stick", str(demo_stick), "--model", "nope", "hello")
    assert done.returncode == 1 and "nope" in done.stderr and "gemma-3-270m" in done.stderr
