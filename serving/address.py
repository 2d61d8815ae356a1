"""HOST:PORT written the way gRPC targets and URLs need it, and why one cannot be listened on."""

from __future__ import annotations

import errno
import socket


def host_port(host: str, port: int) -> str:
    """`host`:`port`, with an IPv6 literal in brackets ([::1]:8001): gRPC reads "::1:8001" as
    another address altogether."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def listen_problem(host: str, port: int) -> str | None:
    """Why a server cannot listen on `host`:`port`, found by binding a plain socket there first (and
    closing it), or None: gRPC's own bind failure says only "Failed to bind", after printing a core log
    line of its own."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        return f"--host {host} does not resolve: {error.strerror}; give an address or a name of this machine"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return "the port is taken: pick another --port, or 0 for a free one"
            if error.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine: give one of its addresses, or 0.0.0.0 for all"
            return f"{error.strerror or error}"
    return None
