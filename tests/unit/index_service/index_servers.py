"""A fake EmbedService over gRPC and handles on in-process index servers, for the index service's integration tests."""

import dataclasses
import time
from concurrent import futures

import grpc

from imgsearch.common.v1 import common_pb2
from imgsearch.embed.v1 import embed_service_pb2, embed_service_pb2_grpc
from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from imgsearch_common.errors import ImgsearchError
from imgsearch_common.fingerprints import FINGERPRINT_VERSION, Fingerprint
from imgsearch_common.grpc_errors import item_error
from imgsearch_common.serving import message_size_options
from index_service import server as index_server
from index_service.config import IndexConfig
from tests.unit.index_service.index_fakes import fingerprint_of, thumbnail_vector

CALL_TIMEOUT_S = 20.0


class FakeEmbedService(embed_service_pb2_grpc.EmbedServiceServicer):
    """EmbedService with thumbnail-projection embeddings and real fingerprints.

    model_id and delay_s can be changed, and time_remaining logs each call's remaining deadline.
    with_fingerprints False makes it behave as an embed service older than fingerprints, and
    fingerprint_version replaces the version it sends.
    """

    def __init__(self, dim: int, model_id: str):
        self.dim = dim
        self.model_id = model_id
        self.delay_s = 0.0
        self.with_fingerprints = True
        self.fingerprint_version = FINGERPRINT_VERSION
        self.time_remaining: list[float | None] = []

    def EmbedImages(self, request_iterator, context):
        self.time_remaining.append(context.time_remaining())
        for request in request_iterator:
            time.sleep(self.delay_s)
            yield self._embed(request)

    def GetModelInfo(self, request, context):
        return embed_service_pb2.GetModelInfoResponse(model_id=self.model_id, dim=self.dim, backend="fake")

    def _embed(self, request):
        try:
            vector = thumbnail_vector(request.image, self.dim)
            fingerprint = fingerprint_of(request.image)
        except ImgsearchError as error:
            return embed_service_pb2.EmbedImagesResponse(
                correlation_id=request.correlation_id, error=item_error(error)
            )
        response = embed_service_pb2.EmbedImagesResponse(
            correlation_id=request.correlation_id,
            embedding=common_pb2.Embedding(values=vector.tolist(), model_id=self.model_id),
        )
        if self.with_fingerprints:
            fingerprint = dataclasses.replace(fingerprint, version=self.fingerprint_version)
            response.fingerprint.CopyFrom(fingerprint_message(fingerprint))
        return response


def fingerprint_message(fingerprint: Fingerprint) -> common_pb2.ImageFingerprint:
    """Convert a Fingerprint into the message that the embed service sends."""
    return common_pb2.ImageFingerprint(
        version=fingerprint.version,
        pixel_sha256=fingerprint.pixel_sha256,
        phash=fingerprint.phash,
        width=fingerprint.width,
        height=fingerprint.height,
        layout=fingerprint.layout,
    )


@dataclasses.dataclass
class EmbedHandle:
    servicer: FakeEmbedService
    server: grpc.Server
    address: str

    def stop(self):
        self.server.stop(None).wait()


def serve_fake_embed(servicer: FakeEmbedService, max_message_bytes: int) -> EmbedHandle:
    """Start servicer on 127.0.0.1 at a free port; the caller stops the returned handle."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=message_size_options(max_message_bytes)
    )
    embed_service_pb2_grpc.add_EmbedServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return EmbedHandle(servicer=servicer, server=server, address=f"127.0.0.1:{port}")


@dataclasses.dataclass
class IndexHandle:
    config: IndexConfig
    server: grpc.Server
    collection: object
    channel: grpc.Channel
    stub: index_service_pb2_grpc.IndexServiceStub
    stopped: bool = False
    # host:port that the server listens on, for clients other than stub.
    address: str = ""

    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        self.channel.close()
        self.server.stop(None).wait()
        self.collection.close()

    def ingest(self, requests, timeout=CALL_TIMEOUT_S):
        return list(self.stub.IngestImages(iter(requests), timeout=timeout))

    def search(self, timeout=CALL_TIMEOUT_S, **fields):
        return self.stub.Search(index_service_pb2.SearchRequest(**fields), timeout=timeout)

    def stats(self):
        return self.stub.GetStats(index_service_pb2.GetStatsRequest(), timeout=CALL_TIMEOUT_S)

    def find_duplicates(self, timeout=CALL_TIMEOUT_S, **fields):
        request = index_service_pb2.FindDuplicatesRequest(**fields)
        return list(self.stub.FindDuplicates(request, timeout=timeout))


def start_index_service(config: IndexConfig) -> IndexHandle:
    """Start an index service with config (which should listen on 127.0.0.1:0) and connect a stub to it."""
    server, _, port, collection = index_server.start(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=message_size_options(config.max_message_bytes))
    return IndexHandle(
        config=config,
        server=server,
        collection=collection,
        channel=channel,
        stub=index_service_pb2_grpc.IndexServiceStub(channel),
        address=f"127.0.0.1:{port}",
    )
