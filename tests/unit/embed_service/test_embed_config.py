"""Tests of EmbedConfig and from_env: defaults, every variable, and rejected values."""

import dataclasses
from pathlib import Path

import pytest

from embed_service.config import EmbedConfig, from_env
from imgsearch_common.config import ConfigError


def test_from_env_defaults():
    config = from_env({})

    assert config.listen == "127.0.0.1:50051"
    assert config.backend == "onnx"
    assert config.model_dir == Path("models/tiny-clip-random")
    assert config.inference_url == "http://localhost:9001"
    assert config.inference_api_key == ""
    assert config.clip_version_id == "ViT-B-32"
    assert config.inference_timeout_s == 10.0
    assert config.inference_concurrency == 4
    assert config.inference_retries == 2
    assert config.inference_backoff_s == 0.2
    assert config.health_interval_s == 5.0
    assert config.health_failure_threshold == 5
    assert config.batch_size == 16
    assert config.max_message_bytes == 32 * 1024 * 1024
    assert config.max_image_pixels == 50_000_000
    assert config.max_workers == 16
    assert config.onnx_threads == 0
    assert config.grace_s == 5.0
    assert config.log_level == "info"


def test_from_env_reads_every_variable():
    environ = {
        "IMGSEARCH_EMBED_LISTEN": "127.0.0.1:0",
        "IMGSEARCH_EMBED_BACKEND": "inference",
        "IMGSEARCH_EMBED_MODEL_DIR": "/opt/models/clip",
        "IMGSEARCH_EMBED_INFERENCE_URL": "https://inference.example:9001/",
        "IMGSEARCH_EMBED_INFERENCE_API_KEY": "secret-key",
        "IMGSEARCH_EMBED_CLIP_VERSION_ID": "ViT-L-14",
        "IMGSEARCH_EMBED_INFERENCE_TIMEOUT_S": "2.5",
        "IMGSEARCH_EMBED_INFERENCE_CONCURRENCY": "2",
        "IMGSEARCH_EMBED_INFERENCE_RETRIES": "0",
        "IMGSEARCH_EMBED_INFERENCE_BACKOFF_S": "0.05",
        "IMGSEARCH_EMBED_HEALTH_INTERVAL_S": "1.5",
        "IMGSEARCH_EMBED_HEALTH_FAILURE_THRESHOLD": "7",
        "IMGSEARCH_EMBED_BATCH_SIZE": "4",
        "IMGSEARCH_EMBED_MAX_MESSAGE_BYTES": "1048576",
        "IMGSEARCH_EMBED_MAX_IMAGE_PIXELS": "1000",
        "IMGSEARCH_EMBED_MAX_WORKERS": "3",
        "IMGSEARCH_EMBED_ONNX_THREADS": "1",
        "IMGSEARCH_EMBED_GRACE_S": "0.5",
        "IMGSEARCH_EMBED_LOG_LEVEL": "debug",
    }

    config = from_env(environ)

    assert config == EmbedConfig(
        listen="127.0.0.1:0",
        backend="inference",
        model_dir=Path("/opt/models/clip"),
        inference_url="https://inference.example:9001",
        inference_api_key="secret-key",
        clip_version_id="ViT-L-14",
        inference_timeout_s=2.5,
        inference_concurrency=2,
        inference_retries=0,
        inference_backoff_s=0.05,
        health_interval_s=1.5,
        health_failure_threshold=7,
        batch_size=4,
        max_message_bytes=1048576,
        max_image_pixels=1000,
        max_workers=3,
        onnx_threads=1,
        grace_s=0.5,
        log_level="debug",
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BACKEND", "gpu"),
        ("BATCH_SIZE", "0"),
        ("BATCH_SIZE", "sixteen"),
        ("INFERENCE_CONCURRENCY", "0"),
        ("INFERENCE_TIMEOUT_S", "0"),
        ("INFERENCE_TIMEOUT_S", "soon"),
        ("INFERENCE_RETRIES", "-1"),
        ("INFERENCE_RETRIES", "two"),
        ("INFERENCE_BACKOFF_S", "-0.1"),
        ("HEALTH_INTERVAL_S", "0"),
        ("HEALTH_FAILURE_THRESHOLD", "0"),
        ("MAX_WORKERS", "0"),
        ("ONNX_THREADS", "-1"),
        ("GRACE_S", "-1"),
        ("LOG_LEVEL", "loud"),
        ("INFERENCE_URL", "localhost:9001"),
        ("LISTEN", ""),
        ("CLIP_VERSION_ID", ""),
    ],
)
def test_from_env_rejects_bad_value(name, value):
    with pytest.raises(ConfigError) as raised:
        from_env({f"IMGSEARCH_EMBED_{name}": value})

    assert f"IMGSEARCH_EMBED_{name}" in str(raised.value)


def test_replace_rejects_unknown_backend():
    with pytest.raises(ConfigError, match="backend must be one of onnx, inference, hash"):
        dataclasses.replace(EmbedConfig(), backend="torch")


def test_repr_hides_api_key():
    config = from_env({"IMGSEARCH_EMBED_INFERENCE_API_KEY": "secret-key"})

    assert "secret-key" not in repr(config)
