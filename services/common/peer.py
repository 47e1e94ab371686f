"""Who is on the other end of a call: the peer's IP address from gRPC's peer string."""

from __future__ import annotations


def peer_ip(peer: str) -> str:
    """The IP of a gRPC peer string such as ``ipv4:10.0.0.1:5000`` or ``ipv6:[::1]:5000``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return kind  # unix sockets and the like: no IP
