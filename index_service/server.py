"""Assembly of the index service: store, indexes and their snapshots, embed client, gRPC server and health."""


import grpc
import prometheus_client
import structlog
from grpc_health.v1 import health

from imgsearch.index.v1 import index_service_pb2_grpc
from imgsearch_common.metrics import ServiceMetrics, serve_metrics
from imgsearch_common.security import server_credentials
from imgsearch_common.serving import (
    add_health_and_reflection,
    bind_port,
    create_server,
    serve_until_signalled,
    set_serving,
)
from index_service import snapshot
from index_service.collection import Collection, CollectionLimits, EmbeddedBatch
from index_service.config import ENV_PREFIX, IndexConfig, embed_channel_credentials
from index_service.duplicates import NearDuplicatePolicy
from index_service.embed_client import EmbedClient
from index_service.ingest_items import IngestResult
from index_service.metadata import MetadataLimits
from index_service.servicer import IndexServicer
from index_service.store import Store
from index_service.vector_index import VectorIndex

log = structlog.get_logger(__name__)

SERVICE_NAME = "imgsearch.index.v1.IndexService"

# GetModelInfo at start-up is skipped when the embed service does not respond in time, so it gets a
# short deadline.
_STARTUP_CHECK_TIMEOUT_S = 2.0


def build_server(
    config: IndexConfig, metrics: ServiceMetrics | None = None
) -> tuple[grpc.Server, health.HealthServicer, int, Collection]:
    """Open the store, restore the indexes from the snapshot and the store, and build a server bound to config.listen.

    Returns the server (not started), its health servicer (NOT_SERVING), the bound port and the
    collection. RPCs, ingested items and the item count are recorded in metrics. Raises ConfigError for a device that faiss cannot use or a TLS file that cannot be
    used, and RuntimeError when config.listen cannot be bound.
    """
    embed_credentials = embed_channel_credentials(config)
    vector_index = VectorIndex(
        device=config.device,
        threads=config.faiss_threads,
        removal=config.removal,
        max_masked=config.max_masked_removals,
        spec=config.index_spec,
    )
    metrics = metrics or ServiceMetrics()
    collection = _MeteredCollection(
        metrics,
        Store(config.data_dir),
        vector_index,
        EmbedClient(config.embed_addr, config.max_message_bytes, embed_credentials, config.embed_token),
        _limits_of(config),
        NearDuplicatePolicy(
            max_phash_distance=config.near_max_phash_distance,
            max_local_difference=config.near_max_local_difference,
            min_score=config.near_min_score,
        ),
        snapshot_path=config.data_dir / snapshot.FILE_NAME,
    )
    metrics.gauge_function(
        "imgsearch_index_items", "Items stored in the collection.", lambda: collection.stats().item_count
    )
    try:
        collection.load()
        server = create_server(config.max_workers, config.max_message_bytes, config.auth_token, metrics)
        servicer = IndexServicer(
            collection,
            config.ingest_batch_size,
            config.embed_timeout_s,
            config.search_batch_size,
            config.ingest_vector_batch_size,
        )
        index_service_pb2_grpc.add_IndexServiceServicer_to_server(servicer, server)
        health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
        credentials = server_credentials(ENV_PREFIX, config.tls_cert, config.tls_key, config.tls_client_ca)
        port = bind_port(
            server, config.listen, credentials, authenticated=bool(config.auth_token or config.tls_client_ca)
        )
    except BaseException:
        collection.close()
        raise
    return server, health_servicer, port, collection


def start(config: IndexConfig) -> tuple[grpc.Server, health.HealthServicer, int, Collection]:
    """Build and start a server and report it SERVING; the caller stops it and closes the collection.

    A non-empty config.metrics_listen serves Prometheus metrics there until the server terminates.
    Raises EmbedModelMismatchError, without serving, when the embed service returns another model
    than the data directory contains, and RuntimeError when config.metrics_listen cannot be bound.
    """
    metrics = ServiceMetrics()
    server, health_servicer, port, collection = build_server(config, metrics)
    try:
        collection.check_embedder(min(_STARTUP_CHECK_TIMEOUT_S, config.embed_timeout_s))
    except BaseException:
        collection.close()
        raise
    collection.start_snapshots(config.snapshot_interval_s, config.snapshot_after_changes)
    server.start()
    try:
        serve_metrics(config.metrics_listen, metrics, server)
    except RuntimeError:
        server.stop(None)
        collection.close()
        raise
    set_serving(health_servicer, [SERVICE_NAME], serving=True)
    log.info("server_started", listen=config.listen, port=port, embed_addr=config.embed_addr)
    return server, health_servicer, port, collection


def run(config: IndexConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain the server, save a snapshot and close the store."""
    server, health_servicer, _, collection = start(config)
    serve_until_signalled(server, health_servicer, [SERVICE_NAME], config.grace_s, on_stop=collection.close)


class _MeteredCollection(Collection):
    """A collection that counts ingested items by their result status in metrics."""

    def __init__(self, metrics: ServiceMetrics, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ingested: prometheus_client.Counter = metrics.counter(
            "imgsearch_items_ingested", "Items that ingest returned a result for, by status.", ["status"]
        )

    def store_embedded(self, batch: EmbeddedBatch) -> list[IngestResult]:
        results = super().store_embedded(batch)
        for result in results:
            self._ingested.labels(result.status.value).inc()
        return results


def _limits_of(config: IndexConfig) -> CollectionLimits:
    return CollectionLimits(
        default_k=config.default_k,
        max_k=config.max_k,
        max_image_bytes=config.max_image_bytes,
        max_image_pixels=config.max_image_pixels,
        near_max_candidates=config.near_max_candidates,
        search_batch_size=config.search_batch_size,
        metadata=MetadataLimits(
            max_keys=config.max_metadata_keys,
            max_key_bytes=config.max_metadata_key_bytes,
            max_value_bytes=config.max_metadata_value_bytes,
        ),
    )
