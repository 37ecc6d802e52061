"""Settings of the index service, read from IMGSEARCH_INDEX_* environment variables."""

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

from imgsearch_common.config import ConfigError, EnvReader
from index_service.duplicates import MAX_PHASH_DISTANCE

ENV_PREFIX = "IMGSEARCH_INDEX_"
DEVICES = ("auto", "cpu", "gpu")
LOG_LEVELS = ("debug", "info", "warning", "error")
_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Settings of one index service process."""

    listen: str = "127.0.0.1:50052"
    embed_addr: str = "127.0.0.1:50051"
    data_dir: Path = Path("data/index")
    embed_timeout_s: float = 30.0
    default_k: int = 10
    max_k: int = 1000
    ingest_batch_size: int = 16
    max_message_bytes: int = 32 * _MIB
    max_image_bytes: int = 24 * _MIB
    max_image_pixels: int = 50_000_000
    max_workers: int = 8
    device: str = "auto"
    faiss_threads: int = 0
    grace_s: float = 5.0
    log_level: str = "info"
    # The default near-duplicate policy. docs/duplicates.md gives the measurements behind the values.
    near_max_phash_distance: int = 24
    near_max_local_difference: float = 0.43
    near_min_score: float = 0.70
    # The maximum number of pHash candidates whose local difference one query measures (about 3.5 ms each).
    near_max_candidates: int = 200


def from_env(environ: Mapping[str, str]) -> IndexConfig:
    """Build the config from IMGSEARCH_INDEX_* variables, with defaults for unset ones.

    Raises ConfigError naming the variable when a value is malformed or inconsistent.
    """
    env = EnvReader(ENV_PREFIX, environ)
    default = IndexConfig()
    config = IndexConfig(
        listen=env.str("LISTEN", default.listen),
        embed_addr=env.str("EMBED_ADDR", default.embed_addr),
        data_dir=Path(env.str("DATA_DIR", str(default.data_dir))),
        embed_timeout_s=env.float("EMBED_TIMEOUT_S", default.embed_timeout_s, minimum=0.001),
        default_k=env.int("DEFAULT_K", default.default_k, minimum=1),
        max_k=env.int("MAX_K", default.max_k, minimum=1),
        ingest_batch_size=env.int("INGEST_BATCH_SIZE", default.ingest_batch_size, minimum=1),
        max_message_bytes=env.int("MAX_MESSAGE_BYTES", default.max_message_bytes, minimum=1024),
        max_image_bytes=env.int("MAX_IMAGE_BYTES", default.max_image_bytes, minimum=1),
        max_image_pixels=env.int("MAX_IMAGE_PIXELS", default.max_image_pixels, minimum=1),
        max_workers=env.int("MAX_WORKERS", default.max_workers, minimum=1),
        device=env.choice("DEVICE", default.device, DEVICES),
        faiss_threads=env.int("FAISS_THREADS", default.faiss_threads, minimum=0),
        grace_s=env.float("GRACE_S", default.grace_s, minimum=0.0),
        log_level=env.choice("LOG_LEVEL", default.log_level, LOG_LEVELS),
        near_max_phash_distance=env.int("NEAR_MAX_PHASH_DISTANCE", default.near_max_phash_distance, minimum=0),
        near_max_local_difference=env.float(
            "NEAR_MAX_LOCAL_DIFFERENCE", default.near_max_local_difference, minimum=0.0
        ),
        near_min_score=env.float("NEAR_MIN_SCORE", default.near_min_score, minimum=-1.0),
        near_max_candidates=env.int("NEAR_MAX_CANDIDATES", default.near_max_candidates, minimum=1),
    )
    _check_consistency(config)
    return config


def _check_consistency(config: IndexConfig) -> None:
    if config.default_k > config.max_k:
        raise ConfigError(
            f"{ENV_PREFIX}DEFAULT_K ({config.default_k}) must not exceed {ENV_PREFIX}MAX_K ({config.max_k})"
        )
    if config.max_image_bytes > config.max_message_bytes:
        raise ConfigError(
            f"{ENV_PREFIX}MAX_IMAGE_BYTES ({config.max_image_bytes}) must not exceed "
            f"{ENV_PREFIX}MAX_MESSAGE_BYTES ({config.max_message_bytes}), "
            "because an image arrives inside one gRPC message"
        )
    if config.near_max_phash_distance > MAX_PHASH_DISTANCE:
        raise ConfigError(
            f"{ENV_PREFIX}NEAR_MAX_PHASH_DISTANCE must be at most {MAX_PHASH_DISTANCE}, the bits of a pHash, "
            f"got {config.near_max_phash_distance}"
        )
    if math.isnan(config.near_max_local_difference):
        raise ConfigError(f"{ENV_PREFIX}NEAR_MAX_LOCAL_DIFFERENCE must be a number, got nan")
    if not -1.0 <= config.near_min_score <= 1.0:
        raise ConfigError(f"{ENV_PREFIX}NEAR_MIN_SCORE must be between -1 and 1, got {config.near_min_score}")
