"""bench/: the quick benchmark runs end to end and prints every table with numeric ratios (so the
scripts cannot rot), plus the small pure helpers. No test asserts that a target is met: timings on
a shared machine are not pass/fail material; docs/BENCHMARKS.md holds the measured numbers."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, apt_install

sys.path.insert(0, str(ROOT))

from bench import run as bench_run  # noqa: E402
from bench.chat_terminal import QUICK_WINDOW  # noqa: E402
from bench.common import Ratio, compare, compare_paired, interleave, median, table  # noqa: E402
from bench.kernel_choice import ggml_pick, share_of_fastest  # noqa: E402
from bench.serve import bare_argv, concurrent_round, percentile, request_body  # noqa: E402

TITLES = ["## Machine", "## 1. Engine overhead", "## 2. Kernel choice", "## 3. Verification",
          "## 4. Launch to first token", "## 5. Footprint", "## 7. Chat in a real terminal", "## 8. Serving a team",
          "## 9. Pooling laptops", "## 10. Knowledge", "## 11. GPUs through Vulkan", "## Summary"]
COMPARED = ["engine prompt", "engine generation", "engine decode only", "chat stream generation",
            "kernel: kit's choice / fastest working", "kernel with a CPU hog: kit's choice / fastest working",
            "verify+load / load alone (cold cache)", "sealed copy + load / load alone (cold cache)",
            "sealed copy + load / load alone (warm cache)",
            "launch to first token, kit / llama.cpp CLI", "launch to first token on a new host, seconds",
            f"chat: last {QUICK_WINDOW} / first {QUICK_WINDOW} tokens", f"chat last {QUICK_WINDOW} tokens / kit ask",
            "serve: 4 streams / 1 stream, kit serve", "serve: kit serve / bare llama-server, 1 stream",
            "serve: kit serve / bare llama-server, 4 streams"]
PAIRED = ["engine prompt", "engine generation", "engine decode only", "chat stream generation",
          "serve: 4 streams / 1 stream, kit serve", "serve: 4 streams / 1 stream, bare llama-server",
          "serve: kit serve / bare llama-server, 1 stream", "serve: kit serve / bare llama-server, 4 streams"]
# medians, the least disturbed runs, and (where the samples are pairs) the median of the pairs
KNOWLEDGE = ["retrieval recall@5 on the demo pack", "search latency p95 over 10000+ passages, ms",
             "search latency p95 in a 10000-article Kiwix archive, ms"]
GPU = ["gpu: kit's choice / fastest working backend"]
RATIOS = set(COMPARED) | {f"{name}, best runs" for name in COMPARED} | {f"{name}, median of pairs" for name in PAIRED} \
    | set(KNOWLEDGE) | set(GPU)
RATIO_LINE = re.compile(r"^ratio (.+) = (\S+) \(target (<=|>=) ([\d.]+)\): (met|MISSED)", re.M)


def test_interleave_alternates_the_runs():
    calls = []
    a, b = interleave(3, lambda: calls.append("a") or 1, lambda: calls.append("b") or 2)
    assert calls == ["a", "b"] * 3
    assert (a, b) == ([1, 1, 1], [2, 2, 2])


def test_median_skips_runs_that_measured_nothing():
    assert median([3.0, float("nan"), 1.0, 2.0]) == 2.0
    assert math.isnan(median([float("nan")]))


def test_ratio_verdicts_for_floors_ceilings_and_missing_values():
    assert Ratio("floor", 0.98, 0.97).met is True
    assert Ratio("floor", 0.96, 0.97).met is False
    assert Ratio("ceiling", 1.2, 1.15, at_most=True).met is False
    assert Ratio("ceiling", 1.0, 1.15, at_most=True).met is True
    missing = Ratio("nothing", float("nan"), 1.0)
    assert missing.met is None and "not measured" in missing.line()


def test_compare_gives_the_ratio_of_medians_and_of_the_best_runs():
    speeds = compare("speed", [10.0, 20.0, 30.0], [20.0, 20.0, 60.0], 0.97)
    assert [r.value for r in speeds] == [1.0, 0.5]
    times = compare("time", [1.0, 2.0, 9.0], [2.0, 4.0, 4.0], 1.5, times=True)
    assert [r.value for r in times] == [0.5, 0.5] and all(r.at_most for r in times)


def test_share_of_fastest_ignores_variants_that_did_not_work():
    speeds = {"zen4": 60.0, "icelake": 57.0, "sapphirerapids": float("nan")}
    assert share_of_fastest(speeds, "icelake") == 0.95
    assert share_of_fastest(speeds, "sapphirerapids") is None


def test_ggml_pick_is_the_highest_positive_score_and_ignores_crashes():
    assert ggml_pick({"x64": 1, "zen4": 1984, "sapphirerapids": 0, "icelake": "crash"}) == "zen4"
    assert ggml_pick({"sapphirerapids": 0, "icelake": "crash"}) is None


def test_table_pads_columns():
    lines = table(["a", "bb"], [["long cell", "1"]]).splitlines()
    assert lines[0] == "| a         | bb |"
    assert len({len(line) for line in lines}) == 1


def test_percentile_interpolates_between_ranks_and_skips_missing_values():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([7.0, None, float("nan")], 95) == 7.0
    assert math.isnan(percentile([], 50))


def test_bare_argv_swaps_only_the_sealed_model_the_page_folder_and_the_port():
    argv = ["/x/llama-server", "--model", "/proc/self/fd/3", "--host", "127.0.0.1", "--port", "8080",
            "--path", "/dev/shm/kit-page-1", "--parallel", "4", "--cors-origins", "http://127.0.0.1:8080"]
    bare = bare_argv(argv, Path("/stick/KIT/models/m.gguf"), Path("/tmp/page"), 8081)
    assert bare == [*argv[:2], "/stick/KIT/models/m.gguf", *argv[3:6], "8081", "--path", "/tmp/page",
                    "--parallel", "4", "--cors-origins", "http://127.0.0.1:8081"]
    with pytest.raises(RuntimeError, match="loopback"):
        bare_argv([*argv[:3], "--host", "0.0.0.0", "--port", "8080"], Path("m.gguf"), None, 8081)


def test_paired_ratio_is_the_median_of_the_pairs_not_of_the_medians():
    mine, theirs = [50.0, 100.0, 60.0], [100.0, 100.0, 50.0]
    assert compare_paired("x", mine, theirs, 0.97).value == pytest.approx(1.0)  # 0.5, 1.0, 1.2
    assert median(mine) / median(theirs) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        compare_paired("x", mine, theirs[:2], 0.97)


class _FakeServer(BaseHTTPRequestHandler):
    """llama-server's streaming chat answer in miniature: a role chunk, max_tokens content chunks,
    then usage and timings, then [DONE]."""

    protocol_version = "HTTP/1.1"
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [{"choices": [{"delta": {"role": "assistant", "content": None}}]}]
        events += [{"choices": [{"delta": {"content": f"t{i} "}}]} for i in range(body["max_tokens"])]
        events += [{"choices": [], "usage": {"completion_tokens": body["max_tokens"]},
                    "timings": {"predicted_per_second": 50.0}}]
        for event in [*(f"data: {json.dumps(e)}" for e in events), "data: [DONE]"]:
            data = (event + "\n\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args):
        pass


def test_concurrent_round_counts_every_stream_and_times_the_first_content():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = concurrent_round(server.server_address[1], 4, request_body(5))
    finally:
        server.shutdown()
        server.server_close()
    assert result.streams == 4 and result.tokens == 20 and result.tps > 0
    assert all(s.chunks == 5 and s.server_tps == 50.0 and 0 <= s.ttft <= s.ended - s.sent for s in result.results)
    sent = _FakeServer.bodies[-1]
    assert sent["stream"] and sent["ignore_eos"] and sent["temperature"] == 0 and not sent["cache_prompt"]


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--only", "overhead,warp-drive"])


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first run builds llama.cpp's tools (~10 min on 2 cores, more when busy)
def test_quick_bench_prints_every_table_and_numeric_ratios(tmp_path):
    apt_install("mesa-vulkan-drivers", "libvulkan1", libraries=True)  # section 11's Vulkan device: lavapipe
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=3500, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for title in TITLES:
        assert title in proc.stdout, f"missing table {title!r}"

    printed = {name: float(value) for name, value, *_ in RATIO_LINE.findall(proc.stdout)}
    assert set(printed) == RATIOS
    assert all(math.isfinite(v) and v > 0 for v in printed.values()), printed

    data = json.loads(out.read_text())
    assert data["failures"] == {}
    stored = {r["name"]: r["value"] for s in data["sections"] for r in s["ratios"]}
    assert stored.keys() == printed.keys()
    assert all(abs(stored[name] - printed[name]) < 1e-3 for name in stored)
