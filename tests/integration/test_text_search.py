"""Text search through both real services on 127.0.0.1, with the tiny CLIP in ONNX Runtime or the Inference stand-in.

The tiny model's weights are random, so what a text finds means nothing. The tests check what is
real: the embed service's text embedding equals the one its backend computes for the same text, and
a text search returns the items ranked by their cosine with that embedding.
"""

import contextlib
import dataclasses
import json
import math
import pathlib
import shutil

import grpc
import numpy as np
import pytest

from embed_service import config as embed_config
from embed_service import server as embed_server
from embed_service.backends.onnx_embedder import OnnxEmbedder
from imgsearch.embed.v1 import embed_service_pb2, embed_service_pb2_grpc
from imgsearch_client import cli
from imgsearch_client.client import ClientError, IndexClient, IngestItem
from index_service import config as index_config
from index_service import server as index_server
from tests.fakes.images import noise_images
from tests.fakes.inference_standin import Behaviour, InferenceStandIn, fake_text_embedding

pytestmark = pytest.mark.integration

_MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "models" / "tiny-clip-random"
_TEXT = "a dog on a sofa"
_CALL_TIMEOUT_S = 30.0


@dataclasses.dataclass
class Stack:
    """An embed service and an index service in front of it, with a client of each."""

    index: IndexClient
    embed: embed_service_pb2_grpc.EmbedServiceStub
    index_addr: str

    def embed_text(self, text: str) -> embed_service_pb2.EmbedTextResponse:
        return self.embed.EmbedText(embed_service_pb2.EmbedTextRequest(text=text), timeout=_CALL_TIMEOUT_S)

    def embed_images(self, images: list[bytes]) -> np.ndarray:
        requests = (embed_service_pb2.EmbedImagesRequest(image=image) for image in images)
        responses = list(self.embed.EmbedImages(requests, timeout=_CALL_TIMEOUT_S))
        return np.array([response.embedding.values for response in responses], dtype=np.float64)


@contextlib.contextmanager
def _running_stack(embed_settings: dict, data_dir: pathlib.Path):
    embed = dataclasses.replace(embed_config.from_env({}), listen="127.0.0.1:0", grace_s=0.0, **embed_settings)
    embed_grpc, _, embed_port = embed_server.build_server(embed)
    index = dataclasses.replace(
        index_config.from_env({}), listen="127.0.0.1:0", embed_addr=f"127.0.0.1:{embed_port}", data_dir=data_dir
    )
    index_grpc, _, index_port, collection = index_server.start(index)
    channel = grpc.insecure_channel(f"127.0.0.1:{embed_port}")
    index_addr = f"127.0.0.1:{index_port}"
    try:
        with IndexClient(index_addr, timeout_s=_CALL_TIMEOUT_S) as client:
            yield Stack(client, embed_service_pb2_grpc.EmbedServiceStub(channel), index_addr)
    finally:
        channel.close()
        index_grpc.stop(None).wait()
        collection.close()
        embed_grpc.stop(None).wait()


@pytest.fixture
def stack(tmp_path):
    with _running_stack({"backend": "onnx", "model_dir": _MODEL_DIR}, tmp_path / "index") as running:
        yield running


@pytest.fixture
def no_text_model_stack(tmp_path):
    """The tiny model without its textual.onnx."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("visual.onnx", "imgsearch-model.json"):
        shutil.copy(_MODEL_DIR / name, model_dir / name)
    with _running_stack({"backend": "onnx", "model_dir": model_dir}, tmp_path / "index") as running:
        yield running


@pytest.fixture
def standin():
    with InferenceStandIn() as server:
        yield server


@pytest.fixture
def inference_stack(tmp_path, standin):
    settings = {
        "backend": "inference",
        "inference_url": standin.url,
        "inference_timeout_s": 0.5,
        "inference_retries": 2,
        "inference_backoff_s": 0.01,
    }
    with _running_stack(settings, tmp_path / "index") as running:
        yield running


def _direct_text_embedding(text: str) -> np.ndarray:
    """The onnx backend's embedding of text, computed in this process without any service."""
    embedder = OnnxEmbedder(_MODEL_DIR, threads=1, max_image_pixels=10_000_000)
    try:
        return embedder.embed_text(text, math.inf).astype(np.float64)
    finally:
        embedder.close()


def _ingest(stack: Stack, images: list[bytes]) -> list[str]:
    """Ingest the images as mem://0, mem://1, ... and return those uris."""
    uris = [f"mem://{number}" for number in range(len(images))]
    outcomes = list(stack.index.ingest(IngestItem(image=image, uri=uri) for image, uri in zip(images, uris)))
    assert [outcome.status for outcome in outcomes] == ["added"] * len(images)
    return uris


def test_embed_text_equals_backend(stack):
    response = stack.embed_text(_TEXT)

    vector = np.array(response.embedding.values)
    assert response.embedding.model_id == "tiny-clip-random-v1"
    assert vector.shape == (512,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vector, _direct_text_embedding(_TEXT), atol=1e-6)


def test_text_search_ranked_by_cosine(stack):
    images = noise_images(8, seed=71)
    uris = _ingest(stack, images)
    text_vector = _direct_text_embedding(_TEXT)
    image_vectors = stack.embed_images(images)
    scores = image_vectors @ text_vector / np.linalg.norm(image_vectors, axis=1)
    expected = np.argsort(-scores)

    neighbours = stack.index.search(text=_TEXT, k=8)

    assert [neighbour.uri for neighbour in neighbours] == [uris[index] for index in expected]
    np.testing.assert_allclose([neighbour.score for neighbour in neighbours], scores[expected], atol=1e-5)
    assert {neighbour.match for neighbour in neighbours} == {"unspecified"}


def test_text_search_k_and_min_score(stack):
    images = noise_images(6, seed=72)
    _ingest(stack, images)
    everything = stack.index.search(text=_TEXT, k=6)
    threshold = (everything[1].score + everything[2].score) / 2

    top = stack.index.search(text=_TEXT, k=2)
    above = stack.index.search(text=_TEXT, k=6, min_score=threshold)

    assert [neighbour.item_id for neighbour in top] == [neighbour.item_id for neighbour in everything[:2]]
    assert [neighbour.item_id for neighbour in above] == [neighbour.item_id for neighbour in everything[:2]]


def test_text_search_empty_collection(stack):
    assert stack.index.search(text=_TEXT) == []


def test_cli_search_text_json(stack, capsys):
    images = noise_images(4, seed=73)
    uris = _ingest(stack, images)
    expected = [neighbour.uri for neighbour in stack.index.search(text=_TEXT, k=3)]

    status = cli.main(["search", "--addr", stack.index_addr, "--json", "-k", "3", "--text", _TEXT])

    result = json.loads(capsys.readouterr().out)
    assert status == 0
    assert [neighbour["uri"] for neighbour in result["neighbours"]] == expected
    assert set(expected) <= set(uris)


def test_cli_search_text_table(stack, capsys):
    _ingest(stack, noise_images(2, seed=74))

    status = cli.main(["search", "--addr", stack.index_addr, "--text", _TEXT])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert len(lines) == 2
    assert all("mem://" in line for line in lines)


@pytest.mark.parametrize("argv", [["--text", "a dog", "query.png"], ["--text", "a dog", "--item-id", "x"]])
def test_cli_search_text_with_other_query_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["search", "--addr", "127.0.0.1:1", *argv])

    assert stopped.value.code == 2
    assert "only one of them" in capsys.readouterr().err


def test_cli_search_empty_text_exits_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["search", "--addr", "127.0.0.1:1", "--text", "  "])

    assert stopped.value.code == 2
    assert "expected words to search for" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "   \t"])
def test_embed_text_empty_invalid_argument(stack, text):
    with pytest.raises(grpc.RpcError) as raised:
        stack.embed_text(text)

    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "text is empty" in raised.value.details()


def test_embed_text_too_long_invalid_argument(stack):
    with pytest.raises(grpc.RpcError) as raised:
        stack.embed_text("word " * 1000)

    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "5000 bytes in UTF-8, above the limit of 4096 bytes" in raised.value.details()


def test_search_empty_text_invalid_argument(stack):
    _ingest(stack, noise_images(1, seed=75))

    with pytest.raises(ClientError) as raised:
        stack.index.search(text=" ")

    assert raised.value.code == "INVALID_ARGUMENT"
    assert "text is empty" in raised.value.message


def test_search_too_long_text_invalid_argument(stack):
    # The index service passes the text on; the embed service's limit comes back with its status.
    _ingest(stack, noise_images(1, seed=76))

    with pytest.raises(ClientError) as raised:
        stack.index.search(text="é" * 3000)

    assert raised.value.code == "INVALID_ARGUMENT"
    assert "above the limit of 4096 bytes" in raised.value.message


def test_missing_text_model_failed_precondition(no_text_model_stack):
    stack = no_text_model_stack
    images = noise_images(2, seed=77)
    _ingest(stack, images)

    with pytest.raises(grpc.RpcError) as direct:
        stack.embed_text(_TEXT)
    with pytest.raises(ClientError) as searched:
        stack.index.search(text=_TEXT)

    assert direct.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "textual.onnx, which does not exist" in direct.value.details()
    assert searched.value.code == "FAILED_PRECONDITION"
    assert "textual.onnx" in searched.value.message
    # Image search still works.
    assert stack.index.search(image=images[0], k=1)[0].uri == "mem://0"


def test_text_model_mismatch_failed_precondition(stack):
    # The collection contains another model's embeddings, given directly, but the text embedding is the tiny model's.
    vector = np.random.default_rng(78).standard_normal(512).tolist()
    list(stack.index.ingest([IngestItem(embedding=vector, model_id="other-clip", item_id="given")]))

    with pytest.raises(ClientError) as raised:
        stack.index.search(text=_TEXT)

    assert raised.value.code == "FAILED_PRECONDITION"
    assert "'other-clip'" in raised.value.message
    assert "'tiny-clip-random-v1'" in raised.value.message


def test_inference_text_search(inference_stack, standin):
    _ingest(inference_stack, noise_images(3, seed=79))

    response = inference_stack.embed_text(_TEXT)
    neighbours = inference_stack.index.search(text=_TEXT, k=3)

    expected = fake_text_embedding(_TEXT)
    np.testing.assert_allclose(response.embedding.values, expected / np.linalg.norm(expected), atol=1e-6)
    assert response.embedding.model_id == "ViT-B-32"
    assert len(neighbours) == 3
    assert [request.text for request in standin.requests if request.text is not None] == [_TEXT, _TEXT]


def test_inference_text_500_retried(inference_stack, standin):
    standin.fail_next(Behaviour.STATUS_500, count=2)

    response = inference_stack.embed_text(_TEXT)

    assert len(response.embedding.values) == 512
    # The stand-in also counts the service's readiness probes, which are images.
    assert len([request for request in standin.requests if request.text is not None]) == 3


@pytest.mark.parametrize(
    ("behaviour", "code", "text"),
    [
        (Behaviour.MALFORMED_JSON, grpc.StatusCode.UNAVAILABLE, "not JSON"),
        (Behaviour.STATUS_500, grpc.StatusCode.UNAVAILABLE, "after 3 attempts"),
        (Behaviour.NO_ANSWER, grpc.StatusCode.UNAVAILABLE, "did not complete its response within 0.5 s"),
        (Behaviour.STATUS_400, grpc.StatusCode.INVALID_ARGUMENT, "rejected the text"),
    ],
)
def test_inference_text_faults_status(inference_stack, standin, behaviour, code, text):
    standin.behaviour = behaviour

    with pytest.raises(grpc.RpcError) as direct:
        inference_stack.embed_text(_TEXT)

    assert direct.value.code() is code
    assert text in direct.value.details()


def test_inference_text_search_unavailable(inference_stack, standin):
    _ingest(inference_stack, noise_images(1, seed=80))
    standin.behaviour = Behaviour.MALFORMED_JSON

    with pytest.raises(ClientError) as raised:
        inference_stack.index.search(text=_TEXT)

    assert raised.value.code == "UNAVAILABLE"
    assert "EmbedText failed with UNAVAILABLE" in raised.value.message


def test_inference_caller_deadline(inference_stack, standin):
    standin.behaviour = Behaviour.NO_ANSWER

    with pytest.raises(grpc.RpcError) as raised:
        inference_stack.embed.EmbedText(embed_service_pb2.EmbedTextRequest(text=_TEXT), timeout=0.2)

    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
