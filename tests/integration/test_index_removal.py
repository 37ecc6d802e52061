"""RemoveItems, UpdateMetadata and embedding ingest over gRPC on 127.0.0.1, through the stub, the client and the CLI."""

import dataclasses
import json

import grpc
import numpy as np
import pytest

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2
from imgsearch_client import cli
from imgsearch_client.client import ClientError, IndexClient, IngestItem
from index_service.collection import EmbedModelMismatchError
from index_service.config import IndexConfig
from tests.unit.index_service.index_fakes import make_png
from tests.unit.index_service.index_servers import FakeEmbedService, serve_fake_embed, start_index_service

pytestmark = pytest.mark.integration

_DIM = 16
_MODEL_ID = "fake-clip"
_MAX_MESSAGE_BYTES = 1024 * 1024
_TIMEOUT_S = 20.0

ADDED = index_service_pb2.INGEST_STATUS_ADDED
ALREADY_PRESENT = index_service_pb2.INGEST_STATUS_ALREADY_PRESENT
FAILED = index_service_pb2.INGEST_STATUS_FAILED


@pytest.fixture
def embed_service():
    handle = serve_fake_embed(FakeEmbedService(dim=_DIM, model_id=_MODEL_ID), _MAX_MESSAGE_BYTES)
    yield handle
    handle.stop()


@pytest.fixture
def start_index(tmp_path, embed_service):
    """Return a function that starts an index service on 127.0.0.1:0; every one is stopped after the test."""
    handles = []

    def start(**overrides):
        config = IndexConfig(
            listen="127.0.0.1:0",
            embed_addr=embed_service.address,
            data_dir=tmp_path / "index",
            embed_timeout_s=5.0,
            max_message_bytes=_MAX_MESSAGE_BYTES,
            max_image_bytes=60_000,
            max_image_pixels=200_000,
            max_workers=4,
            device="cpu",
            grace_s=0.0,
            max_metadata_keys=4,
            max_metadata_value_bytes=32,
        )
        handle = start_index_service(dataclasses.replace(config, **overrides))
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture
def index(start_index):
    handle = start_index()
    requests = [
        index_service_pb2.IngestImagesRequest(image=make_png(n), item_id=f"item-{n}", metadata={"n": str(n)})
        for n in range(5)
    ]
    assert [response.status for response in handle.ingest(requests)] == [ADDED] * 5
    return handle


@pytest.fixture
def address(index):
    return index.address


def _remove(index, item_ids):
    return index.stub.RemoveItems(index_service_pb2.RemoveItemsRequest(item_ids=item_ids), timeout=_TIMEOUT_S)


def _update(index, item_id, **fields):
    request = index_service_pb2.UpdateMetadataRequest(item_id=item_id, **fields)
    return index.stub.UpdateMetadata(request, timeout=_TIMEOUT_S)


def _assert_rpc_fails(call, code, message_part):
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() is code
    assert message_part in raised.value.details()


# RemoveItems


def test_remove_items(index):
    response = _remove(index, ["item-1", "nope", "item-3", "nope"])

    assert response.removed_count == 2
    assert list(response.not_found_item_ids) == ["nope"]
    assert index.stats().item_count == 3
    found = [n.item_id for n in index.search(image=make_png(1), k=10).neighbours]
    assert sorted(found) == ["item-0", "item-2", "item-4"]
    _assert_rpc_fails(lambda: index.search(item_id="item-1"), grpc.StatusCode.NOT_FOUND, "'item-1'")


def test_remove_items_again(index):
    _remove(index, ["item-1"])

    response = _remove(index, ["item-1"])

    assert (response.removed_count, list(response.not_found_item_ids)) == (0, ["item-1"])


@pytest.mark.parametrize(
    ("item_ids", "message"),
    [([], "item_ids is empty"), (["item-1", ""], "item_ids[1] is empty")],
    ids=["none", "empty-item-id"],
)
def test_remove_items_invalid_argument(index, item_ids, message):
    _assert_rpc_fails(lambda: _remove(index, item_ids), grpc.StatusCode.INVALID_ARGUMENT, message)
    assert index.stats().item_count == 5


def test_ingest_with_removed_item_id(index):
    _remove(index, ["item-2"])

    [response] = index.ingest([index_service_pb2.IngestImagesRequest(image=make_png(50), item_id="item-2")])

    assert response.status == FAILED
    assert response.error.code_name == "FAILED_PRECONDITION"
    assert "belonged to a removed item" in response.error.message


def test_removal_survives_restart(start_index, index):
    _remove(index, ["item-0", "item-4"])
    index.stop()

    restarted = start_index()

    assert restarted.stats().item_count == 3
    _assert_rpc_fails(lambda: restarted.search(item_id="item-4"), grpc.StatusCode.NOT_FOUND, "'item-4'")


# UpdateMetadata


def test_update_metadata(index):
    response = _update(index, "item-1", set={"label": "cat", "n": "one"})

    assert dict(response.metadata) == {"label": "cat", "n": "one"}
    [neighbour] = index.search(item_id="item-1", k=1).neighbours
    assert dict(neighbour.metadata) == {"label": "cat", "n": "one"}


def test_update_metadata_remove_keys_and_replace(index):
    assert dict(_update(index, "item-1", remove_keys=["n", "absent"]).metadata) == {}
    assert dict(_update(index, "item-2", set={"only": "this"}, replace=True).metadata) == {"only": "this"}


@pytest.mark.parametrize(
    ("item_id", "fields", "code", "message"),
    [
        ("nope", {"set": {"a": "1"}}, grpc.StatusCode.NOT_FOUND, "'nope' not found"),
        ("", {"set": {"a": "1"}}, grpc.StatusCode.INVALID_ARGUMENT, "item_id is empty"),
        ("item-1", {"set": {"a": "1"}, "remove_keys": ["a"]}, grpc.StatusCode.INVALID_ARGUMENT, "both in set"),
        ("item-1", {"remove_keys": ["n"], "replace": True}, grpc.StatusCode.INVALID_ARGUMENT, "replace is true"),
        ("item-1", {"set": {"": "1"}}, grpc.StatusCode.INVALID_ARGUMENT, "key is empty"),
        ("item-1", {"set": {"a": "v" * 33}}, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 32"),
        ("item-1", {"set": {k: "v" for k in "abcd"}}, grpc.StatusCode.RESOURCE_EXHAUSTED, "would have 5 keys"),
    ],
    ids=["unknown", "empty-item-id", "key-in-both", "replace-with-remove-keys", "empty-key", "long-value",
         "too-many-keys"],
)
def test_update_metadata_errors(index, item_id, fields, code, message):
    _assert_rpc_fails(lambda: _update(index, item_id, **fields), code, message)

    [neighbour] = index.search(item_id="item-1", k=1).neighbours
    assert dict(neighbour.metadata) == {"n": "1"}


def test_update_metadata_of_removed_item(index):
    _remove(index, ["item-1"])

    _assert_rpc_fails(lambda: _update(index, "item-1", set={"a": "1"}), grpc.StatusCode.NOT_FOUND, "removed")


def test_update_metadata_survives_restart(start_index, index):
    _update(index, "item-3", set={"label": "dog"})
    index.stop()

    [neighbour] = start_index().search(item_id="item-3", k=1).neighbours

    assert dict(neighbour.metadata) == {"n": "3", "label": "dog"}


def test_ingest_metadata_limits(index):
    requests = [
        index_service_pb2.IngestImagesRequest(image=make_png(20), metadata={k: "v" for k in "abcde"}),
        index_service_pb2.IngestImagesRequest(image=make_png(21), metadata={"bad\nkey": "v"}),
        index_service_pb2.IngestImagesRequest(image=make_png(22), metadata={"ok": "v"}),
    ]

    responses = index.ingest(requests)

    assert [r.error.code_name for r in responses] == ["RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", ""]


# Embeddings


def _embedding_request(values, item_id="", model_id=_MODEL_ID, **fields):
    return index_service_pb2.IngestImagesRequest(
        embedding=common_pb2.Embedding(values=values, model_id=model_id), item_id=item_id, **fields
    )


def test_ingest_embeddings(start_index):
    index = start_index()
    vectors = np.random.default_rng(3).standard_normal((4, _DIM))

    responses = index.ingest([_embedding_request(v.tolist(), f"vec-{n}", uri=f"s3://v/{n}") for n, v in enumerate(vectors)])

    assert [r.status for r in responses] == [ADDED] * 4
    stats = index.stats()
    assert (stats.item_count, stats.dim, stats.model_id) == (4, _DIM, _MODEL_ID)
    [best] = index.search(embedding=common_pb2.Embedding(values=(vectors[2] * 5).tolist()), k=1).neighbours
    assert (best.item_id, best.uri, best.sha256, best.width) == ("vec-2", "s3://v/2", "", 0)
    assert best.score == pytest.approx(1.0, abs=1e-6)


def test_ingest_embedding_duplicates_by_item_id(index):
    vector = [0.25] * _DIM
    index.ingest([_embedding_request(vector, "vec")])

    responses = index.ingest([_embedding_request(vector, "vec"), _embedding_request([0.5] * (_DIM - 1) + [-0.5], "vec")])

    assert [r.status for r in responses] == [ALREADY_PRESENT, FAILED]
    assert responses[1].error.code_name == "ALREADY_EXISTS"


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"values": []}, "no values"),
        ({"values": [float("nan")] * _DIM}, "NaN"),
        ({"values": [0.0] * _DIM}, "all zeros"),
        ({"values": [0.1] * (_DIM + 1)}, f"dim {_DIM + 1}, but the collection contains dim {_DIM}"),
        ({"values": [0.1] * _DIM, "model_id": "other-clip"}, "'other-clip'"),
        ({"values": [0.1] * _DIM, "model_id": ""}, "model_id is empty"),
    ],
    ids=["empty", "nan", "zero", "wrong-dim", "other-model", "no-model-id"],
)
def test_ingest_bad_embedding(index, request_fields, message):
    responses = index.ingest([_embedding_request(**request_fields), index_service_pb2.IngestImagesRequest(image=make_png(30))])

    assert [r.status for r in responses] == [FAILED, ADDED]
    assert responses[0].error.code_name == "INVALID_ARGUMENT"
    assert message in responses[0].error.message
    assert index.stats().item_count == 6


def test_ingest_request_without_content(index):
    [response] = index.ingest([index_service_pb2.IngestImagesRequest(uri="nothing")])

    assert (response.status, response.error.code_name) == (FAILED, "INVALID_ARGUMENT")
    assert "image is empty" in response.error.message


# The client library and the command line


def test_client_remove_update_and_embeddings(index, address):
    with IndexClient(address) as client:
        outcomes = list(client.ingest([IngestItem(embedding=[0.5] * _DIM, model_id=_MODEL_ID, item_id="vec"),
                                       IngestItem(image=make_png(40), item_id="img")]))
        removed = client.remove_items(["item-0", "nope"])
        metadata = client.update_metadata("vec", {"a": "1", "b": "2"})
        metadata_after = client.update_metadata("vec", remove_keys=["a"])
        with pytest.raises(ClientError) as raised:
            client.update_metadata("nope", {"a": "1"})

    assert [outcome.status for outcome in outcomes] == ["added", "added"]
    assert (removed.removed_count, removed.not_found_item_ids) == (1, ("nope",))
    assert (metadata, metadata_after) == ({"a": "1", "b": "2"}, {"b": "2"})
    assert raised.value.code == "NOT_FOUND"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image": b"png", "embedding": [0.1], "model_id": "m"}, "not both"),
        ({"embedding": [0.1]}, "needs the model_id"),
    ],
    ids=["both", "no-model-id"],
)
def test_client_ingest_item_rejects_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        IngestItem(**fields)


def test_client_remove_needs_item_ids():
    with IndexClient("127.0.0.1:1") as client, pytest.raises(ValueError, match="at least one item_id"):
        client.remove_items([])


def test_cli_remove(index, address, capsys):
    status = cli.main(["remove", "--addr", address, "item-1", "nope"])

    assert status == 0
    assert capsys.readouterr().out.splitlines() == ["removed 1 items", "not found: nope"]
    assert cli.main(["remove", "--addr", address, "--json", "item-1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed_count": 0, "not_found_item_ids": ["item-1"]}


def test_cli_update_metadata(index, address, capsys):
    status = cli.main(["update-metadata", "--addr", address, "item-2", "--set", "label=a=b", "--set", "x=",
                       "--remove-key", "n"])

    assert status == 0
    assert capsys.readouterr().out.splitlines() == ["label: a=b", "x: "]
    assert cli.main(["update-metadata", "--addr", address, "--json", "item-2", "--set", "y=1", "--replace"]) == 0
    assert json.loads(capsys.readouterr().out) == {"item_id": "item-2", "metadata": {"y": "1"}}


def test_cli_update_metadata_of_unknown_item(index, address, capsys):
    status = cli.main(["update-metadata", "--addr", address, "nope", "--set", "a=1"])

    assert status == 1
    assert "imgsearch: error: NOT_FOUND: item_id 'nope' not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["item-1"], "give at least one of --set, --remove-key or --replace"),
        (["item-1", "--set", "novalue"], "expected KEY=VALUE"),
        (["item-1", "--set", "=v"], "expected KEY=VALUE"),
        (["item-1", "--replace", "--remove-key", "a"], "cannot go with --replace"),
        (["item-1", "--set", "a=1", "--remove-key", "a"], "'a' is in both"),
    ],
    ids=["nothing", "no-equals", "empty-key", "replace-and-remove", "key-in-both"],
)
def test_cli_update_metadata_bad_command_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["update-metadata", *arguments])

    assert raised.value.code == 2
    assert message in capsys.readouterr().err


# Start-up model check


def test_start_rejected_for_other_model(start_index, index, embed_service):
    index.stop()
    embed_service.servicer.model_id = "other-clip"

    with pytest.raises(EmbedModelMismatchError, match="model 'fake-clip' .* runs model 'other-clip'"):
        start_index()


def test_start_with_embed_service_down(start_index, index, embed_service):
    index.stop()
    embed_service.stop()

    restarted = start_index()

    assert restarted.stats().item_count == 5
    [response] = restarted.ingest([index_service_pb2.IngestImagesRequest(image=make_png(60))])
    assert response.error.code_name == "UNAVAILABLE"
