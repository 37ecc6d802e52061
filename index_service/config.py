"""Settings of the index service, read from IMGSEARCH_INDEX_* environment variables."""

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import grpc

from imgsearch_common.config import ConfigError, EnvReader
from imgsearch_common.metrics import parse_listen
from imgsearch_common.security import channel_credentials, optional_path, server_credentials, token_from_env
from index_service.duplicates import MAX_PHASH_DISTANCE
from index_service.index_layout import ENCODINGS, KINDS, IndexSpec
from index_service.vector_index import REMOVAL_MODES

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
    # PEM certificate chain and private key of the server. TLS is on when both are set.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # PEM bundle of the CAs that sign client certificates. When set, every client must present one (mutual TLS).
    tls_client_ca: Path | None = None
    # Bearer token that every RPC except health checks must send. Empty: no token check. Kept out of repr.
    auth_token: str = dataclasses.field(default="", repr=False)
    # PEM CA bundle that verifies the embed service's certificate. Any of the three EMBED_TLS files turns on
    # TLS to the embed service; without this one, gRPC's default roots verify it.
    embed_tls_ca: Path | None = None
    # PEM client certificate and private key that the index service presents to the embed service (mutual TLS).
    embed_tls_cert: Path | None = None
    embed_tls_key: Path | None = None
    # Bearer token sent to the embed service on every call. Empty: none is sent. Kept out of repr.
    embed_token: str = dataclasses.field(default="", repr=False)
    # Seconds between snapshots of the indexes, written only when something changed; 0 turns them off.
    snapshot_interval_s: float = 300.0
    # Adds and removals after which a snapshot is written without waiting for the interval; 0 turns it off.
    snapshot_after_changes: int = 100_000
    # How the faiss index drops removed vectors: "remove_ids" at once (CPU only), "mask" (hidden, then
    # rebuilt from the store), or "auto": remove_ids on the CPU, mask on a GPU.
    removal: str = "auto"
    # Removed items that a masking index may hide before it is rebuilt from the store. On a GPU, MAX_K
    # plus this must stay at or below 2048, the largest k that faiss's GPU search takes.
    max_masked_removals: int = 1024
    # Limits on item metadata, at ingest and in UpdateMetadata: the number of keys, and the UTF-8
    # bytes of one key and of one value.
    max_metadata_keys: int = 64
    max_metadata_key_bytes: int = 256
    max_metadata_value_bytes: int = 4096
    # HTTP address, as host:port, that serves Prometheus metrics at /metrics. Empty: no metrics server.
    metrics_listen: str = ""
    # The vector index (see index_service.index_layout). Kind is auto, flat, ivf or hnsw, and encoding
    # float32, fp16 or sq8. Auto turns IVF at ivf_min_items. nlist 0 means about 4 * sqrt(items). nprobe
    # and ef_search are the defaults of searches that set none. At most train_items vectors train an index.
    index_kind: str = "auto"
    index_encoding: str = "float32"
    ivf_min_items: int = 100_000
    nlist: int = 0
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128
    train_items: int = 50_000
    # Queries searched together at most, when several arrive at once.
    search_batch_size: int = 1024
    # Embeddings (not images) of one ingest stream that are stored in one transaction at most.
    ingest_vector_batch_size: int = 512

    @property
    def index_spec(self) -> IndexSpec:
        return IndexSpec(
            kind=self.index_kind,
            encoding=self.index_encoding,
            ivf_min_items=self.ivf_min_items,
            nlist=self.nlist,
            nprobe=self.nprobe,
            hnsw_m=self.hnsw_m,
            ef_search=self.ef_search,
            train_items=self.train_items,
        )


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
        tls_cert=optional_path(env, "TLS_CERT"),
        tls_key=optional_path(env, "TLS_KEY"),
        tls_client_ca=optional_path(env, "TLS_CLIENT_CA"),
        auth_token=token_from_env(env, ENV_PREFIX, "AUTH_TOKEN"),
        embed_tls_ca=optional_path(env, "EMBED_TLS_CA"),
        embed_tls_cert=optional_path(env, "EMBED_TLS_CERT"),
        embed_tls_key=optional_path(env, "EMBED_TLS_KEY"),
        embed_token=token_from_env(env, ENV_PREFIX, "EMBED_TOKEN"),
        snapshot_interval_s=env.float("SNAPSHOT_INTERVAL_S", default.snapshot_interval_s, minimum=0.0),
        snapshot_after_changes=env.int("SNAPSHOT_AFTER_CHANGES", default.snapshot_after_changes, minimum=0),
        removal=env.choice("REMOVAL", default.removal, REMOVAL_MODES),
        max_masked_removals=env.int("MAX_MASKED_REMOVALS", default.max_masked_removals, minimum=0),
        max_metadata_keys=env.int("MAX_METADATA_KEYS", default.max_metadata_keys, minimum=1),
        max_metadata_key_bytes=env.int("MAX_METADATA_KEY_BYTES", default.max_metadata_key_bytes, minimum=1),
        max_metadata_value_bytes=env.int("MAX_METADATA_VALUE_BYTES", default.max_metadata_value_bytes, minimum=0),
        metrics_listen=env.str("METRICS_LISTEN", default.metrics_listen),
        index_kind=env.choice("KIND", default.index_kind, KINDS),
        index_encoding=env.choice("ENCODING", default.index_encoding, ENCODINGS),
        ivf_min_items=env.int("IVF_MIN_ITEMS", default.ivf_min_items, minimum=1),
        nlist=env.int("NLIST", default.nlist, minimum=0),
        nprobe=env.int("NPROBE", default.nprobe, minimum=1),
        hnsw_m=env.int("HNSW_M", default.hnsw_m, minimum=2),
        ef_search=env.int("EF_SEARCH", default.ef_search, minimum=1),
        train_items=env.int("TRAIN_ITEMS", default.train_items, minimum=1000),
        search_batch_size=env.int("SEARCH_BATCH_SIZE", default.search_batch_size, minimum=1),
        ingest_vector_batch_size=env.int("INGEST_VECTOR_BATCH_SIZE", default.ingest_vector_batch_size, minimum=1),
    )
    if config.metrics_listen:
        parse_listen(f"{ENV_PREFIX}METRICS_LISTEN", config.metrics_listen)
    _check_consistency(config)
    # Reads the TLS files now, so that a missing or malformed one fails here with its setting's name.
    server_credentials(ENV_PREFIX, config.tls_cert, config.tls_key, config.tls_client_ca)
    embed_channel_credentials(config)
    return config


def embed_channel_credentials(config: IndexConfig) -> grpc.ChannelCredentials | None:
    """Build the TLS credentials of the channel to the embed service, or None for plaintext.

    Raises ConfigError naming the IMGSEARCH_INDEX_EMBED_TLS_* setting of a file that cannot be used.
    """
    names = tuple(f"{ENV_PREFIX}EMBED_TLS_{name}" for name in ("CA", "CERT", "KEY"))
    return channel_credentials(config.embed_tls_ca, config.embed_tls_cert, config.embed_tls_key, names)


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
