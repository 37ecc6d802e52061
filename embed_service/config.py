"""Settings of the embed service, read from IMGSEARCH_EMBED_* environment variables."""

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from imgsearch_common.config import ConfigError, EnvReader
from imgsearch_common.metrics import parse_listen
from imgsearch_common.security import optional_path, server_credentials, token_from_env

ENV_PREFIX = "IMGSEARCH_EMBED_"
BACKENDS = ("onnx", "inference", "hash")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Settings of one embed service process. Each default applies when its variable is unset."""

    # gRPC address to bind, as host:port. Port 0 picks a free port.
    listen: str = "127.0.0.1:50051"
    # Name of the embedder that runs the model: "onnx", "inference" or "hash".
    backend: str = "onnx"
    # Folder with visual.onnx and the optional imgsearch-model.json (onnx backend).
    model_dir: Path = Path("models/tiny-clip-random")
    # Base URL of the Roboflow Inference server (inference backend).
    inference_url: str = "http://localhost:9001"
    # Roboflow API key sent with each request when not empty. Kept out of repr so it never reaches logs.
    inference_api_key: str = dataclasses.field(default="", repr=False)
    # CLIP model that the Inference server runs, sent as clip_version_id and used as model_id.
    clip_version_id: str = "ViT-B-32"
    # Maximum seconds for one HTTP request to the Inference server, its response body included.
    inference_timeout_s: float = 10.0
    # Maximum number of HTTP requests in flight to the Inference server, health probes included.
    inference_concurrency: int = 4
    # Number of times a request that failed with HTTP 5xx or a connection error is sent again.
    inference_retries: int = 2
    # Seconds of backoff before the first retry. Each later retry waits twice as long, with jitter.
    inference_backoff_s: float = 0.2
    # Seconds between health probes of the backend, while serving and while down.
    health_interval_s: float = 5.0
    # Number of images in a row that fail with UNAVAILABLE and so turn health NOT_SERVING before a probe.
    health_failure_threshold: int = 5
    # Maximum number of images that go to the backend in one call.
    batch_size: int = 16
    # Maximum size in bytes of one gRPC message, sent or received.
    max_message_bytes: int = 32 * _MIB
    # Maximum width x height of one image. Larger images are rejected before decoding.
    max_image_pixels: int = 50_000_000
    # Size of the gRPC server's thread pool: twice the index service's default, so that its 8 handler
    # threads, each with one EmbedImages stream open, stay below the stream limit of max_workers - 1.
    max_workers: int = 16
    # Number of ONNX Runtime intra-op threads, where 0 keeps ONNX Runtime's default.
    onnx_threads: int = 0
    # Seconds that running RPCs get to finish after SIGTERM or SIGINT.
    grace_s: float = 5.0
    # Minimum level of the log records that are written.
    log_level: str = "info"
    # PEM certificate chain and private key of the server. TLS is on when both are set.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # PEM bundle of the CAs that sign client certificates. When set, every client must present one (mutual TLS).
    tls_client_ca: Path | None = None
    # Bearer token that every RPC except health checks must send. Empty: no token check. Kept out of repr.
    auth_token: str = dataclasses.field(default="", repr=False)
    # HTTP address, as host:port, that serves Prometheus metrics at /metrics. Empty: no metrics server.
    metrics_listen: str = ""

    def __post_init__(self):
        # Also runs on dataclasses.replace(), so CLI overrides are checked like env vars.
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


_DEFAULTS = EmbedConfig()


def from_env(environ: Mapping[str, str]) -> EmbedConfig:
    """Build the config from IMGSEARCH_EMBED_* variables, raising ConfigError that names an invalid one."""
    env = EnvReader(ENV_PREFIX, environ)
    config = EmbedConfig(
        listen=env.str("LISTEN", _DEFAULTS.listen),
        backend=env.choice("BACKEND", _DEFAULTS.backend, BACKENDS),
        model_dir=Path(env.str("MODEL_DIR", str(_DEFAULTS.model_dir))),
        inference_url=env.str("INFERENCE_URL", _DEFAULTS.inference_url).rstrip("/"),
        inference_api_key=env.str("INFERENCE_API_KEY", _DEFAULTS.inference_api_key),
        clip_version_id=env.str("CLIP_VERSION_ID", _DEFAULTS.clip_version_id),
        inference_timeout_s=env.float("INFERENCE_TIMEOUT_S", _DEFAULTS.inference_timeout_s, minimum=0.001),
        inference_concurrency=env.int("INFERENCE_CONCURRENCY", _DEFAULTS.inference_concurrency, minimum=1),
        inference_retries=env.int("INFERENCE_RETRIES", _DEFAULTS.inference_retries, minimum=0),
        inference_backoff_s=env.float("INFERENCE_BACKOFF_S", _DEFAULTS.inference_backoff_s, minimum=0.0),
        health_interval_s=env.float("HEALTH_INTERVAL_S", _DEFAULTS.health_interval_s, minimum=0.01),
        health_failure_threshold=env.int(
            "HEALTH_FAILURE_THRESHOLD", _DEFAULTS.health_failure_threshold, minimum=1
        ),
        batch_size=env.int("BATCH_SIZE", _DEFAULTS.batch_size, minimum=1),
        max_message_bytes=env.int("MAX_MESSAGE_BYTES", _DEFAULTS.max_message_bytes, minimum=1024),
        max_image_pixels=env.int("MAX_IMAGE_PIXELS", _DEFAULTS.max_image_pixels, minimum=1),
        max_workers=env.int("MAX_WORKERS", _DEFAULTS.max_workers, minimum=1),
        onnx_threads=env.int("ONNX_THREADS", _DEFAULTS.onnx_threads, minimum=0),
        grace_s=env.float("GRACE_S", _DEFAULTS.grace_s, minimum=0.0),
        log_level=env.choice("LOG_LEVEL", _DEFAULTS.log_level, LOG_LEVELS),
        tls_cert=optional_path(env, "TLS_CERT"),
        tls_key=optional_path(env, "TLS_KEY"),
        tls_client_ca=optional_path(env, "TLS_CLIENT_CA"),
        auth_token=token_from_env(env, ENV_PREFIX, "AUTH_TOKEN"),
        metrics_listen=env.str("METRICS_LISTEN", _DEFAULTS.metrics_listen),
    )
    if config.metrics_listen:
        parse_listen(f"{ENV_PREFIX}METRICS_LISTEN", config.metrics_listen)
    _check_text_settings(config)
    # Reads the TLS files now, so that a missing or malformed one fails here with its setting's name.
    server_credentials(ENV_PREFIX, config.tls_cert, config.tls_key, config.tls_client_ca)
    return config


def _check_text_settings(config: EmbedConfig) -> None:
    if not config.listen:
        raise ConfigError(f"{ENV_PREFIX}LISTEN is empty. Set it to host:port, for example 127.0.0.1:50051")
    if not config.inference_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{ENV_PREFIX}INFERENCE_URL must start with http:// or https://, got {config.inference_url!r}"
        )
    if not config.clip_version_id:
        raise ConfigError(
            f"{ENV_PREFIX}CLIP_VERSION_ID is empty. Set it to a CLIP model name, for example ViT-B-32"
        )
