"""Whether a host:port can be listened on, asked before grpc or the metrics endpoint binds it."""

import errno
import socket

from apikeyd.metrics import split_listen


def port_problem(listen: str) -> str:
    """Binds host:port without SO_REUSEPORT (with SO_REUSEADDR, as grpc binds, so that connections in
    TIME_WAIT do not count) and releases it: "" when free, else why not (a listener of another program, or
    of another apikeyd)."""
    try:
        host, port = split_listen(listen)
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, OSError) as error:
        return str(error)
    bound = 0
    failure: OSError | None = None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind(address)
                bound += 1
            except OSError as error:
                if error.errno in (errno.EADDRINUSE, errno.EACCES):
                    return f"the address is taken ({error.strerror})"
                failure = error
    return "" if bound else str(failure)
