"""Ports handed to processes that bind them later lie below the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

from services.cluster.local_broker import free_ports


def test_free_ports_are_consecutive_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = free_ports(8)
    assert first >= 10_000 and first + 8 <= low
    held = []
    try:
        for port in range(first, first + 8):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", port))
    finally:
        for s in held:
            s.close()
