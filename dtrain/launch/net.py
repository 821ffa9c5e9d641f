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


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a plain HOST:PORT address; None for anything else (`auto`, `ray://...`)."""
    host, _, port = address.rpartition(":")
    return (host, int(port)) if host and "://" not in host and port.isdigit() else None


def loopback_only(address: str) -> bool:
    """Whether address (host:port on loopback) answers there but not on the host's outward address, where Ray
    would first send a connection (a cluster started by `dtrain up` or an embedded Ray)."""
    parts = host_port(address)
    if parts is None or parts[0] not in ("127.0.0.1", "localhost"):
        return False
    host, port = parts
    outward = ray_compat.outward_address(host)
    return answers("127.0.0.1", port) and (outward == "127.0.0.1" or not answers(outward, port))
