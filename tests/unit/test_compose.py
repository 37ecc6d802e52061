"""Check docker-compose.yml and the Dockerfile against the config code of the two services."""

import re
import shlex
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from embed_service import config as embed_config
from imgsearch_common.config import ConfigError
from index_service import config as index_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# ${NAME} and ${NAME:-default}, the two interpolation forms that docker-compose.yml uses.
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")
CONFIG_MODULES = {"embed": embed_config, "index": index_config}
SERVICES = {"inference", "inference-gpu", "embed", "index"}


def interpolate(value: str, shell: Mapping[str, str]) -> str:
    """Replace each ${NAME:-default} with shell[NAME], or with its default when NAME is unset or empty."""

    def _replace(match: re.Match) -> str:
        return shell.get(match["name"]) or (match["default"] or "")

    result = _VARIABLE.sub(_replace, value)
    assert "$" not in result, f"unsupported interpolation left in {value!r}"
    return result


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def image_env() -> dict[str, str]:
    """Return the ENV settings of the Dockerfile's last stage, the image that Compose runs."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    last_stage = text.split("\nFROM ")[-1]
    env = {}
    for line in last_stage.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[len("ENV "):]):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def container_env(service: str, shell: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a service's process: the image's ENV, overridden by Compose's."""
    environment = load_compose()["services"][service]["environment"]
    compose_env = {name: interpolate(str(value), shell or {}) for name, value in environment.items()}
    return {**image_env(), **compose_env}


def build_config(service: str, shell: Mapping[str, str] | None = None):
    return CONFIG_MODULES[service].from_env(container_env(service, shell))


def published_ports(service: str, shell: Mapping[str, str] | None = None) -> list[tuple[str, int, int]]:
    """Return (host address, host port, container port) for each published port of a service."""
    ports = []
    for entry in load_compose()["services"][service]["ports"]:
        host_address, host_port, container_port = interpolate(entry, shell or {}).split(":")
        ports.append((host_address, int(host_port), int(container_port)))
    return ports


def listen_port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def test_compose_defines_the_services():
    compose = load_compose()

    assert set(compose["services"]) == SERVICES


@pytest.mark.parametrize("service", sorted(CONFIG_MODULES))
def test_config_parses_compose_env(service):
    config = build_config(service)

    assert config.listen.startswith("0.0.0.0:")
    assert config.log_level == "info"


@pytest.mark.parametrize("service", sorted(CONFIG_MODULES))
def test_published_port_is_listen_port(service):
    config = build_config(service)

    assert [port[2] for port in published_ports(service)] == [listen_port(config.listen),
                                                               listen_port(config.metrics_listen)]


def test_index_settings_pass_from_the_shell():
    default = build_config("index")
    tuned = build_config("index", {"IMGSEARCH_INDEX_KIND": "hnsw", "IMGSEARCH_INDEX_ENCODING": "sq8",
                                   "IMGSEARCH_INDEX_NPROBE": "8"})

    assert (default.index_kind, default.index_encoding, default.nprobe) == ("auto", "float32", 32)
    assert (tuned.index_kind, tuned.index_encoding, tuned.nprobe) == ("hnsw", "sq8", 8)


@pytest.mark.parametrize(("service", "port"), [("embed", 9101), ("index", 9102)])
def test_metrics_ports_bind_to_loopback_by_default(service, port):
    assert published_ports(service)[1] == ("127.0.0.1", port, port)
    assert published_ports(service, {"IMGSEARCH_METRICS_BIND": "0.0.0.0"})[1][0] == "0.0.0.0"


@pytest.mark.parametrize(
    ("service", "variable", "default"),
    [
        ("embed", "IMGSEARCH_EMBED_PORT", 50051),
        ("index", "IMGSEARCH_INDEX_PORT", 50052),
        ("inference", "INFERENCE_PORT", 9001),
        ("inference-gpu", "INFERENCE_GPU_PORT", 9002),
    ],
)
def test_host_ports_are_overridable(service, variable, default):
    assert published_ports(service)[0] == ("127.0.0.1", default, published_ports(service)[0][2])

    moved = published_ports(service, {variable: "6000", "IMGSEARCH_BIND_ADDR": "0.0.0.0"})

    assert moved[0] == ("0.0.0.0", 6000, published_ports(service)[0][2])


def test_inference_servers_publish_port_9001():
    assert [port[2] for port in published_ports("inference")] == [9001]
    assert [port[2] for port in published_ports("inference-gpu")] == [9001]


def test_embed_calls_cpu_inference_by_default():
    config = build_config("embed")

    assert config.backend == "inference"
    assert config.inference_url == "http://inference:9001"
    assert config.inference_api_key == ""
    assert config.clip_version_id == "ViT-B-32"


def test_embed_inference_url_is_overridable():
    config = build_config("embed", {"IMGSEARCH_INFERENCE_URL": "http://inference-gpu:9001"})

    assert config.inference_url == "http://inference-gpu:9001"


def test_api_key_comes_from_shell():
    environment = load_compose()["services"]["embed"]["environment"]

    assert environment["IMGSEARCH_EMBED_INFERENCE_API_KEY"] == "${ROBOFLOW_API_KEY:-}"
    assert build_config("embed", {"ROBOFLOW_API_KEY": "key-123"}).inference_api_key == "key-123"


def test_index_reaches_embed_service():
    embed = build_config("embed")
    index = build_config("index")

    host, port = index.embed_addr.rsplit(":", 1)
    assert host == "embed"
    assert int(port) == listen_port(embed.listen)


def test_index_data_dir_is_named_volume():
    compose = load_compose()
    config = build_config("index")

    assert f"index-data:{config.data_dir}" in compose["services"]["index"]["volumes"]
    assert "index-data" in compose["volumes"]


def test_image_default_model_dir_is_copied():
    env = image_env()

    assert env["IMGSEARCH_EMBED_MODEL_DIR"] == "/opt/imgsearch/models/tiny-clip-random"
    assert "COPY models/tiny-clip-random /opt/imgsearch/models/tiny-clip-random" in DOCKERFILE.read_text()


def _env_names() -> list:
    """List every IMGSEARCH_ name set in docker-compose.yml or the Dockerfile, with its service."""
    compose = load_compose()
    params = [
        pytest.param(service, name, id=f"compose-{name}")
        for service in sorted(CONFIG_MODULES)
        for name in compose["services"][service]["environment"]
        if name.startswith("IMGSEARCH_")
    ]
    for name in image_env():
        if name.startswith("IMGSEARCH_"):
            service = "embed" if name.startswith(embed_config.ENV_PREFIX) else "index"
            params.append(pytest.param(service, name, id=f"dockerfile-{name}"))
    return params


def _other_value(value: str) -> str:
    """Return a value unlike `value`: another port for host:port, otherwise a suffixed string."""
    host, _, port = value.rpartition(":")
    if host and port.isdigit():
        return f"{host}:{int(port) + 1}"
    return value + "-changed"


@pytest.mark.parametrize(("service", "name"), _env_names())
def test_env_name_is_read_by_config(service, name):
    env = container_env(service)
    assert name.startswith(CONFIG_MODULES[service].ENV_PREFIX)
    baseline = CONFIG_MODULES[service].from_env(env)

    # A name that the config reads either changes the config or is rejected as invalid.
    changed_env = {**env, name: _other_value(env[name])}
    try:
        changed = CONFIG_MODULES[service].from_env(changed_env)
    except ConfigError:
        return
    assert changed != baseline, f"{name} is set for {service} but its config does not read it"


def test_env_name_check_catches_unread_name():
    env = {**container_env("index"), "IMGSEARCH_INDEX_NOT_A_SETTING": "x"}
    baseline = index_config.from_env(env)

    changed = index_config.from_env({**env, "IMGSEARCH_INDEX_NOT_A_SETTING": "x-changed"})

    assert changed == baseline


@pytest.mark.parametrize("service", sorted(CONFIG_MODULES))
def test_healthcheck_runs_imgsearch_health(service):
    config = build_config(service)
    healthcheck = load_compose()["services"][service]["healthcheck"]

    test = healthcheck["test"]
    assert test[:5] == ["CMD", "imgsearch", "health", "--addr", f"127.0.0.1:{listen_port(config.listen)}"]
    assert test[5:] == ["--timeout", "4"]
    assert _seconds(healthcheck["timeout"]) > 4


@pytest.mark.parametrize("service", ["inference", "inference-gpu"])
def test_inference_healthcheck_gets_healthz(service):
    healthcheck = load_compose()["services"][service]["healthcheck"]

    test = healthcheck["test"]
    assert test[:3] == ["CMD", "python3", "-c"]
    assert "urllib.request.urlopen('http://127.0.0.1:9001/healthz', timeout=4)" in test[3]
    assert _seconds(healthcheck["timeout"]) > 4


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_healthcheck_has_timings(service):
    healthcheck = load_compose()["services"][service]["healthcheck"]

    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in healthcheck, f"{service} healthcheck has no {key}"


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"expected a duration like 5s, got {duration!r}"
    return float(match[1])


def test_embed_waits_for_healthy_inference():
    depends_on = load_compose()["services"]["embed"]["depends_on"]

    assert depends_on["inference"] == {"condition": "service_healthy"}
    assert depends_on["inference-gpu"] == {"condition": "service_healthy", "required": False}


def test_index_waits_for_healthy_embed():
    depends_on = load_compose()["services"]["index"]["depends_on"]

    assert depends_on == {"embed": {"condition": "service_healthy"}}


def test_gpu_server_is_in_gpu_profile():
    services = load_compose()["services"]

    assert services["inference-gpu"]["profiles"] == ["gpu"]
    for name in SERVICES - {"inference-gpu"}:
        assert "profiles" not in services[name], f"{name} must start without a profile"


def test_gpu_server_reserves_nvidia_gpu():
    service = load_compose()["services"]["inference-gpu"]

    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert service["image"].startswith("roboflow/roboflow-inference-server-gpu:")


def test_cpu_server_uses_cpu_image():
    service = load_compose()["services"]["inference"]

    assert service["image"].startswith("roboflow/roboflow-inference-server-cpu:")
    assert "deploy" not in service


@pytest.mark.parametrize("service", ["inference", "inference-gpu"])
def test_inference_server_gets_api_key(service):
    environment = load_compose()["services"][service]["environment"]

    assert environment["ROBOFLOW_API_KEY"] == "${ROBOFLOW_API_KEY:-}"


@pytest.mark.parametrize("service", sorted(CONFIG_MODULES))
def test_service_runs_image_command(service):
    compose_service = load_compose()["services"][service]

    assert compose_service["command"] == ["serve", service]
    assert compose_service["build"] == "."


def test_interpolate_uses_default_when_unset_or_empty():
    assert interpolate("${A:-x}", {}) == "x"
    assert interpolate("${A:-x}", {"A": ""}) == "x"
    assert interpolate("${A:-x}", {"A": "y"}) == "y"
    assert interpolate("${A}", {}) == ""
    assert interpolate("a${A:-}b", {}) == "ab"
