"""Both real services in-process on 127.0.0.1, the tiny CLIP in ONNX Runtime, driven by the client and CLI."""

import dataclasses
import json
import pathlib

import pytest

from embed_service import config as embed_config
from embed_service import server as embed_server
from imgsearch_client import cli
from imgsearch_client.client import ClientError, IndexClient, IngestItem, SearchQuery
from index_service import config as index_config
from index_service import server as index_server
from tests.fakes.images import noise_images

pytestmark = pytest.mark.integration

_MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "models" / "tiny-clip-random"


@pytest.fixture
def services(tmp_path):
    embed = dataclasses.replace(
        embed_config.from_env({}), listen="127.0.0.1:0", backend="onnx", model_dir=_MODEL_DIR
    )
    embed_grpc, _, embed_port = embed_server.build_server(embed)
    index = dataclasses.replace(
        index_config.from_env({}), listen="127.0.0.1:0", embed_addr=f"127.0.0.1:{embed_port}",
        data_dir=tmp_path / "index",
    )
    index_grpc, _, index_port, collection = index_server.start(index)
    yield f"127.0.0.1:{index_port}"
    index_grpc.stop(None).wait()
    collection.close()
    embed_grpc.stop(None).wait()


def test_ingest_then_search_finds_each_image_first(services):
    images = noise_images(6, seed=3)
    with IndexClient(services) as client:
        outcomes = list(client.ingest(IngestItem(image=image, uri=f"mem://{n}") for n, image in enumerate(images)))
        assert [outcome.status for outcome in outcomes] == ["added"] * 6

        for number, image in enumerate(images):
            neighbours = client.search(image=image, k=3)
            assert neighbours[0].uri == f"mem://{number}"
            assert neighbours[0].score >= 0.999
            assert neighbours[1].score < neighbours[0].score

        stats = client.stats()
    assert stats["item_count"] == 6
    assert stats["model_id"] == "tiny-clip-random-v1"
    assert stats["dim"] == 512


def test_second_ingest_adds_nothing(services):
    images = noise_images(4, seed=4)
    with IndexClient(services) as client:
        first = list(client.ingest(IngestItem(image=image) for image in images))
        again = list(client.ingest(IngestItem(image=image) for image in images))
        count = client.stats()["item_count"]

    assert [outcome.status for outcome in again] == ["already_present"] * 4
    assert [outcome.item_id for outcome in again] == [outcome.item_id for outcome in first]
    assert count == 4


def test_bad_item_fails_alone(services):
    images = noise_images(2, seed=5)
    with IndexClient(services) as client:
        outcomes = list(client.ingest([IngestItem(image=images[0]), IngestItem(image=b"plain text, not an image"),
                                       IngestItem(image=images[1])]))

    assert [outcome.status for outcome in outcomes] == ["added", "failed", "added"]
    assert outcomes[1].error_code == "INVALID_ARGUMENT"
    assert "not recognised" in outcomes[1].error_message


def test_search_with_unknown_item_id_is_not_found(services):
    with IndexClient(services) as client, pytest.raises(ClientError) as raised:
        client.search(item_id="no-such-item")

    assert raised.value.code == "NOT_FOUND"


def test_cli_ingest_and_search_json(services, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, image in enumerate(noise_images(3, seed=6)):
        (folder / f"{number}.png").write_bytes(image)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)

    assert cli.main(["ingest", "--addr", services, "--json", str(folder)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {pathlib.Path(line["uri"]).name: line for line in lines[:-1]}
    assert {by_name[name]["status"] for name in ("0.png", "1.png", "2.png")} == {"added"}
    assert by_name["broken.png"]["status"] == "failed"
    assert by_name["broken.png"]["error"]["code"] == "INVALID_ARGUMENT"
    assert lines[-1] == {"summary": True, "total": 4, "added": 3, "already_present": 0, "failed": 1}

    grid = tmp_path / "grid.png"
    assert cli.main(["search", "--addr", services, "--json", "-k", "2", "--grid", str(grid),
                     str(folder / "1.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert pathlib.Path(result["neighbours"][0]["uri"]).name == "1.png"
    assert result["neighbours"][0]["score"] >= 0.999
    assert grid.is_file()


def test_cli_ingest_metadata_then_filtered_search_and_stats(services, tmp_path, capsys):
    folder = tmp_path / "tagged"
    folder.mkdir()
    for number, image in enumerate(noise_images(2, seed=11)):
        (folder / f"{number}.png").write_bytes(image)
    assert cli.main(["ingest", "--addr", services, "--json", "--metadata", "tag=cat", "--metadata", "set=b",
                     str(folder)]) == 0
    capsys.readouterr()

    assert cli.main(["search", "--addr", services, "--json", "-k", "5", "--where", "tag=cat",
                     str(folder / "0.png")]) == 0
    neighbours = json.loads(capsys.readouterr().out)["neighbours"]
    assert cli.main(["stats", "--addr", services, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)

    assert sorted(pathlib.Path(n["uri"]).name for n in neighbours) == ["0.png", "1.png"]
    assert all(n["metadata"] == {"tag": "cat", "set": "b"} for n in neighbours)
    assert (stats["index_kind"], stats["nlist"], stats["default_search_effort"]) == ("flat", 0, 0)
    assert stats["index_memory_bytes"] >= stats["item_count"] * stats["dim"] * 4


def test_client_search_stream_answers_in_order(services):
    images = noise_images(3, seed=12)
    with IndexClient(services) as client:
        list(client.ingest(IngestItem(image=image, item_id=f"stream-{n}") for n, image in enumerate(images)))
        queries = [SearchQuery(item_id="stream-2", k=1), SearchQuery(item_id="no-such-item"),
                   SearchQuery(image=images[0], k=2), SearchQuery(text="a dog on a sofa", k=1)]

        results = list(client.search_stream(queries))
        with pytest.raises(ValueError, match="exactly one of"):
            client.search_stream([SearchQuery(item_id="stream-1", text="two queries")]).__next__()

    assert [n.item_id for n in results[0]] == ["stream-2"]
    assert results[1].code == "NOT_FOUND"
    assert "no-such-item" in results[1].message
    assert results[2][0].item_id == "stream-0"
    assert len(results[3]) == 1
