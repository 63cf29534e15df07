"""Addresses: the host in a gRPC address, and whether it is loopback (what the
local development credentials and DYADLAB_INSECURE=1 are limited to)."""

from __future__ import annotations

import ipaddress
import re


def host_of(addr: str) -> str:
    """'127.0.0.1:50061' -> '127.0.0.1'; '[::1]:5' -> '::1'; 'dns:///x:5' -> 'x'."""
    a = re.sub(r"^(dns:(//[^/]*)?/|ipv4:|ipv6:)", "", addr.strip())
    if a.startswith("["):
        return a[1:].partition("]")[0]
    if a.count(":") == 1:
        return a.partition(":")[0]
    return a


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
