"""SearchStream, search settings and index details over gRPC on 127.0.0.1, with approximate indexes."""

import dataclasses
import time

import grpc
import pytest

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2
from index_service.config import IndexConfig
from tests.unit.index_service.clustered import clustered_vectors
from tests.unit.index_service.index_servers import FakeEmbedService, serve_fake_embed, start_index_service

pytestmark = pytest.mark.integration

_DIM = 16
_MODEL_ID = "fake-clip"
_COUNT = 1500
_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def vectors():
    return clustered_vectors(_COUNT, _DIM, clusters=20, seed=6, spread=2.0)


@pytest.fixture
def start_index(tmp_path):
    embed = serve_fake_embed(FakeEmbedService(dim=_DIM, model_id=_MODEL_ID), 1024 * 1024)
    handles = []

    def start(**overrides):
        config = IndexConfig(listen="127.0.0.1:0", embed_addr=embed.address, data_dir=tmp_path / "index",
                             device="cpu", grace_s=0.0, max_k=100)
        handle = start_index_service(dataclasses.replace(config, **overrides))
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()
    embed.stop()


def _embedding(vector) -> common_pb2.Embedding:
    return common_pb2.Embedding(values=vector.tolist(), model_id=_MODEL_ID)


def _filled(start_index, vectors, **overrides):
    index = start_index(**overrides)
    requests = [index_service_pb2.IngestImagesRequest(embedding=_embedding(v), item_id=f"v{n}")
                for n, v in enumerate(vectors)]
    responses = index.ingest(requests, timeout=_TIMEOUT_S)
    assert all(r.status == index_service_pb2.INGEST_STATUS_ADDED for r in responses)
    return index


def _stream(index, requests):
    return list(index.stub.SearchStream(iter(requests), timeout=_TIMEOUT_S))


def test_stream_answers_each_query_in_order(start_index, vectors):
    index = _filled(start_index, vectors[:300])
    requests = [index_service_pb2.SearchRequest(embedding=_embedding(vectors[n]), k=3) for n in range(0, 300, 3)]

    responses = _stream(index, requests)

    assert len(responses) == 100
    for n, response in zip(range(0, 300, 3), responses):
        assert response.response.neighbours[0].item_id == f"v{n}"
        assert len(response.response.neighbours) == 3
        single = index.search(embedding=_embedding(vectors[n]), k=3)
        assert [x.item_id for x in response.response.neighbours] == [x.item_id for x in single.neighbours]


def test_stream_bad_query_fails_alone(start_index, vectors):
    index = _filled(start_index, vectors[:50])
    requests = [
        index_service_pb2.SearchRequest(embedding=_embedding(vectors[1]), k=2),
        index_service_pb2.SearchRequest(k=2),
        index_service_pb2.SearchRequest(embedding=_embedding(vectors[2]), k=1000),
        index_service_pb2.SearchRequest(item_id="missing", k=2),
        index_service_pb2.SearchRequest(embedding=_embedding(vectors[2]), k=2,
                                        search_params=index_service_pb2.SearchParams(nprobe=0)),
        index_service_pb2.SearchRequest(item_id="v3", k=2),
    ]

    responses = _stream(index, requests)

    codes = [r.error.code_name if r.HasField("error") else "OK" for r in responses]
    assert codes == ["OK", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "NOT_FOUND", "INVALID_ARGUMENT", "OK"]
    assert "above the limit of 100" in responses[2].error.message
    assert "search_params.nprobe is 0" in responses[4].error.message
    assert responses[5].response.neighbours[0].item_id == "v3"


def test_empty_stream_ends_cleanly(start_index):
    assert _stream(start_index(), []) == []


def test_unary_search_rejects_zero_nprobe(start_index, vectors):
    index = _filled(start_index, vectors[:10])

    with pytest.raises(grpc.RpcError) as raised:
        index.search(embedding=_embedding(vectors[0]), search_params=index_service_pb2.SearchParams(ef_search=0))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "search_params.ef_search is 0" in raised.value.details()


def test_ivf_collection_reports_its_index_and_honours_nprobe(start_index, vectors):
    index = _filled(start_index, vectors, index_kind="ivf", nlist=16, nprobe=4)
    # The collection turns IVF in the background from its 1000th item on.
    deadline = time.monotonic() + _TIMEOUT_S
    while index.stats().index_kind != "ivf" and time.monotonic() < deadline:
        time.sleep(0.05)

    stats = index.stats()
    assert (stats.index_kind, stats.nlist, stats.default_search_effort) == ("ivf", 16, 4)
    assert stats.index_type == "IVF16,Flat"
    assert stats.index_memory_bytes >= _COUNT * _DIM * 4
    every_list = index.search(embedding=_embedding(vectors[7]), k=50,
                              search_params=index_service_pb2.SearchParams(nprobe=16))
    one_list = index.search(embedding=_embedding(vectors[7]), k=50,
                            search_params=index_service_pb2.SearchParams(nprobe=1))
    assert every_list.neighbours[0].item_id == "v7"
    assert len(one_list.neighbours) <= len(every_list.neighbours)
    assert [n.item_id for n in one_list.neighbours] != [n.item_id for n in every_list.neighbours]


def _tagged(start_index, vectors):
    index = start_index()
    requests = [index_service_pb2.IngestImagesRequest(embedding=_embedding(v), item_id=f"v{n}",
                                                      metadata={"parity": "even" if n % 2 == 0 else "odd"},
                                                      uri=f"set-{n % 3}/v{n}")
                for n, v in enumerate(vectors[:90])]
    index.ingest(requests, timeout=_TIMEOUT_S)
    return index


def _filter(**fields) -> index_service_pb2.Filter:
    metadata = [index_service_pb2.MetadataCondition(key=key, any_of=values)
                for key, values in fields.pop("metadata", {}).items()]
    return index_service_pb2.Filter(metadata=metadata, **fields)


def test_search_filter_over_grpc(start_index, vectors):
    index = _tagged(start_index, vectors)

    response = index.search(embedding=_embedding(vectors[1]), k=10,
                            filter=_filter(metadata={"parity": ["even"]}, uri_prefixes=["set-0/"]))

    ids = [int(n.item_id[1:]) for n in response.neighbours]
    assert len(ids) == 10
    assert all(n % 6 == 0 for n in ids)


def test_search_stream_applies_each_filter(start_index, vectors):
    index = _tagged(start_index, vectors)
    requests = [
        index_service_pb2.SearchRequest(embedding=_embedding(vectors[0]), k=5, filter=_filter(metadata={"parity": ["odd"]})),
        index_service_pb2.SearchRequest(embedding=_embedding(vectors[0]), k=5, filter=_filter(uri_prefixes=["set-1/"])),
        index_service_pb2.SearchRequest(embedding=_embedding(vectors[0]), k=5, filter=_filter(metadata={"": []})),
    ]

    odd, set_one, bad = _stream(index, requests)

    assert all(int(n.item_id[1:]) % 2 == 1 for n in odd.response.neighbours)
    assert all(int(n.item_id[1:]) % 3 == 1 for n in set_one.response.neighbours)
    assert bad.error.code_name == "INVALID_ARGUMENT"
    assert "key is empty" in bad.error.message


def test_find_duplicates_filter_over_grpc(start_index, vectors):
    index = _tagged(start_index, vectors)

    with pytest.raises(grpc.RpcError) as raised:
        index.find_duplicates(filter=_filter(uri_prefixes=[""]))
    summary = index.find_duplicates(filter=_filter(uri_prefixes=["set-2/"]))[-1].summary

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert summary.item_count == 30
