"""Server reflection on both real services in-process on 127.0.0.1, read with grpcio-reflection's client."""

import dataclasses
import pathlib

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from embed_service import config as embed_config
from embed_service import server as embed_server
from index_service import config as index_config
from index_service import server as index_server

pytestmark = pytest.mark.integration

_MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "models" / "tiny-clip-random"
_HEALTH = "grpc.health.v1.Health"
_REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


@pytest.fixture(scope="module")
def addresses(tmp_path_factory):
    """Start the embed service (hash backend) and an index service that uses it, and yield both addresses."""
    embed = dataclasses.replace(
        embed_config.from_env({}), listen="127.0.0.1:0", backend="hash", model_dir=_MODEL_DIR
    )
    embed_grpc, _, embed_port = embed_server.build_server(embed)
    index = dataclasses.replace(
        index_config.from_env({}), listen="127.0.0.1:0", embed_addr=f"127.0.0.1:{embed_port}",
        data_dir=tmp_path_factory.mktemp("index"),
    )
    index_grpc, _, index_port, collection = index_server.start(index)
    yield {"embed": f"127.0.0.1:{embed_port}", "index": f"127.0.0.1:{index_port}"}
    index_grpc.stop(None).wait()
    collection.close()
    embed_grpc.stop(None).wait()


@pytest.fixture
def open_database(addresses):
    """Return a function that opens a reflection database on one service's channel. The channels close after the test."""
    channels = []

    def open_database(service: str) -> ProtoReflectionDescriptorDatabase:
        channel = grpc.insecure_channel(addresses[service])
        channels.append(channel)
        return ProtoReflectionDescriptorDatabase(channel)

    yield open_database
    for channel in channels:
        channel.close()


@pytest.mark.parametrize(
    ("service", "api_name"),
    [("embed", "imgsearch.embed.v1.EmbedService"), ("index", "imgsearch.index.v1.IndexService")],
)
def test_list_shows_api_health_and_reflection(open_database, service, api_name):
    names = set(open_database(service).get_services())

    assert api_name in names
    assert _HEALTH in names
    assert _REFLECTION in names


def test_describe_streaming_method(open_database):
    pool = DescriptorPool(open_database("index"))

    method = pool.FindServiceByName("imgsearch.index.v1.IndexService").methods_by_name["IngestImages"]

    assert method.client_streaming
    assert method.server_streaming
    assert method.input_type.full_name == "imgsearch.index.v1.IngestImagesRequest"
    assert method.output_type.full_name == "imgsearch.index.v1.IngestImagesResponse"


def test_describe_unary_method(open_database):
    pool = DescriptorPool(open_database("embed"))

    method = pool.FindServiceByName("imgsearch.embed.v1.EmbedService").methods_by_name["GetModelInfo"]

    assert not method.client_streaming
    assert not method.server_streaming
    assert method.output_type.full_name == "imgsearch.embed.v1.GetModelInfoResponse"


def test_describe_message_with_imported_field(open_database):
    pool = DescriptorPool(open_database("index"))

    message = pool.FindMessageTypeByName("imgsearch.index.v1.SearchRequest")

    assert message.fields_by_name["image"].number == 1
    assert message.fields_by_name["item_id"].number == 3
    # The embedding field's type lives in the common proto file, which reflection sends as a dependency.
    assert message.fields_by_name["embedding"].message_type.full_name == "imgsearch.common.v1.Embedding"


def test_describe_unknown_symbol_is_not_found(addresses):
    with grpc.insecure_channel(addresses["index"]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="imgsearch.index.v1.NoSuchMessage")
        [response] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))

    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_database_raises_key_error_for_unknown_symbol(open_database):
    pool = DescriptorPool(open_database("embed"))

    with pytest.raises(KeyError):
        pool.FindMessageTypeByName("imgsearch.embed.v1.NoSuchMessage")
