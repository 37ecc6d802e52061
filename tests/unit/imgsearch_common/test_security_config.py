"""The TLS and token settings of both services' configs, the CLI's flags for them, and their docker-compose entries."""

import pytest

from embed_service import config as embed_config
from imgsearch_client import cli
from imgsearch_common.config import ConfigError
from index_service import config as index_config
from tests.unit import test_compose
from tests.unit.imgsearch_common.security_certs import create_authority

TOKEN = "s3cret-token-4f1c"
CONFIG_MODULES = {"embed": embed_config, "index": index_config}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    authority = create_authority(folder, "main")
    return {"ca": authority.cert, "server": authority.issue_server("server"), "client": authority.issue_client("c")}


def _server_env(prefix: str, pki) -> dict[str, str]:
    return {
        f"{prefix}TLS_CERT": str(pki["server"].cert),
        f"{prefix}TLS_KEY": str(pki["server"].key),
        f"{prefix}TLS_CLIENT_CA": str(pki["ca"]),
        f"{prefix}AUTH_TOKEN": TOKEN,
    }


@pytest.mark.parametrize("service", sorted(CONFIG_MODULES))
def test_security_off_by_default(service):
    config = CONFIG_MODULES[service].from_env({})

    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (None, None, None)
    assert config.auth_token == ""


@pytest.mark.parametrize("service", sorted(CONFIG_MODULES))
def test_server_security_settings_read(service, pki):
    module = CONFIG_MODULES[service]

    config = module.from_env(_server_env(module.ENV_PREFIX, pki))

    assert config.tls_cert == pki["server"].cert
    assert config.tls_key == pki["server"].key
    assert config.tls_client_ca == pki["ca"]
    assert config.auth_token == TOKEN
    assert TOKEN not in repr(config)


@pytest.mark.parametrize("service", sorted(CONFIG_MODULES))
def test_auth_token_file_read(service, tmp_path):
    module = CONFIG_MODULES[service]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    config = module.from_env({f"{module.ENV_PREFIX}AUTH_TOKEN_FILE": str(token_file)})

    assert config.auth_token == TOKEN


@pytest.mark.parametrize("service", sorted(CONFIG_MODULES))
@pytest.mark.parametrize("setting", ["TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA", "AUTH_TOKEN_FILE"])
def test_missing_file_fails_with_setting_and_path(service, setting, pki, tmp_path):
    module = CONFIG_MODULES[service]
    environ = _server_env(module.ENV_PREFIX, pki)
    environ.pop(f"{module.ENV_PREFIX}AUTH_TOKEN")
    missing = tmp_path / "missing.pem"
    environ[module.ENV_PREFIX + setting] = str(missing)

    with pytest.raises(ConfigError) as raised:
        module.from_env(environ)

    assert str(raised.value) == f"{module.ENV_PREFIX}{setting}: cannot read {missing}: No such file or directory"


def test_index_embed_client_settings_read(pki, tmp_path):
    token_file = tmp_path / "embed-token"
    token_file.write_text(TOKEN)

    config = index_config.from_env({
        "IMGSEARCH_INDEX_EMBED_TLS_CA": str(pki["ca"]),
        "IMGSEARCH_INDEX_EMBED_TLS_CERT": str(pki["client"].cert),
        "IMGSEARCH_INDEX_EMBED_TLS_KEY": str(pki["client"].key),
        "IMGSEARCH_INDEX_EMBED_TOKEN_FILE": str(token_file),
    })

    assert config.embed_tls_ca == pki["ca"]
    assert config.embed_tls_cert == pki["client"].cert
    assert config.embed_tls_key == pki["client"].key
    assert config.embed_token == TOKEN
    assert TOKEN not in repr(config)
    assert index_config.embed_channel_credentials(config) is not None


def test_index_embed_plaintext_by_default():
    assert index_config.embed_channel_credentials(index_config.from_env({})) is None


@pytest.mark.parametrize("setting", ["EMBED_TLS_CA", "EMBED_TLS_CERT", "EMBED_TLS_KEY"])
def test_index_embed_missing_file_named(setting, pki, tmp_path):
    environ = {
        "IMGSEARCH_INDEX_EMBED_TLS_CA": str(pki["ca"]),
        "IMGSEARCH_INDEX_EMBED_TLS_CERT": str(pki["client"].cert),
        "IMGSEARCH_INDEX_EMBED_TLS_KEY": str(pki["client"].key),
    }
    missing = tmp_path / "missing.pem"
    environ["IMGSEARCH_INDEX_" + setting] = str(missing)

    with pytest.raises(ConfigError) as raised:
        index_config.from_env(environ)

    assert str(raised.value) == f"IMGSEARCH_INDEX_{setting}: cannot read {missing}: No such file or directory"


def test_index_embed_cert_without_key_rejected(pki):
    with pytest.raises(ConfigError) as raised:
        index_config.from_env({"IMGSEARCH_INDEX_EMBED_TLS_CERT": str(pki["client"].cert)})

    assert str(raised.value) == (
        "IMGSEARCH_INDEX_EMBED_TLS_CERT is set but IMGSEARCH_INDEX_EMBED_TLS_KEY is not; set both or neither"
    )


def test_serve_with_missing_tls_file_exits_1(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "embed.crt"
    monkeypatch.setenv("IMGSEARCH_EMBED_TLS_CERT", str(missing))
    monkeypatch.setenv("IMGSEARCH_EMBED_TLS_KEY", str(missing))

    status = cli.main(["serve", "embed", "--backend", "hash", "--listen", "127.0.0.1:0"])

    assert status == 1
    assert f"IMGSEARCH_EMBED_TLS_CERT: cannot read {missing}" in capsys.readouterr().err


def test_cli_connection_from_flags_and_env(tmp_path):
    args = cli.build_parser().parse_args(["stats", "--tls-ca", str(tmp_path / "flag-ca.pem")])
    environ = {
        "IMGSEARCH_TLS_CA": str(tmp_path / "env-ca.pem"),
        "IMGSEARCH_TLS_CERT": str(tmp_path / "env.crt"),
        "IMGSEARCH_TLS_KEY": str(tmp_path / "env.key"),
        "IMGSEARCH_TOKEN": TOKEN,
    }

    connection = cli._connection(args, environ)

    assert connection.tls_ca == tmp_path / "flag-ca.pem"
    assert connection.tls_cert == tmp_path / "env.crt"
    assert connection.tls_key == tmp_path / "env.key"
    assert connection.token == TOKEN
    assert TOKEN not in repr(connection)


def test_cli_token_flag_overrides_env():
    args = cli.build_parser().parse_args(["stats", "--token", "from-flag"])

    connection = cli._connection(args, {"IMGSEARCH_TOKEN": TOKEN})

    assert connection.token == "from-flag"
    assert connection.tls_ca is None


def test_cli_missing_ca_fails_with_flag_name(capsys, tmp_path):
    missing = tmp_path / "ca.pem"

    status = cli.main(["stats", "--addr", "127.0.0.1:1", "--tls-ca", str(missing)])

    assert status == 1
    assert f"--tls-ca or IMGSEARCH_TLS_CA: cannot read {missing}" in capsys.readouterr().err


def test_compose_passes_tokens_through():
    shell = {"IMGSEARCH_EMBED_TOKEN": "embed-token", "IMGSEARCH_INDEX_TOKEN": "index-token"}

    embed = test_compose.build_config("embed", shell)
    index = test_compose.build_config("index", shell)

    assert embed.auth_token == "embed-token"
    assert index.embed_token == "embed-token"
    assert index.auth_token == "index-token"


def test_compose_tokens_off_by_default():
    assert test_compose.build_config("embed").auth_token == ""
    assert test_compose.build_config("index").auth_token == ""
    assert test_compose.build_config("index").embed_token == ""
