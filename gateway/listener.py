"""The gateway's listening socket. With `reuse_port`, several gateway processes on one host bind the same
port (SO_REUSEPORT) and the kernel spreads incoming connections among them: one process per core, each
with its own event loop, worker connections and admission share (TOLLGATE_ADMISSION_GATEWAY_PROCESSES)."""

from __future__ import annotations

import socket

LISTEN_BACKLOG = 4096  # connections the kernel queues for accept() (bursts of new clients)


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener
