"""The soak run's services: the embed and index services as child processes, and samples of their RSS and health."""

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

from bench.soak_load import Recorder
from imgsearch_client.client import ClientError, IndexClient, check_health

SERVICES = ("embed", "index")
_MIB = 1024 * 1024
_STARTUP_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0
_SAMPLE_INTERVAL_S = 1.0
_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class ServiceProcesses:
    """The embed and index services as child processes on 127.0.0.1 free ports, logging into work_dir."""

    def __init__(self, work_dir: pathlib.Path, embed_backend: str, model_dir: pathlib.Path):
        self._work_dir = work_dir
        self._embed_backend = embed_backend
        self._model_dir = model_dir
        self.addrs = {service: f"127.0.0.1:{_free_port()}" for service in SERVICES}
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "ServiceProcesses":
        embed_flags = ["--backend", self._embed_backend]
        if self._embed_backend == "onnx":
            embed_flags += ["--model-dir", str(self._model_dir)]
        try:
            self._start("embed", embed_flags)
            self._wait_serving("embed")
            self._start("index", ["--embed-addr", self.addrs["embed"], "--data-dir", str(self._work_dir / "index-data")])
            self._wait_serving("index")
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._kill()

    def pid(self, service: str) -> int:
        return self.processes[service].pid

    def terminate(self) -> dict[str, int | None]:
        """Send SIGTERM to the index service, then to the embed service, and return their exit statuses.

        A service that has not exited _STOP_TIMEOUT_S seconds later is killed, and its status is None.
        """
        exit_codes: dict[str, int | None] = {}
        for service in reversed(SERVICES):
            process = self.processes[service]
            process.send_signal(signal.SIGTERM)
            try:
                exit_codes[service] = process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                exit_codes[service] = None
        return exit_codes

    def log_path(self, service: str) -> pathlib.Path:
        return self._work_dir / f"{service}.log"

    def _start(self, service: str, flags: list[str]) -> None:
        command = [sys.executable, "-m", "imgsearch_client.cli", "serve", service, "--listen", self.addrs[service],
                   *flags]
        with open(self.log_path(service), "wb") as log_file:
            self.processes[service] = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)

    def _wait_serving(self, service: str) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.processes[service].poll() is not None:
                raise RuntimeError(f"the {service} service exited with status {self.processes[service].returncode}, "
                                   f"see {self.log_path(service)}")
            with contextlib.suppress(ClientError):
                if check_health(self.addrs[service], timeout_s=2.0) == "SERVING":
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the {service} service was not SERVING after {_STARTUP_TIMEOUT_S:.0f} s")

    def _kill(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_rss_bytes(pid: int) -> int:
    """Return the resident set size of process pid, from the VmRSS line of /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                if unit != "kB":
                    raise ValueError(f"unexpected VmRSS unit {unit!r} in /proc/{pid}/status")
                return int(value) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


def read_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time of process pid, from fields 14 and 15 of /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name in field 2 may contain spaces, so the fields are counted after its closing bracket.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S


class Sampler:
    """Samples each service's RSS, health and the item count every second, in a thread, until stopped."""

    def __init__(self, services: ServiceProcesses, recorder: Recorder, rpc_timeout_s: float):
        self._services = services
        self._recorder = recorder
        self._rpc_timeout_s = rpc_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self.started_at = 0.0
        self.series: dict[str, list] = {"t_s": [], "item_count": [], **{f"{s}_rss_mib": [] for s in SERVICES}}
        self.not_serving: list[dict] = []

    def __enter__(self) -> "Sampler":
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(self._rpc_timeout_s * 3 + 5.0)

    def _run(self) -> None:
        with IndexClient(self._services.addrs["index"], timeout_s=self._rpc_timeout_s) as client:
            next_at = time.monotonic()
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                self._sample(client)
                next_at += _SAMPLE_INTERVAL_S

    def _sample(self, client: IndexClient) -> None:
        elapsed = round(time.monotonic() - self.started_at, 2)
        self.series["t_s"].append(elapsed)
        for service in SERVICES:
            process = self._services.processes[service]
            if process.poll() is not None:
                self.not_serving.append({"t_s": elapsed, "service": service, "status": f"exited ({process.returncode})"})
                self.series[f"{service}_rss_mib"].append(None)
                continue
            self.series[f"{service}_rss_mib"].append(round(read_rss_bytes(process.pid) / _MIB, 1))
            self._check_serving(service, elapsed)

        started = time.monotonic()
        try:
            self.series["item_count"].append(client.stats()["item_count"])
            self._recorder.record_latency("GetStats", time.monotonic() - started)
        except ClientError as error:
            self._recorder.record_error("GetStats", error.code, error.message)
            self.series["item_count"].append(None)

    def _check_serving(self, service: str, elapsed: float) -> None:
        started = time.monotonic()
        try:
            status = check_health(self._services.addrs[service], timeout_s=self._rpc_timeout_s)
            self._recorder.record_latency("Health.Check (new channel)", time.monotonic() - started)
        except ClientError as error:
            status = error.code
        if status != "SERVING":
            self.not_serving.append({"t_s": elapsed, "service": service, "status": status})


def cpu_seconds(services: ServiceProcesses) -> dict[str, float]:
    """Return the CPU time used so far by each service and by this process, the load generator."""
    seconds = {service: read_cpu_seconds(services.pid(service)) for service in SERVICES}
    seconds["load_generator"] = time.process_time()
    return seconds
