"""Run a gRPC server as a child process on a loopback port and learn the port it bound from its
startup line (`maskbank serve` for the demo and the tests; bench/oip_floor.py reuses this)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque

from serving.address import host_port

from .parent import PARENT_VARIABLE


class ChildServer:
    """A server child process whose startup line matches `listening` (groups: host, port); use as
    a context manager, or call start()/stop()."""

    name = "server"

    def __init__(self, command: list[str], listening: re.Pattern, host: str = "127.0.0.1",
                 startup_timeout: float = 120.0, cwd: str | None = None, env: dict[str, str] | None = None):
        """env: variables set for the child on top of this process's environment."""
        self.command = command
        self.env = env or {}
        self.listening = listening
        self.host = host
        self.cwd = cwd
        self.port: int | None = None
        self.startup_timeout = startup_timeout
        self.output: deque[str] = deque(maxlen=500)  # the server's recent output, for error messages
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return host_port(self.host, self.port)

    @property
    def pid(self) -> int | None:
        """The child's process id once started (benchmarks read its CPU time)."""
        return self._process and self._process.pid

    def start(self) -> "ChildServer":
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", PARENT_VARIABLE: str(os.getpid())}
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=env, cwd=self.cwd)
        found = threading.Event()
        threading.Thread(target=self._read_output, args=(found,), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        try:
            while not found.wait(0.1):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.output))
        except BaseException:  # not started, or interrupted meanwhile (Ctrl-C, SIGTERM): no child is left behind
            self.stop()
            raise
        return self

    def _read_output(self, found: threading.Event) -> None:
        for line in self._process.stdout:
            self.output.append(line.rstrip())
            if not found.is_set() and (match := self.listening.search(line)):
                self.port = int(match.group(2))
                found.set()

    def send_signal(self, signum: int) -> None:
        """Send `signum` to the running child (SIGHUP: a server polls its registry at once)."""
        self._process.send_signal(signum)

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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """A real `maskbank serve` process on a free port of `host`."""

    name = "maskbank serve"

    def __init__(self, registry: str, *extra_args: str, host: str = "127.0.0.1", startup_timeout: float = 120.0,
                 env: dict[str, str] | None = None):
        command = [sys.executable, "-m", "maskbank", "serve", "--registry", str(registry),
                   "--host", host, "--port", "0", *extra_args]
        super().__init__(command, re.compile(r"maskbank serving .* on (\S+):(\d+) "), host, startup_timeout, env=env)
