"""TLS, mutual TLS and bearer tokens end to end: client -> index service -> embed service, all on 127.0.0.1."""

import dataclasses
import json
import logging
import time

import pytest

from embed_service import config as embed_config
from embed_service import server as embed_server
from imgsearch_client import cli
from imgsearch_client.client import ClientError, IndexClient, IngestItem, check_health
from imgsearch_common.security import channel_credentials
from index_service import config as index_config
from index_service import server as index_server
from tests.fakes.images import noise_images
from tests.unit.imgsearch_common.security_certs import create_authority

pytestmark = pytest.mark.integration

EMBED_TOKEN = "embed-token-7d2a"
INDEX_TOKEN = "index-token-91bf"


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: object
    other_ca: object
    embed: object
    index: object
    index_client: object
    user: object
    stranger: object


@dataclasses.dataclass(frozen=True)
class Services:
    embed_addr: str
    index_addr: str
    index: index_config.IndexConfig


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    authority = create_authority(folder, "main")
    other = create_authority(folder, "other")
    return Pki(
        ca=authority.cert,
        other_ca=other.cert,
        embed=authority.issue_server("embed"),
        index=authority.issue_server("index"),
        index_client=authority.issue_client("index-client"),
        user=authority.issue_client("user"),
        stranger=other.issue_client("stranger"),
    )


@pytest.fixture(scope="module")
def services(pki, tmp_path_factory):
    embed = dataclasses.replace(
        embed_config.from_env({}), listen="127.0.0.1:0", backend="hash",
        tls_cert=pki.embed.cert, tls_key=pki.embed.key, tls_client_ca=pki.ca, auth_token=EMBED_TOKEN,
    )
    embed_grpc, _, embed_port = embed_server.build_server(embed)
    index = dataclasses.replace(
        index_config.from_env({}), listen="127.0.0.1:0", embed_addr=f"127.0.0.1:{embed_port}",
        data_dir=tmp_path_factory.mktemp("index"),
        tls_cert=pki.index.cert, tls_key=pki.index.key, tls_client_ca=pki.ca, auth_token=INDEX_TOKEN,
        embed_tls_ca=pki.ca, embed_tls_cert=pki.index_client.cert, embed_tls_key=pki.index_client.key,
        embed_token=EMBED_TOKEN,
    )
    index_grpc, _, index_port, collection = index_server.start(index)
    yield Services(embed_addr=f"127.0.0.1:{embed_port}", index_addr=f"127.0.0.1:{index_port}", index=index)
    index_grpc.stop(None).wait()
    collection.close()
    embed_grpc.stop(None).wait()


def _user_client(pki: Pki, address: str, token: str = INDEX_TOKEN) -> IndexClient:
    credentials = channel_credentials(pki.ca, pki.user.cert, pki.user.key)
    return IndexClient(address, timeout_s=10.0, credentials=credentials, token=token)


def _stats_error(client: IndexClient) -> ClientError:
    with client, pytest.raises(ClientError) as raised:
        client.stats()
    return raised.value


def test_tls_end_to_end(services, pki):
    images = noise_images(3, seed=41)
    with _user_client(pki, services.index_addr) as client:
        outcomes = list(client.ingest(IngestItem(image=image, uri=f"mem://{n}") for n, image in enumerate(images)))
        neighbours = client.search(image=images[1], k=2)
        events = list(client.find_duplicates())

    assert [outcome.status for outcome in outcomes] == ["added"] * 3
    assert neighbours[0].uri == "mem://1"
    assert neighbours[0].score >= 0.999
    assert events[-1].item_count >= 3


def test_tls_by_localhost_name(services, pki):
    port = services.index_addr.rsplit(":", 1)[1]

    with _user_client(pki, f"localhost:{port}") as client:
        stats = client.stats()

    assert stats["dim"] > 0


def test_plaintext_client_rejected(services):
    error = _stats_error(IndexClient(services.index_addr, timeout_s=5.0, token=INDEX_TOKEN))

    assert error.code == "UNAVAILABLE"


def test_mtls_without_client_cert_rejected(services, pki):
    client = IndexClient(
        services.index_addr, timeout_s=5.0, credentials=channel_credentials(pki.ca, None, None), token=INDEX_TOKEN
    )

    assert _stats_error(client).code == "UNAVAILABLE"


def test_server_of_other_ca_rejected(services, pki):
    credentials = channel_credentials(pki.other_ca, pki.user.cert, pki.user.key)
    client = IndexClient(services.index_addr, timeout_s=5.0, credentials=credentials, token=INDEX_TOKEN)

    assert _stats_error(client).code == "UNAVAILABLE"


def test_client_cert_of_other_ca_rejected(services, pki):
    credentials = channel_credentials(pki.ca, pki.stranger.cert, pki.stranger.key)
    client = IndexClient(services.index_addr, timeout_s=5.0, credentials=credentials, token=INDEX_TOKEN)

    assert _stats_error(client).code == "UNAVAILABLE"


def test_missing_token_unauthenticated(services, pki):
    error = _stats_error(_user_client(pki, services.index_addr, token=""))

    assert error.code == "UNAUTHENTICATED"
    assert error.message == "missing bearer token: send the metadata 'authorization: Bearer <token>'"


def test_wrong_token_unauthenticated(services, pki):
    error = _stats_error(_user_client(pki, services.index_addr, token=EMBED_TOKEN))

    assert error.code == "UNAUTHENTICATED"
    assert error.message == "invalid bearer token"


@pytest.mark.parametrize("service", ["embed_addr", "index_addr"])
def test_health_over_tls_needs_no_token(services, pki, service):
    credentials = channel_credentials(pki.ca, pki.user.cert, pki.user.key)
    deadline = time.monotonic() + 10.0

    # The embed service turns SERVING after its first backend probe, which runs in a thread.
    while (status := check_health(getattr(services, service), credentials=credentials)) != "SERVING":
        assert time.monotonic() < deadline, f"health stayed {status}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"embed_token": "not-the-embed-token"}, "UNAUTHENTICATED: invalid bearer token"),
        ({"embed_token": ""}, "UNAUTHENTICATED: missing bearer token"),
        ({"embed_tls_ca": None, "embed_tls_cert": None, "embed_tls_key": None}, "failed with UNAVAILABLE"),
        ({"embed_tls_cert": None, "embed_tls_key": None}, "failed with UNAVAILABLE"),
    ],
    ids=["wrong-token", "no-token", "plaintext", "no-client-cert"],
)
def test_index_rejected_by_embed_fails_items(services, pki, tmp_path, overrides, expected):
    config = dataclasses.replace(services.index, data_dir=tmp_path / "index", **overrides)
    server, _, port, collection = index_server.start(config)
    try:
        with _user_client(pki, f"127.0.0.1:{port}") as client:
            [outcome] = list(client.ingest([IngestItem(image=noise_images(1, seed=42)[0])]))
    finally:
        server.stop(None).wait()
        collection.close()

    assert outcome.status == "failed"
    assert outcome.error_code == "UNAVAILABLE"
    assert "the embed service call EmbedImages failed with" in outcome.error_message
    assert expected in outcome.error_message


def test_cli_stats_and_search_with_tls_and_token(services, pki, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("IMGSEARCH_TOKEN", INDEX_TOKEN)
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.user.cert), "--tls-key", str(pki.user.key)]
    query = tmp_path / "query.png"
    query.write_bytes(noise_images(1, seed=43)[0])

    assert cli.main(["stats", "--addr", services.index_addr, "--json", *tls]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert cli.main(["search", "--addr", services.index_addr, "--json", "-k", "1", *tls, str(query)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert cli.main(["ingest", "--addr", services.index_addr, "--json", *tls, str(query)]) == 0
    ingested = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert stats["dim"] > 0
    assert len(result["neighbours"]) == 1
    assert ingested[-1]["failed"] == 0


def test_cli_dupes_remove_update_secured(services, pki, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("IMGSEARCH_TOKEN", INDEX_TOKEN)
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.user.cert), "--tls-key", str(pki.user.key)]
    image = tmp_path / "image.png"
    image.write_bytes(noise_images(1, seed=44)[0])
    assert cli.main(["ingest", "--addr", services.index_addr, "--json", *tls, str(image)]) == 0
    item_id = json.loads(capsys.readouterr().out.splitlines()[0])["item_id"]

    assert cli.main(["dupes", "--addr", services.index_addr, "--json", *tls]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert cli.main(["update-metadata", "--addr", services.index_addr, "--json", *tls, item_id, "--set", "a=b"]) == 0
    capsys.readouterr()
    assert cli.main(["remove", "--addr", services.index_addr, "--json", *tls, item_id]) == 0

    assert audit["summary"]["item_count"] >= 1


def test_cli_health_with_tls_env(services, pki, monkeypatch, capsys):
    monkeypatch.setenv("IMGSEARCH_TLS_CA", str(pki.ca))
    monkeypatch.setenv("IMGSEARCH_TLS_CERT", str(pki.user.cert))
    monkeypatch.setenv("IMGSEARCH_TLS_KEY", str(pki.user.key))

    assert cli.main(["health", "--addr", services.index_addr]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_cli_without_token_fails_unauthenticated(services, pki, monkeypatch, capsys):
    monkeypatch.delenv("IMGSEARCH_TOKEN", raising=False)
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.user.cert), "--tls-key", str(pki.user.key)]

    assert cli.main(["stats", "--addr", services.index_addr, *tls]) == 1
    assert "UNAUTHENTICATED: missing bearer token" in capsys.readouterr().err


def test_tokens_never_logged(services, pki, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    with _user_client(pki, services.index_addr) as client:
        list(client.ingest([IngestItem(image=image) for image in noise_images(2, seed=44)]))
    with _user_client(pki, services.index_addr, token="wrong-token") as client, pytest.raises(ClientError):
        client.stats()

    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    statuses = [record["status"] for record in records if record["event"] == "rpc_finished"]
    assert "OK" in statuses
    assert "UNAUTHENTICATED" in statuses
    assert all(EMBED_TOKEN not in json.dumps(record) for record in records)
    assert all(INDEX_TOKEN not in json.dumps(record) for record in records)
    assert EMBED_TOKEN not in caplog.text
    assert INDEX_TOKEN not in caplog.text
