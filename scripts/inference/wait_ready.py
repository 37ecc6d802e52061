"""Wait until the Inference server started by serve.py embeds an image, then print its base URL.

Steps: the port file appears, GET /readiness returns 200, and one POST /clip/embed_image of a small
PNG returns 200 (this request loads the CLIP model from the cache). Exits with status 1 and a
message on stderr when the server process ends, the timeout passes or the probe embedding fails.
"""

import argparse
import base64
import io
import os
import sys
import time
from pathlib import Path

import requests
from PIL import Image

_POLL_S = 0.2
# Maximum seconds for one HTTP request. The probe embedding loads the model, which takes a few seconds.
_REQUEST_TIMEOUT_S = 30.0


class _NotReady(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", type=Path, required=True, help="file that serve.py writes the port to")
    parser.add_argument("--server-pid", type=int, required=True, help="process id of serve.py")
    parser.add_argument("--clip-version-id", required=True, help="CLIP model name for the probe, e.g. ViT-B-32")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="seconds to wait in all (default 120)")
    args = parser.parse_args()

    deadline = time.monotonic() + args.timeout_s
    try:
        url = f"http://127.0.0.1:{_wait_for_port(args.port_file, args.server_pid, deadline)}"
        _wait_for_readiness(url, args.server_pid, deadline)
        _check_probe_embedding(url, args.clip_version_id, deadline)
    except _NotReady as error:
        sys.exit(f"wait_ready: the Inference server is not ready: {error}")
    print(url)


def _wait_for_port(port_file: Path, server_pid: int, deadline: float) -> int:
    while not port_file.is_file():
        _check_waiting(server_pid, deadline, f"{port_file} was not written")
        time.sleep(_POLL_S)
    return int(port_file.read_text(encoding="ascii"))


def _wait_for_readiness(url: str, server_pid: int, deadline: float) -> None:
    """Repeat GET /readiness until it returns 200, for as long as the server runs and time is left."""
    while True:
        try:
            response = requests.get(url + "/readiness", timeout=_request_timeout(deadline))
            if response.status_code == 200:
                return
            last = f"GET /readiness returned HTTP {response.status_code}: {response.text[:300]}"
        except requests.RequestException as error:
            last = f"GET /readiness failed: {type(error).__name__}: {error}"
        _check_waiting(server_pid, deadline, last)
        time.sleep(_POLL_S)


def _check_probe_embedding(url: str, clip_version_id: str, deadline: float) -> None:
    """Embed one image once. The server loads the model inside this request, so a failure is final."""
    body = {"image": {"type": "base64", "value": _probe_png()}, "clip_version_id": clip_version_id}
    try:
        response = requests.post(url + "/clip/embed_image", json=body, timeout=_request_timeout(deadline))
    except requests.RequestException as error:
        raise _NotReady(f"the probe embedding failed: {type(error).__name__}: {error}") from None
    if response.status_code != 200:
        raise _NotReady(f"the probe embedding returned HTTP {response.status_code}: {response.text[:300]}")


def _request_timeout(deadline: float) -> float:
    """Return the timeout of the next request: _REQUEST_TIMEOUT_S, cut to the time left (at least 0.1 s)."""
    return max(0.1, min(_REQUEST_TIMEOUT_S, deadline - time.monotonic()))


def _check_waiting(server_pid: int, deadline: float, last: str) -> None:
    """Raise _NotReady when the server process has ended or the deadline has passed."""
    try:
        os.kill(server_pid, 0)
    except ProcessLookupError:
        raise _NotReady(f"the server process {server_pid} ended. Last state: {last}") from None
    if time.monotonic() >= deadline:
        raise _NotReady(f"timed out after the last state: {last}")


def _probe_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


if __name__ == "__main__":
    main()
