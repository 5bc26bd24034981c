"""The socket the API listens on, with the options its limits rely on; the entry point hands it to uvicorn."""

from __future__ import annotations

import socket


def listening_socket(host: str, port: int, *, write_timeout_s: float) -> socket.socket:
    """A bound TCP socket (port 0: any free one) whose accepted connections inherit TCP_USER_TIMEOUT: the kernel
    drops a connection whose sent bytes stay unacknowledged for `write_timeout_s`, also while the client keeps
    its receive window shut. The window of a client that never reads its event stream fills after some tens of
    KiB, so it is dropped soon after, not once megabytes of our send buffers have filled too; its stream then
    sees the disconnect and gives its slot back."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux; elsewhere only the event streams' send timeout applies
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(write_timeout_s * 1000))
    sock.bind((host, port))
    return sock
