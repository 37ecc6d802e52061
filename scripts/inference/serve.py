"""Serve the Roboflow Inference HTTP API from the pip package, as its CPU Docker image does.

Run it with the Python of .venv-inference (inference-cpu 1.8.3). The package reads its settings
from environment variables when it is imported, so run_tests_in_netns.sh sets them before this
script starts. The app is built like docker/config/cpu_http.py of roboflow/inference, without the
stream manager, active learning and the pingback to Roboflow, all of which are off in these tests.
The server binds host:0 itself, and writes the port that it got to --port-file once it listens.
"""

import argparse
import asyncio
import logging
import os
import socket
from pathlib import Path

import uvicorn

# Folders of the web landing page that HttpInterface mounts relative to the working directory.
# The pip package does not ship the page, so empty folders are enough.
_LANDING_FOLDERS = ("inference/landing/out/static", "inference/landing/out/_next/static")

log = logging.getLogger("inference_serve")


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    port_file = args.port_file.resolve()
    for folder in _LANDING_FOLDERS:
        (args.workdir / folder).mkdir(parents=True, exist_ok=True)
    # StaticFiles checks its folders when the app is built, so the working directory must be set first.
    os.chdir(args.workdir)

    listener = socket.create_server((args.host, 0))
    port = listener.getsockname()[1]
    app = _build_app()

    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    asyncio.run(_serve(server, listener, port, port_file))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port-file", type=Path, required=True, help="file that receives the port number")
    parser.add_argument(
        "--workdir",
        type=Path,
        required=True,
        help="working directory of the server, where the empty landing page folders go",
    )
    return parser.parse_args()


def _build_app():
    # Imported late because importing the package takes several seconds, so argument errors show first.
    from inference.core.env import MAX_ACTIVE_MODELS
    from inference.core.interfaces.http.http_api import HttpInterface
    from inference.core.managers.base import ModelManager
    from inference.core.managers.decorators.fixed_size_cache import WithFixedSizeCache
    from inference.core.registries.roboflow import RoboflowModelRegistry
    from inference.models.utils import ROBOFLOW_MODEL_TYPES

    registry = RoboflowModelRegistry(ROBOFLOW_MODEL_TYPES)
    manager = WithFixedSizeCache(ModelManager(model_registry=registry), max_size=MAX_ACTIVE_MODELS)
    return HttpInterface(manager).app


async def _serve(server, listener: socket.socket, port: int, port_file: Path) -> None:
    """Run uvicorn on the bound socket, and publish the port once uvicorn has started."""
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        # Written to a temporary name first, so a reader never sees a half-written number.
        temporary = port_file.with_suffix(".tmp")
        temporary.write_text(f"{port}\n", encoding="ascii")
        temporary.replace(port_file)
        log.info("inference server listening on http://%s:%d", listener.getsockname()[0], port)
    await serving


if __name__ == "__main__":
    main()
