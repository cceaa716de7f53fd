"""A throw-away ``redis-server`` on 127.0.0.1 for the Redis-backed baselines."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from typing import Self


class RedisServer:
    """Start ``redis-server`` on a free port with no persistence; stop it on exit.

    Example:
        >>> with RedisServer() as server:
        ...     print(server.url)    # redis://127.0.0.1:PORT/0
    """

    def __init__(self, binary: str = "redis-server") -> None:
        self.binary = shutil.which(binary)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        if self.binary is None:
            raise FileNotFoundError("no redis-server binary on PATH")
        with socket.socket() as probe:  # the kernel picks a free port; redis takes it over
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._dir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self._proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
