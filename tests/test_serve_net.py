"""`kit serve` across a real network: two network namespaces this test makes, joined by a veth pair
whose addresses exist only inside them. The server runs in namespace A (`ip netns exec A kit
serve`), a real curl in namespace B is the colleague's laptop. --lan: the key is the only way in
(the page itself is public: it asks for the key); without --lan nothing outside A can even connect.
No traffic leaves the namespaces; both are deleted (and the veth pair with them) whatever happens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import servekit
from conftest import apt_install, run_kit

pytestmark = pytest.mark.slow

MODEL_ID = "gemma-3-270m"  # manifests/demo.toml: the alias llama-server answers to
CURL_MAX_S = 120  # one curl, answer included (a 270M model on two cores: seconds)
QUESTION = "How do I purify water?"  # the demo model answers it (manifests/demo.toml)


@dataclass(frozen=True)
class Pair:
    server_ns: str  # A: where kit serve runs
    client_ns: str  # B: the other computer
    server_addr: str  # A's end of the veth pair
    client_addr: str


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root (CAP_SYS_ADMIN): run the suite as root, as CI does")
    if shutil.which("ip") is None:
        apt_install("iproute2")
    if shutil.which("curl") is None:
        apt_install("curl")
    pid = os.getpid()
    subnet = f"10.231.{pid % 250 + 2}"  # a private /24 that exists only inside the two namespaces
    found = Pair(f"kit-srv-{pid}", f"kit-cli-{pid}", f"{subnet}.1", f"{subnet}.2")
    made: list[str] = []
    try:
        for ns in (found.server_ns, found.client_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        # made inside A with its peer inside B: the host's own namespace never sees either end
        _ip("-n", found.server_ns, "link", "add", "kitv0", "type", "veth", "peer", "name", "kitv1",
            "netns", found.client_ns)
        for ns, dev, addr in ((found.server_ns, "kitv0", found.server_addr),
                              (found.client_ns, "kitv1", found.client_addr)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield found
    finally:
        for ns in made:  # deleting A also deletes the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert not any(ns in leftover for ns in made), f"namespaces left behind: {leftover}"


@pytest.fixture(scope="module")
def stick(demo_stick) -> Path:
    """The demo stick with its CPU kernel probe cached: a cold probe of every variant can take
    minutes on two cores, longer than servekit waits for the banner."""
    run_kit("doctor", "--stick", str(demo_stick), "--json", timeout=900, check=True)
    return demo_stick


@dataclass(frozen=True)
class Curl:
    exit: int  # curl's own code: 0 done, 7 could not connect
    status: int  # HTTP status, 0 without a response
    body: str


def curl(ns: str, url: str, *, key: str | None = None, body: dict | None = None) -> Curl:
    """A real curl run inside namespace `ns`; never through a proxy."""
    marker = "\n__HTTP_STATUS__"
    cmd = ["ip", "netns", "exec", ns, "curl", "-sS", "--noproxy", "*", "--connect-timeout", "5",
           "--max-time", str(CURL_MAX_S), "-w", marker + "%{http_code}"]
    if key is not None:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=CURL_MAX_S + 30)
    text, _, status = done.stdout.rpartition(marker)
    return Curl(done.returncode, int(status) if status.strip().isdigit() else 0, text)


def chat_body() -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40,
            "temperature": 0}


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _stopped_cleanly(served: servekit.Served, children: list[int]) -> None:
    assert served.proc.returncode == 0, served.text()
    deadline = time.monotonic() + 15
    while not all(_gone(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in children), f"llama-server {children} outlived kit serve"


def test_lan_serves_the_other_computer_with_the_key_only(stick, pair):
    served = servekit.start_serve(stick, "--lan", prefix=["ip", "netns", "exec", pair.server_ns])
    children = served.server_pids()
    try:
        assert children, f"no llama-server child:\n{served.text()}"
        assert served.key, f"--lan printed no key:\n{served.text()}"
        url = f"http://{pair.server_addr}:{served.port}"
        network_lines = [ln for ln in served.out if "on the network:" in ln]
        assert any(f"{url}/" in ln for ln in network_lines), f"banner lacks {url}/:\n{served.text()}"

        models = curl(pair.client_ns, url + "/v1/models", key=served.key)
        assert (models.exit, models.status) == (0, 200), models
        assert MODEL_ID in [m["id"] for m in json.loads(models.body)["data"]]

        answer = curl(pair.client_ns, url + "/v1/chat/completions", key=served.key, body=chat_body())
        assert (answer.exit, answer.status) == (0, 200), answer
        content = json.loads(answer.body)["choices"][0]["message"]["content"]
        assert content.strip(), f"empty answer: {answer.body}"
        print(f"answer from namespace {pair.client_ns}: {content.strip()[:120]!r}")

        for key in (None, "wrong-" + served.key):
            for path, body in (("/v1/models", None), ("/v1/chat/completions", chat_body())):
                refused = curl(pair.client_ns, url + path, key=key, body=body)
                assert (refused.exit, refused.status) == (0, 401), (key, path, refused)
                assert "choices" not in refused.body

        page = curl(pair.client_ns, url + "/")  # the page is public: it asks for the key itself
        assert (page.exit, page.status) == (0, 200), page.body[:300]
        assert "<html" in page.body.lower() and '"needs_key": true' in page.body
        assert served.proc.poll() is None, served.text()
    finally:
        servekit.stop_serve(served)
    _stopped_cleanly(served, children)


def test_loopback_only_cannot_be_reached_from_the_other_computer(stick, pair):
    served = servekit.start_serve(stick, prefix=["ip", "netns", "exec", pair.server_ns])
    children = served.server_pids()
    try:
        assert children, f"no llama-server child:\n{served.text()}"
        assert served.key is None, f"a key on loopback:\n{served.text()}"
        assert not any("on the network:" in ln for ln in served.out), served.text()

        for path in ("/health", "/v1/models", "/"):
            outside = curl(pair.client_ns, f"http://{pair.server_addr}:{served.port}{path}")
            assert (outside.exit, outside.status) == (7, 0), outside  # connection refused: nothing listens there

        # A's own address, from inside A: still not bound (127.0.0.1 only)
        own = curl(pair.server_ns, f"http://{pair.server_addr}:{served.port}/health")
        assert own.exit == 7, own

        inside = curl(pair.server_ns, f"http://127.0.0.1:{served.port}/v1/models")
        assert (inside.exit, inside.status) == (0, 200), inside
        answer = curl(pair.server_ns, f"http://127.0.0.1:{served.port}/v1/chat/completions", body=chat_body())
        assert (answer.exit, answer.status) == (0, 200), answer
        assert json.loads(answer.body)["choices"][0]["message"]["content"].strip(), answer.body
        assert served.proc.poll() is None, served.text()
    finally:
        servekit.stop_serve(served)
    _stopped_cleanly(served, children)
