"""Both services in-process on 127.0.0.1 free ports, for the benchmarks."""

import contextlib
import dataclasses
import json
import pathlib
import time
from collections.abc import Iterator

from embed_service import config as embed_config
from embed_service import server as embed_server
from imgsearch_client.client import ClientError, check_health
from index_service import config as index_config
from index_service import server as index_server

_STARTUP_TIMEOUT_S = 120.0


@contextlib.contextmanager
def running_services(model_dir: pathlib.Path, data_dir: pathlib.Path) -> Iterator[tuple[str, dict]]:
    """Run the embed service (onnx on model_dir) and the index service; yield the index address and model facts."""
    embed = dataclasses.replace(embed_config.from_env({}), listen="127.0.0.1:0", backend="onnx", model_dir=model_dir)
    embed_grpc, _, embed_port = embed_server.build_server(embed)
    index = dataclasses.replace(
        index_config.from_env({}), listen="127.0.0.1:0", embed_addr=f"127.0.0.1:{embed_port}", data_dir=data_dir
    )
    index_grpc, _, index_port, collection = index_server.start(index)
    try:
        _wait_serving(f"127.0.0.1:{embed_port}")
        yield f"127.0.0.1:{index_port}", _model_facts(model_dir)
    finally:
        index_grpc.stop(None).wait()
        collection.close()
        embed_grpc.stop(None).wait()


def _wait_serving(addr: str) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(ClientError):
            if check_health(addr, timeout_s=2.0) == "SERVING":
                return
        time.sleep(0.1)
    raise RuntimeError(f"the embed service at {addr} was not SERVING after {_STARTUP_TIMEOUT_S:.0f} s")


def _model_facts(model_dir: pathlib.Path) -> dict:
    metadata_path = model_dir / "imgsearch-model.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    return {
        "model_dir": str(model_dir),
        "model_id": metadata.get("model_id", ""),
        "random_weights": bool(metadata.get("random_weights", False)),
    }
