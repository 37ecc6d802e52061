"""Unit tests of imgsearch_common.security: reading tokens and TLS files, address checks, the exposure warning."""

import logging
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from imgsearch_common.config import ConfigError, EnvReader
from imgsearch_common.security import (
    BearerTokenInterceptor,
    BearerTokenSender,
    channel_credentials,
    is_local_address,
    server_credentials,
    token_from_env,
    warn_if_exposed,
)
from tests.unit.imgsearch_common.security_certs import create_authority

PREFIX = "IMGSEARCH_TEST_"
TOKEN = "s3cret-token-4f1c"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    authority = create_authority(folder, "main")
    return {
        "ca": authority.cert,
        "server": authority.issue_server("server"),
        "client": authority.issue_client("client"),
        "other": authority.issue_server("other"),
        "folder": folder,
    }


def _token(environ: dict[str, str]) -> str:
    return token_from_env(EnvReader(PREFIX, environ), PREFIX, "AUTH_TOKEN")


def test_token_unset_is_empty():
    assert _token({}) == ""


def test_token_from_variable():
    assert _token({f"{PREFIX}AUTH_TOKEN": TOKEN}) == TOKEN


def test_token_from_file_strips_newline(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    assert _token({f"{PREFIX}AUTH_TOKEN_FILE": str(token_file)}) == TOKEN


def test_token_and_file_together_rejected(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)

    with pytest.raises(ConfigError) as raised:
        _token({f"{PREFIX}AUTH_TOKEN": TOKEN, f"{PREFIX}AUTH_TOKEN_FILE": str(token_file)})

    assert f"{PREFIX}AUTH_TOKEN or {PREFIX}AUTH_TOKEN_FILE, not both" in str(raised.value)


def test_token_file_missing_names_setting_and_path(tmp_path):
    missing = tmp_path / "no-such-token"

    with pytest.raises(ConfigError) as raised:
        _token({f"{PREFIX}AUTH_TOKEN_FILE": str(missing)})

    assert str(raised.value) == f"{PREFIX}AUTH_TOKEN_FILE: cannot read {missing}: No such file or directory"


def test_token_file_that_is_folder_names_setting(tmp_path):
    with pytest.raises(ConfigError) as raised:
        _token({f"{PREFIX}AUTH_TOKEN_FILE": str(tmp_path)})

    assert str(raised.value) == f"{PREFIX}AUTH_TOKEN_FILE: cannot read {tmp_path}: Is a directory"


def test_token_file_empty_rejected(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("\n")

    with pytest.raises(ConfigError) as raised:
        _token({f"{PREFIX}AUTH_TOKEN_FILE": str(token_file)})

    assert str(raised.value) == f"{PREFIX}AUTH_TOKEN_FILE: the token file {token_file} is empty"


@pytest.mark.parametrize("token", ["two words", "tab\there", "caf\u00e9", "line\nbreak"])
def test_token_with_bad_characters_rejected(token):
    with pytest.raises(ConfigError) as raised:
        _token({f"{PREFIX}AUTH_TOKEN": token})

    assert str(raised.value).startswith(f"{PREFIX}AUTH_TOKEN must be printable ASCII")
    assert token not in str(raised.value)


def test_server_credentials_none_without_files():
    assert server_credentials(PREFIX, None, None, None) is None


def test_server_credentials_with_tls_and_client_ca(pki):
    plain = server_credentials(PREFIX, pki["server"].cert, pki["server"].key, None)
    mutual = server_credentials(PREFIX, pki["server"].cert, pki["server"].key, pki["ca"])

    assert isinstance(plain, grpc.ServerCredentials)
    assert isinstance(mutual, grpc.ServerCredentials)


def test_server_cert_without_key_rejected(pki):
    with pytest.raises(ConfigError) as raised:
        server_credentials(PREFIX, pki["server"].cert, None, None)

    assert str(raised.value) == f"{PREFIX}TLS_CERT is set but {PREFIX}TLS_KEY is not; set both or neither"


def test_server_key_without_cert_rejected(pki):
    with pytest.raises(ConfigError) as raised:
        server_credentials(PREFIX, None, pki["server"].key, None)

    assert str(raised.value) == f"{PREFIX}TLS_KEY is set but {PREFIX}TLS_CERT is not; set both or neither"


def test_client_ca_without_server_cert_rejected(pki):
    with pytest.raises(ConfigError) as raised:
        server_credentials(PREFIX, None, None, pki["ca"])

    assert str(raised.value).startswith(f"{PREFIX}TLS_CLIENT_CA is set but {PREFIX}TLS_CERT and {PREFIX}TLS_KEY")


@pytest.mark.parametrize("setting", ["TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA"])
def test_missing_server_file_names_setting_and_path(pki, tmp_path, setting):
    files = {"TLS_CERT": pki["server"].cert, "TLS_KEY": pki["server"].key, "TLS_CLIENT_CA": pki["ca"]}
    missing = tmp_path / "missing.pem"
    files[setting] = missing

    with pytest.raises(ConfigError) as raised:
        server_credentials(PREFIX, files["TLS_CERT"], files["TLS_KEY"], files["TLS_CLIENT_CA"])

    assert str(raised.value) == f"{PREFIX}{setting}: cannot read {missing}: No such file or directory"


def test_cert_file_without_certificate_rejected(pki):
    with pytest.raises(ConfigError) as raised:
        server_credentials(PREFIX, pki["server"].key, pki["server"].key, None)

    assert str(raised.value).startswith(f"{PREFIX}TLS_CERT: {pki['server'].key} contains no PEM certificate")


def test_key_file_without_key_rejected(pki):
    with pytest.raises(ConfigError) as raised:
        server_credentials(PREFIX, pki["server"].cert, pki["server"].cert, None)

    assert str(raised.value) == f"{PREFIX}TLS_KEY: {pki['server'].cert} contains no PEM private key"


def test_key_of_other_certificate_rejected(pki):
    with pytest.raises(ConfigError) as raised:
        server_credentials(PREFIX, pki["server"].cert, pki["other"].key, None)

    message = str(raised.value)
    assert message.startswith(f"{PREFIX}TLS_CERT and {PREFIX}TLS_KEY: {pki['server'].cert} and {pki['other'].key}")
    assert "KEY_VALUES_MISMATCH" in message


def test_encrypted_key_rejected(pki, tmp_path):
    key = serialization.load_pem_private_key(pki["server"].key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )

    with pytest.raises(ConfigError) as raised:
        server_credentials(PREFIX, pki["server"].cert, encrypted, None)

    assert str(raised.value) == f"{PREFIX}TLS_KEY: {encrypted} is encrypted; gRPC needs an unencrypted private key"


def test_client_ca_without_certificates_rejected(pki, tmp_path):
    not_a_bundle = tmp_path / "ca.pem"
    not_a_bundle.write_text("not a certificate\n")

    with pytest.raises(ConfigError) as raised:
        server_credentials(PREFIX, pki["server"].cert, pki["server"].key, not_a_bundle)

    assert str(raised.value).startswith(f"{PREFIX}TLS_CLIENT_CA: {not_a_bundle} is not a PEM bundle of CA certificates")


def test_channel_credentials_none_without_files():
    assert channel_credentials(None, None, None) is None


def test_channel_credentials_with_ca_only(pki):
    assert isinstance(channel_credentials(pki["ca"], None, None), grpc.ChannelCredentials)


def test_channel_credentials_with_client_cert(pki):
    credentials = channel_credentials(pki["ca"], pki["client"].cert, pki["client"].key)

    assert isinstance(credentials, grpc.ChannelCredentials)


def test_channel_cert_without_key_names_flags(pki):
    with pytest.raises(ConfigError) as raised:
        channel_credentials(pki["ca"], pki["client"].cert, None, names=("--ca", "--cert", "--key"))

    assert str(raised.value) == "--cert is set but --key is not; set both or neither"


def test_channel_missing_ca_names_setting(tmp_path):
    missing = tmp_path / "ca.pem"

    with pytest.raises(ConfigError) as raised:
        channel_credentials(missing, None, None, names=("EMBED_TLS_CA", "EMBED_TLS_CERT", "EMBED_TLS_KEY"))

    assert str(raised.value) == f"EMBED_TLS_CA: cannot read {missing}: No such file or directory"


@pytest.mark.parametrize(
    ("listen", "local"),
    [
        ("127.0.0.1:50051", True),
        ("127.0.0.2:0", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/tmp/imgsearch.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("192.168.1.20:50051", False),
        ("embed:50051", False),
        (":50051", False),
    ],
)
def test_is_local_address(listen, local):
    assert is_local_address(listen) is local


def _exposure_warnings(caplog) -> list[dict]:
    """Return the event dicts of the exposure warnings logged at level WARNING."""
    return [
        record.msg for record in caplog.records
        if record.levelno == logging.WARNING
        and isinstance(record.msg, dict)
        and record.msg.get("event") == "server_exposed_without_protection"
    ]


def test_warning_for_exposed_plaintext(caplog):
    caplog.set_level(logging.WARNING)

    warn_if_exposed("0.0.0.0:50051", tls=False, authenticated=False)

    [warning] = _exposure_warnings(caplog)
    assert warning["listen"] == "0.0.0.0:50051"
    assert warning["missing"] == ["tls", "authentication"]


def test_warning_for_exposed_tls_without_authentication(caplog):
    caplog.set_level(logging.WARNING)

    warn_if_exposed("[::]:50052", tls=True, authenticated=False)

    assert [warning["missing"] for warning in _exposure_warnings(caplog)] == [["authentication"]]


def test_warning_for_exposed_token_without_tls(caplog):
    caplog.set_level(logging.WARNING)

    warn_if_exposed("0.0.0.0:50052", tls=False, authenticated=True)

    assert [warning["missing"] for warning in _exposure_warnings(caplog)] == [["tls"]]


@pytest.mark.parametrize(
    ("listen", "tls", "authenticated"),
    [("0.0.0.0:50051", True, True), ("127.0.0.1:50051", False, False), ("localhost:0", False, False)],
)
def test_no_warning_when_protected_or_local(caplog, listen, tls, authenticated):
    caplog.set_level(logging.WARNING)

    warn_if_exposed(listen, tls=tls, authenticated=authenticated)

    assert _exposure_warnings(caplog) == []


def test_token_holders_hide_token_in_repr():
    assert TOKEN not in repr(BearerTokenInterceptor(TOKEN))
    assert TOKEN not in repr(BearerTokenSender(TOKEN))


def test_certificate_helper_writes_pem(pki):
    assert Path(pki["ca"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert Path(pki["server"].key).read_text().startswith("-----BEGIN PRIVATE KEY-----")
