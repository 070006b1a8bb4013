"""The network gate, in child processes (an audit hook cannot be removed from the test process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kit.offline import is_loopback

CHILD = textwrap.dedent("""
    import json, os, socket, socketserver, threading, urllib.request
    from kit import offline
    from kit.errors import OfflineViolation
    offline.go_offline()
    out = {"env": os.environ.get("HF_HUB_OFFLINE")}

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"ok")

    server = socketserver.TCPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.handle_request, daemon=True).start()
    with socket.create_connection(server.server_address, timeout=5) as s:
        out["loopback"] = s.recv(2).decode()
    for name, call in {
        "connect": lambda: socket.create_connection(("93.184.216.34", 80), timeout=5),
        "raw": lambda: socket.socket().connect(("1.1.1.1", 53)),
        "dns": lambda: socket.getaddrinfo("huggingface.co", 443),
        "urllib": lambda: urllib.request.urlopen("http://10.1.2.3/", timeout=5),
    }.items():
        try:
            call()
            out[name] = "connected"
        except OfflineViolation as err:
            out[name] = str(err)
    print(json.dumps(out))
""")


def test_gate_blocks_everything_but_loopback():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    import json

    out = json.loads(done.stdout)
    assert out["env"] == "1"
    assert out["loopback"] == "ok"
    assert out["connect"] == "blocked a network connection to 93.184.216.34:80 from <string>:17 (<lambda>)"
    assert out["raw"] == "blocked a network connection to ('1.1.1.1', 53) from <string>:18 (<lambda>)"
    assert out["dns"] == "blocked a name lookup of 'huggingface.co' from <string>:19 (<lambda>)"
    assert "blocked" in out["urllib"] and "10.1.2.3" in out["urllib"]


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", b"127.0.0.1"))
    assert not any(is_loopback(h) for h in ("10.0.0.1", "8.8.8.8", "example.org", "::2", None, 80))
