"""Big mailboxes filled fast, and a mailmigrate process to interrupt while it copies."""

from __future__ import annotations

import collections
import random
import subprocess
import sys
import threading
import time

import pytest

from tests.rig import mailgen
from tests.rig.proxy import CuttingProxy


def fill_many(account, count: int, folder: str = "INBOX", seed: int = 5) -> list[bytes]:
    """``count`` small distinct messages, stored with MULTIAPPEND (fast)."""
    rng = random.Random(seed)
    bodies = [mailgen.make_message(rng, i, size=800)[0] for i in range(count)]
    client = mailgen.connect(account)
    try:
        for start in range(0, count, 500):
            client.multiappend(folder, bodies[start:start + 500])
    finally:
        client.logout()
    return bodies


def count_in(account, folder: str = "INBOX") -> int:
    client = mailgen.connect(account)
    try:
        return client.folder_status(folder, [b"MESSAGES"])[b"MESSAGES"]
    finally:
        client.logout()


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "migrate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_copies(proc: subprocess.Popen, account, at_least: int = 1,
                    timeout: float = 60) -> int:
    """Poll the destination until the running process has copied something."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"mailmigrate finished before it could be interrupted: {out} {err}")
        n = count_in(account)
        if n >= at_least:
            return n
        time.sleep(0.02)  # polling interval, not synchronisation
    proc.kill()
    pytest.fail("mailmigrate copied nothing within the deadline")


def hashes_at(account) -> collections.Counter:
    return collections.Counter(m.sha256 for ms in mailgen.snapshot(account).values()
                               for m in ms)


def hashes_of(bodies: list[bytes]) -> collections.Counter:
    return collections.Counter(mailgen.TestMessage("", b, (), None).sha256 for b in bodies)


class StallingProxy(CuttingProxy):
    """Forwards until ``stall`` is set, then holds every byte: a server that hangs
    mid-command, so the batch in flight never finishes by itself."""

    def __init__(self, target_port: int):
        super().__init__(target_port)
        self.stall = threading.Event()
        self._never = threading.Event()

    def _pump(self, src, dst, direction) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.stall.is_set():
                    self._never.wait()  # hold the connection open, forward nothing
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._never.set()
        super().close()
