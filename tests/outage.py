"""A TCP proxy on loopback that a test can cut and restore: a network outage of a server.

The moto S3 server keeps its objects in memory, so stopping its process would also
lose what was written before the stop; real object storage keeps it. A test that wants
"the S3 endpoint went away mid-write, then came back" points the client at this proxy
and cuts it: clients get connection errors, the server behind it keeps its data.
``cut_on(marker, after)`` cuts once ``after`` bytes have gone from client to server
past ``marker`` (e.g. the request line of an upload), so a request can be stopped in
the middle of its body.
"""

from __future__ import annotations

import socket
import threading


class Outage:
    """``Outage(("127.0.0.1", port))``: listens on ``self.port``; ``cut()``, ``restore()``."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = 0
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._marker: bytes | None = None  # cut armed: once this goes through ...
        self._after = 0  # ... and then this many bytes
        self._budget: int | None = None  # bytes that still go through; None: not seen
        self.cuts = 0
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        """Listen again, on the same port as before (the client keeps its endpoint)."""
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self.port = server.getsockname()[1]
        with self._lock:
            self._server, self._marker, self._budget = server, None, None
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening and reset every open connection: the server is unreachable."""
        with self._lock:
            server, conns, self._server, self._conns = self._server, self._conns, None, []
            self._marker = self._budget = None
            self.cuts += 1
        if server is not None:
            server.close()
        for conn in conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()  # SO_LINGER 0: a reset, as a crashed server gives
            except OSError:
                pass

    def cut_on(self, marker: bytes, after: int = 0) -> None:
        """Cut once ``marker`` and then ``after`` more bytes went from a client to the server."""
        with self._lock:
            self._marker, self._after, self._budget = marker, after, None

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:  # cut meanwhile
                    client.close(), upstream.close()
                    return
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        tail = b""  # the end of the previous chunk: a marker may straddle two chunks
        try:
            while data := src.recv(65536):
                keep = len(data)  # bytes of this chunk that get through
                if to_server:
                    with self._lock:
                        if self._marker is not None and self._budget is None:
                            found = (tail + data).find(self._marker)
                            if found >= 0:
                                self._budget = found - len(tail) + len(self._marker) + self._after
                        if self._budget is not None:
                            keep = min(keep, max(self._budget, 0))
                            self._budget -= len(data)
                    tail = data[-64:]
                if keep < len(data):
                    dst.sendall(data[:keep])  # part of the request gets through
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
