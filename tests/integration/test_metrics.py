"""Prometheus metrics of both real services, scraped over HTTP on 127.0.0.1 after some traffic."""

import dataclasses
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from embed_service import config as embed_config
from embed_service import server as embed_server
from imgsearch_client.client import ClientError, IndexClient, IngestItem
from imgsearch_common.config import ConfigError
from index_service import config as index_config
from index_service import server as index_server
from tests.fakes.images import noise_images

pytestmark = pytest.mark.integration

_SCRAPE_TIMEOUT_S = 5.0
_INGEST = "/imgsearch.index.v1.IndexService/IngestImages"
_SEARCH = "/imgsearch.index.v1.IndexService/Search"
_EMBED = "/imgsearch.embed.v1.EmbedService/EmbedImages"


@dataclasses.dataclass
class _Services:
    index_addr: str
    embed_addr: str
    index_metrics_port: int
    embed_metrics_port: int


def _metrics_port_of(logs) -> int:
    ports = [entry["port"] for entry in logs if entry["event"] == "metrics_server_started"]
    assert len(ports) == 1
    return ports[0]


@pytest.fixture
def services(tmp_path):
    embed = dataclasses.replace(
        embed_config.from_env({}), listen="127.0.0.1:0", backend="hash", metrics_listen="127.0.0.1:0"
    )
    with capture_logs() as embed_logs:
        embed_grpc, _, embed_port = embed_server.build_server(embed)
    index = dataclasses.replace(
        index_config.from_env({}),
        listen="127.0.0.1:0",
        embed_addr=f"127.0.0.1:{embed_port}",
        data_dir=tmp_path / "index",
        metrics_listen="127.0.0.1:0",
    )
    with capture_logs() as index_logs:
        index_grpc, _, index_port, collection = index_server.start(index)
    yield _Services(f"127.0.0.1:{index_port}", index.embed_addr, _metrics_port_of(index_logs), _metrics_port_of(embed_logs))
    index_grpc.stop(None).wait()
    collection.close()
    embed_grpc.stop(None).wait()


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Return every sample of the /metrics page, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=_SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_index_metrics_after_traffic(services):
    images = noise_images(3, seed=11)
    with IndexClient(services.index_addr) as client:
        list(client.ingest([IngestItem(image=images[0]), IngestItem(image=b"not an image"), IngestItem(image=images[1])]))
        list(client.ingest([IngestItem(image=images[0]), IngestItem(image=images[2])]))
        client.search(image=images[0], k=2)
        with pytest.raises(ClientError):
            client.search(item_id="no-such-item")

    samples = _scrape(services.index_metrics_port)

    assert _value(samples, "imgsearch_rpcs_total", method=_INGEST, status="OK") == 2
    assert _value(samples, "imgsearch_rpcs_total", method=_SEARCH, status="OK") == 1
    assert _value(samples, "imgsearch_rpcs_total", method=_SEARCH, status="NOT_FOUND") == 1
    assert _value(samples, "imgsearch_rpc_duration_seconds_count", method=_SEARCH, status="OK") == 1
    assert _value(samples, "imgsearch_rpc_duration_seconds_sum", method=_SEARCH, status="OK") > 0
    assert _value(samples, "imgsearch_items_ingested_total", status="added") == 3
    assert _value(samples, "imgsearch_items_ingested_total", status="already_present") == 1
    assert _value(samples, "imgsearch_items_ingested_total", status="failed") == 1
    assert _value(samples, "imgsearch_index_items") == 3


def test_index_items_gauge_reads_at_scrape(services):
    assert _value(_scrape(services.index_metrics_port), "imgsearch_index_items") == 0

    with IndexClient(services.index_addr) as client:
        list(client.ingest(IngestItem(image=image) for image in noise_images(2, seed=12)))

    assert _value(_scrape(services.index_metrics_port), "imgsearch_index_items") == 2


def test_embed_metrics_after_traffic(services):
    with IndexClient(services.index_addr) as client:
        list(client.ingest(IngestItem(image=image) for image in noise_images(4, seed=13)))

    samples = _scrape(services.embed_metrics_port)

    assert _value(samples, "imgsearch_rpcs_total", method=_EMBED, status="OK") >= 1
    assert _value(samples, "imgsearch_embed_images_total", backend="hash") == 4
    assert _value(samples, "imgsearch_embed_duration_seconds_count", backend="hash") >= 1
    assert _value(samples, "imgsearch_embed_duration_seconds_bucket", backend="hash", le="+Inf") >= 1


def test_health_checks_not_counted(services):
    with grpc.insecure_channel(services.index_addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=_SCRAPE_TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as raised:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=_SCRAPE_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    samples = _scrape(services.index_metrics_port)

    methods = {dict(labels).get("method", "") for name, labels in samples if name == "imgsearch_rpcs_total"}
    assert not any(method.startswith("/grpc.health.") for method in methods)


def test_metrics_server_stops_with_grpc_server(tmp_path):
    embed = dataclasses.replace(
        embed_config.from_env({}), listen="127.0.0.1:0", backend="hash", metrics_listen="127.0.0.1:0"
    )
    with capture_logs() as logs:
        server, _, _ = embed_server.build_server(embed)
    port = _metrics_port_of(logs)
    assert _scrape(port)

    with capture_logs() as stop_logs:
        server.stop(None).wait()
        # The stopper thread shuts the HTTP server down after the gRPC server terminates.
        deadline = time.monotonic() + _SCRAPE_TIMEOUT_S
        stopped = {"event": "metrics_server_stopped", "port": port}
        while not any(stopped.items() <= entry.items() for entry in stop_logs):
            assert time.monotonic() < deadline, "the metrics server did not stop"
            time.sleep(0.02)

    with pytest.raises(urllib.error.URLError):
        _scrape(port)


def test_no_metrics_server_by_default():
    assert embed_config.from_env({}).metrics_listen == ""
    assert index_config.from_env({}).metrics_listen == ""

    embed = dataclasses.replace(embed_config.from_env({}), listen="127.0.0.1:0", backend="hash")
    with capture_logs() as logs:
        server, _, _ = embed_server.build_server(embed)
    server.stop(None).wait()

    assert not [entry for entry in logs if entry["event"] == "metrics_server_started"]


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1:", ":9464", "127.0.0.1:http", "127.0.0.1:70000"])
def test_malformed_metrics_listen_rejected(listen):
    with pytest.raises(ConfigError, match="IMGSEARCH_EMBED_METRICS_LISTEN"):
        embed_config.from_env({"IMGSEARCH_EMBED_METRICS_LISTEN": listen})
    with pytest.raises(ConfigError, match="IMGSEARCH_INDEX_METRICS_LISTEN"):
        index_config.from_env({"IMGSEARCH_INDEX_METRICS_LISTEN": listen})


def test_metrics_port_in_use_fails_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        embed = dataclasses.replace(
            embed_config.from_env({}),
            listen="127.0.0.1:0",
            backend="hash",
            metrics_listen=f"127.0.0.1:{taken.getsockname()[1]}",
        )
        with pytest.raises(RuntimeError, match="could not bind the metrics server"):
            embed_server.build_server(embed)


def test_index_metrics_port_in_use_fails_start(tmp_path, services):
    index = dataclasses.replace(
        index_config.from_env({}),
        listen="127.0.0.1:0",
        embed_addr=services.embed_addr,
        data_dir=tmp_path / "second",
        metrics_listen=f"127.0.0.1:{services.index_metrics_port}",
    )
    with pytest.raises(RuntimeError, match="could not bind the metrics server"):
        index_server.start(index)

    # The failed start closed its store, so the same data directory opens again.
    with capture_logs():
        server, _, _, collection = index_server.start(dataclasses.replace(index, metrics_listen=""))
    server.stop(None).wait()
    collection.close()
