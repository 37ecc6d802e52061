"""One imgsearch service as a child process on a free 127.0.0.1 port, for the performance benchmark."""

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from bench.soak_services import read_rss_bytes
from imgsearch_client.client import ClientError, check_health

_STOP_TIMEOUT_S = 120.0
_POLL_S = 0.02


class ChildService:
    """`imgsearch serve SERVICE` as a child process, with IMGSEARCH_* settings in env, logging into log_path."""

    def __init__(self, service: str, env: dict[str, str], log_path: pathlib.Path, flags: tuple[str, ...] = ()):
        self.service = service
        self.addr = f"127.0.0.1:{_free_port()}"
        self._env = {**os.environ, **env}
        self._flags = flags
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> float:
        """Start the service and return the seconds from the process start until its health is SERVING."""
        command = [sys.executable, "-m", "imgsearch_client.cli", "serve", self.service, "--listen", self.addr,
                   *self._flags]
        started = time.perf_counter()
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=self._env)
        while time.perf_counter() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.service} service exited with status {self.process.returncode}, "
                                   f"see {self.log_path}")
            with contextlib.suppress(ClientError):
                if check_health(self.addr, timeout_s=1.0) == "SERVING":
                    return time.perf_counter() - started
            time.sleep(_POLL_S)
        self.kill()
        raise RuntimeError(f"the {self.service} service was not SERVING after {timeout_s:.0f} s, see {self.log_path}")

    @property
    def rss_bytes(self) -> int:
        return read_rss_bytes(self.process.pid)

    def stop(self) -> int | None:
        """Send SIGTERM and wait for the exit status; a service still running after the wait is killed (None)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "ChildService":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
