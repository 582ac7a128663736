"""The gateway's listening socket: with reuse_port, several gateway processes on a host share one port."""

from __future__ import annotations

import socket

import pytest

from gateway.listener import listening_socket
from tests.fixtures.processes import free_port


def test_with_reuse_port_two_listeners_share_the_port_and_both_accept():
    port = free_port()
    first = listening_socket("127.0.0.1", port, reuse_port=True)
    second = listening_socket("127.0.0.1", port, reuse_port=True)
    try:
        accepted = {first: 0, second: 0}
        for listener in (first, second):
            listener.setblocking(True)
            listener.settimeout(0.05)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        for listener in (first, second):  # the kernel spreads connections over both listeners
            while True:
                try:
                    listener.accept()[0].close()
                    accepted[listener] += 1
                except TimeoutError:
                    break
        assert sum(accepted.values()) == len(clients)
        assert all(accepted.values()), f"one listener took every connection: {list(accepted.values())}"
        for client in clients:
            client.close()
    finally:
        first.close()
        second.close()


def test_without_reuse_port_a_second_listener_is_refused():
    port = free_port()
    first = listening_socket("127.0.0.1", port, reuse_port=False)
    try:
        with pytest.raises(OSError):
            listening_socket("127.0.0.1", port, reuse_port=False)
    finally:
        first.close()
