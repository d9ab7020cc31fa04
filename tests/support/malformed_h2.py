"""An ADS call on raw HTTP/2 whose header value is not text, as a hostile client sends it: grpc must not log it.

Shared by the unit test of the gRPC log bridge and the end-to-end flood test, which send the same call.
"""

from __future__ import annotations

import socket
import struct

from controlplane.xds.server import SERVICE

from .ports import LOOPBACK

MARKER = b"MARKERSECRET_H2"
REQUESTS = 20


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing (lengths under 127 bytes)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def send_malformed_header(port: int) -> None:
    """An ADS call whose custom header value holds bytes that are not UTF-8, the client's secret among them."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", f"/{SERVICE}/StreamAggregatedResources".encode()),
        (b":authority", b"xds"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"x-marker", b"\xff\xfe" + MARKER),
    ]
    block = b"".join(_literal(name, value) for name, value in headers)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")
    with socket.create_connection((LOOPBACK, port), timeout=5.0) as sock:
        sock.sendall(preface + _frame(1, 4, 1, block) + _frame(0, 1, 1, b"\x00\x00\x00\x00\x00"))
        sock.settimeout(0.2)
        try:
            while sock.recv(4096):  # until the server answers and closes, or goes quiet
                pass
        except TimeoutError:
            pass
