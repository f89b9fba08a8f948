"""A small TCP proxy on 127.0.0.1 that can cut every connection once N bytes have passed.

Put between the tool and a Dovecot listener to simulate a dropped connection at a
deterministic point of a transfer (TLS passes through untouched).
"""

from __future__ import annotations

import socket
import threading


class CuttingProxy:
    def __init__(self, target_port: int, cut_after_bytes: int | None = None,
                 direction: str = "down", cuts: int = 1):
        self.target = ("127.0.0.1", target_port)
        self.cut_after = cut_after_bytes
        self.direction = direction  # "down": server → client bytes; "up": client → server
        self.cuts_left = cuts
        self.cuts_done = 0
        self.connections = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(server, client, "down"),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, "up"),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if direction == self.direction and self._count(len(data)):
                    self.cut_all()
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

    def _count(self, n: int) -> bool:
        with self._lock:
            if self.cut_after is None or self.cuts_left <= 0:
                return False
            self._bytes += n
            if self._bytes >= self.cut_after:
                self.cuts_left -= 1
                self.cuts_done += 1
                self._bytes = 0
                return True
            return False

    def cut_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.cut_all()
