"""The one network gate: at run time nothing but loopback may be reached.

An audit hook sees every socket connect and name lookup Python makes, whoever makes it
(huggingface_hub, urllib, a stray library), and refuses non-loopback ones with a clear error.
llama.cpp itself opens no sockets.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import traceback

from kit.errors import OfflineViolation

# Libraries that would otherwise phone home or try to download.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}
_hook_installed = False


def is_loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    host = host.strip("[]").split("%")[0]
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _caller() -> str:
    """The innermost frame outside the socket machinery and this module: who tried to connect."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if not any(part in name for part in ("socket.py", "offline.py", "ssl.py")):
            return f"{os.path.basename(name)}:{frame.lineno} ({frame.name})"
    return "unknown caller"


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect":
        sock, address = args
        if sock.family == getattr(socket, "AF_UNIX", object()):
            return
        host = address[0] if isinstance(address, tuple) else address
        if not is_loopback(host):
            raise OfflineViolation(f"blocked a network connection to {address!r} from {_caller()}")
    elif event == "socket.getaddrinfo":
        host, port = args[0], args[1]
        if host is None or is_loopback(host):
            return
        if _is_ip_literal(host):  # create_connection() resolves even literal addresses
            raise OfflineViolation(f"blocked a network connection to {host}:{port} from {_caller()}")
        raise OfflineViolation(f"blocked a name lookup of {host!r} from {_caller()}")


def _is_ip_literal(host: object) -> bool:
    try:
        ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host))
        return True
    except ValueError:
        return False


def go_offline() -> None:
    """From now on, refuse every non-loopback connection in this process and its children's env."""
    global _hook_installed
    os.environ.update(OFFLINE_ENV)
    if not _hook_installed:
        sys.addaudithook(_audit)  # for the rest of the process: an audit hook cannot be removed
        _hook_installed = True
