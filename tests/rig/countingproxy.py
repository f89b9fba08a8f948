"""A TCP proxy on 127.0.0.1 that counts how many connections are open at once.

Put in front of a server to measure what the tool does to it: ``peak`` is the largest
number of client connections open at the same time.  A connection counts as open from
its accept until the client has closed it; the client's close is noticed even before the
pump threads get to it (the kernel's TCP state is read at every accept), so a client
that closes one connection and at once opens the next is never counted twice.
"""

from __future__ import annotations

import socket
import struct
import threading

_TCP_ESTABLISHED = 1


def _client_closed(sock: socket.socket) -> bool:
    """The client sent its FIN (or the socket is gone): tcpi_state left ESTABLISHED."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return True
    return struct.unpack("B", info[:1])[0] != _TCP_ESTABLISHED


class CountingProxy:
    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.connections = 0  # accepted in total
        self.peak = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def open_now(self) -> int:
        with self._lock:
            self._forget_closed()
            return len(self._open)

    def _forget_closed(self) -> None:
        self._open = {s for s in self._open if not _client_closed(s)}

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._forget_closed()
                self._open.add(client)
                self.connections += 1
                self.peak = max(self.peak, len(self._open))
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                self._done(client)
                client.close()
                continue
            threading.Thread(target=self._pump, args=(server, client, client),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, client),
                             daemon=True).start()

    def _done(self, client: socket.socket) -> None:
        with self._lock:
            self._open.discard(client)

    def _pump(self, src: socket.socket, dst: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._done(client)
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()
