"""Run `maskbank serve` as a child process on a loopback port (the demo and the tests use it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque

_LISTENING = re.compile(r"maskbank serving .* on (\S+):(\d+) ")


class ServerProcess:
    """A real `maskbank serve` process; use as a context manager, or call start()/stop()."""

    def __init__(self, registry: str, *extra_args: str, host: str = "127.0.0.1", startup_timeout: float = 120.0):
        self.command = [sys.executable, "-m", "maskbank", "serve", "--registry", str(registry),
                        "--host", host, "--port", "0", *extra_args]
        self.host = host
        self.port: int | None = None
        self.startup_timeout = startup_timeout
        self.output: deque[str] = deque(maxlen=500)  # the server's recent output, for error messages
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "ServerProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        found = threading.Event()
        threading.Thread(target=self._read_output, args=(found,), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not found.wait(0.1):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("maskbank serve did not start:\n" + "\n".join(self.output))
        return self

    def _read_output(self, found: threading.Event) -> None:
        for line in self._process.stdout:
            self.output.append(line.rstrip())
            if not found.is_set() and (match := _LISTENING.search(line)):
                self.port = int(match.group(2))
                found.set()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful stop), then SIGKILL if it does not exit in `timeout` seconds."""
        if self._process is None or self._process.poll() is not None:
            return self._process and self._process.returncode
        self._process.send_signal(signal.SIGTERM)
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return self._process.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
