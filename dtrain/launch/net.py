"""Socket helpers the launchers share: a free local port, whether a server answers, and whether a Ray address is
a cluster that listens on loopback only."""

from __future__ import annotations

import socket

from dtrain.compat import ray as ray_compat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def loopback_only(address: str) -> bool:
    """Whether address (host:port on loopback) answers there but not on the host's outward address, where Ray
    would first send a connection (a cluster started by `dtrain up` or an embedded Ray)."""
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        return False
    outward = ray_compat.outward_address(host)
    return answers("127.0.0.1", int(port)) and (outward == "127.0.0.1" or not answers(outward, int(port)))
