"""A redis-server process that tests and suites stop, kill and restart on the same unix socket, with or
without persistence (AOF)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


class RedisProcess:
    def __init__(self, directory: Path, aof: bool = False, fsync: str = "always", tcp: bool = True) -> None:
        """`aof`: appendonly yes with appendfsync `fsync`; else no persistence at all (no RDB either). `tcp`:
        on a free port of 127.0.0.1, as in production (a unix socket's broken connections look different)."""
        self.directory, self.aof, self.fsync = directory, aof, fsync
        self.socket = directory / "redis.sock"
        self.port = _free_port() if tcp else 0
        self.url = f"redis://127.0.0.1:{self.port}/0" if tcp else f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProcess:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        persistence = ["--appendonly", "yes", "--appendfsync", self.fsync] if self.aof else ["--appendonly", "no"]
        self.process = subprocess.Popen([server, "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--unixsocket", str(self.socket), "--save", "",
                                         *persistence, "--dir", str(self.directory)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:  # it starts in milliseconds (loading an AOF too); the loop bounds a slow machine
            try:
                with redis.Redis.from_url(self.url) as client:
                    if client.ping():
                        return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL (a crash: only what the AOF holds survives) or SIGTERM (an orderly shutdown)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(20)
        self.process = None

    def restart(self, sig: int = signal.SIGKILL) -> float:
        """Stop and start again; the seconds it was away."""
        began = time.monotonic()
        self.stop(sig)
        self.start()
        return time.monotonic() - began


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
