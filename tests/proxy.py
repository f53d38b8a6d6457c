"""A TCP proxy a test can cut and restore: a real outage of a real server (connections
refused and reset) without stopping the server other tests share. `partition()` is the
other kind of outage: every connection stays open and nothing gets through, as when the
network between two hosts goes."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    def __init__(self, upstream_host: str, upstream_port: int, listen: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.listen = listen  # the address it accepts on (a veth's, for another namespace)
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._partitioned = False
        self.restore()

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        self._partitioned = False
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset every open one, on both sides: the server
        sees its client go, as it would if the client's host went down."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        # shutdown() first: close() alone does not wake a thread blocked in accept() or
        # recv() on the socket, and the socket stays open (and listening) until it wakes.
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def partition(self) -> None:
        """Let nothing through, on any connection, new or open, while every one stays open:
        neither side hears from the other, or that the other has gone. `cut()` ends it."""
        self._partitioned = True

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._partitioned:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if not self._partitioned:  # across a partition, nobody hears of a close
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.close()
