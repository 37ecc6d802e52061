"""Tests of index_service.config and the command-line overrides of index_service.__main__."""

from pathlib import Path

import pytest

from imgsearch_common.config import ConfigError
from index_service.__main__ import parse_args
from index_service.config import IndexConfig, from_env


def test_from_env_defaults():
    config = from_env({})

    assert config == IndexConfig()
    assert config.listen == "127.0.0.1:50052"
    assert config.embed_addr == "127.0.0.1:50051"
    assert config.data_dir == Path("data/index")
    assert config.max_message_bytes == 32 * 1024 * 1024
    assert config.max_image_bytes == 24 * 1024 * 1024
    assert config.max_image_pixels == 50_000_000
    assert config.device == "auto"
    assert config.near_max_phash_distance == 24
    assert config.near_max_local_difference == 0.43
    assert config.near_min_score == 0.70
    assert config.near_max_candidates == 200


def test_from_env_reads_every_variable():
    environ = {
        "IMGSEARCH_INDEX_LISTEN": "127.0.0.1:6000",
        "IMGSEARCH_INDEX_EMBED_ADDR": "127.0.0.1:6001",
        "IMGSEARCH_INDEX_DATA_DIR": "/tmp/index-data",
        "IMGSEARCH_INDEX_EMBED_TIMEOUT_S": "2.5",
        "IMGSEARCH_INDEX_DEFAULT_K": "5",
        "IMGSEARCH_INDEX_MAX_K": "50",
        "IMGSEARCH_INDEX_INGEST_BATCH_SIZE": "4",
        "IMGSEARCH_INDEX_MAX_MESSAGE_BYTES": "2000000",
        "IMGSEARCH_INDEX_MAX_IMAGE_BYTES": "1000000",
        "IMGSEARCH_INDEX_MAX_IMAGE_PIXELS": "1000",
        "IMGSEARCH_INDEX_MAX_WORKERS": "3",
        "IMGSEARCH_INDEX_DEVICE": "cpu",
        "IMGSEARCH_INDEX_FAISS_THREADS": "2",
        "IMGSEARCH_INDEX_GRACE_S": "0.5",
        "IMGSEARCH_INDEX_LOG_LEVEL": "debug",
        "IMGSEARCH_INDEX_NEAR_MAX_PHASH_DISTANCE": "12",
        "IMGSEARCH_INDEX_NEAR_MAX_LOCAL_DIFFERENCE": "0.3",
        "IMGSEARCH_INDEX_NEAR_MIN_SCORE": "-1",
        "IMGSEARCH_INDEX_NEAR_MAX_CANDIDATES": "50",
    }

    config = from_env(environ)

    assert config == IndexConfig(
        listen="127.0.0.1:6000",
        embed_addr="127.0.0.1:6001",
        data_dir=Path("/tmp/index-data"),
        embed_timeout_s=2.5,
        default_k=5,
        max_k=50,
        ingest_batch_size=4,
        max_message_bytes=2_000_000,
        max_image_bytes=1_000_000,
        max_image_pixels=1000,
        max_workers=3,
        device="cpu",
        faiss_threads=2,
        grace_s=0.5,
        log_level="debug",
        near_max_phash_distance=12,
        near_max_local_difference=0.3,
        near_min_score=-1.0,
        near_max_candidates=50,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_K", "many"),
        ("MAX_K", "0"),
        ("INGEST_BATCH_SIZE", "0"),
        ("EMBED_TIMEOUT_S", "soon"),
        ("FAISS_THREADS", "-1"),
        ("DEVICE", "tpu"),
        ("LOG_LEVEL", "loud"),
        ("NEAR_MAX_PHASH_DISTANCE", "-1"),
        ("NEAR_MAX_PHASH_DISTANCE", "65"),
        ("NEAR_MAX_PHASH_DISTANCE", "many"),
        ("NEAR_MAX_LOCAL_DIFFERENCE", "-0.1"),
        ("NEAR_MAX_LOCAL_DIFFERENCE", "nan"),
        ("NEAR_MIN_SCORE", "-1.5"),
        ("NEAR_MIN_SCORE", "1.5"),
        ("NEAR_MIN_SCORE", "nan"),
        ("NEAR_MAX_CANDIDATES", "0"),
    ],
)
def test_from_env_rejects_bad_value(name, value):
    with pytest.raises(ConfigError, match=f"IMGSEARCH_INDEX_{name}"):
        from_env({f"IMGSEARCH_INDEX_{name}": value})


def test_from_env_rejects_default_k_above_max_k():
    with pytest.raises(ConfigError, match="DEFAULT_K"):
        from_env({"IMGSEARCH_INDEX_DEFAULT_K": "20", "IMGSEARCH_INDEX_MAX_K": "10"})


def test_from_env_rejects_image_limit_above_message_limit():
    environ = {"IMGSEARCH_INDEX_MAX_IMAGE_BYTES": "3000", "IMGSEARCH_INDEX_MAX_MESSAGE_BYTES": "2000"}

    with pytest.raises(ConfigError, match="MAX_IMAGE_BYTES"):
        from_env(environ)


def test_parse_args_overrides_addresses_and_data_dir():
    base = IndexConfig(max_k=7)

    config = parse_args(
        ["--listen", "127.0.0.1:7000", "--embed-addr", "127.0.0.1:7001", "--data-dir", "elsewhere"], base
    )

    assert config.listen == "127.0.0.1:7000"
    assert config.embed_addr == "127.0.0.1:7001"
    assert config.data_dir == Path("elsewhere")
    assert config.max_k == 7


def test_parse_args_keeps_config_without_flags():
    base = IndexConfig(listen="127.0.0.1:7100")

    assert parse_args([], base) == base


def test_from_env_durability_and_metadata_defaults():
    config = from_env({})

    assert config.snapshot_interval_s == 300.0
    assert config.snapshot_after_changes == 100_000
    assert config.removal == "auto"
    assert config.max_masked_removals == 1024
    assert (config.max_metadata_keys, config.max_metadata_key_bytes, config.max_metadata_value_bytes) == (64, 256, 4096)


def test_from_env_reads_durability_and_metadata_variables():
    environ = {
        "IMGSEARCH_INDEX_SNAPSHOT_INTERVAL_S": "0",
        "IMGSEARCH_INDEX_SNAPSHOT_AFTER_CHANGES": "500",
        "IMGSEARCH_INDEX_REMOVAL": "mask",
        "IMGSEARCH_INDEX_MAX_MASKED_REMOVALS": "0",
        "IMGSEARCH_INDEX_MAX_METADATA_KEYS": "3",
        "IMGSEARCH_INDEX_MAX_METADATA_KEY_BYTES": "10",
        "IMGSEARCH_INDEX_MAX_METADATA_VALUE_BYTES": "0",
    }

    config = from_env(environ)

    assert (config.snapshot_interval_s, config.snapshot_after_changes) == (0.0, 500)
    assert (config.removal, config.max_masked_removals) == ("mask", 0)
    assert (config.max_metadata_keys, config.max_metadata_key_bytes, config.max_metadata_value_bytes) == (3, 10, 0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SNAPSHOT_INTERVAL_S", "-1"),
        ("SNAPSHOT_INTERVAL_S", "often"),
        ("SNAPSHOT_AFTER_CHANGES", "-5"),
        ("REMOVAL", "delete"),
        ("MAX_MASKED_REMOVALS", "-1"),
        ("MAX_METADATA_KEYS", "0"),
        ("MAX_METADATA_KEY_BYTES", "0"),
        ("MAX_METADATA_VALUE_BYTES", "-1"),
    ],
)
def test_from_env_rejects_bad_durability_value(name, value):
    with pytest.raises(ConfigError, match=f"IMGSEARCH_INDEX_{name}"):
        from_env({f"IMGSEARCH_INDEX_{name}": value})


def test_from_env_reads_the_index_settings():
    config = from_env({
        "IMGSEARCH_INDEX_KIND": "hnsw",
        "IMGSEARCH_INDEX_ENCODING": "sq8",
        "IMGSEARCH_INDEX_IVF_MIN_ITEMS": "5000",
        "IMGSEARCH_INDEX_NLIST": "128",
        "IMGSEARCH_INDEX_NPROBE": "8",
        "IMGSEARCH_INDEX_HNSW_M": "16",
        "IMGSEARCH_INDEX_EF_SEARCH": "40",
        "IMGSEARCH_INDEX_TRAIN_ITEMS": "20000",
        "IMGSEARCH_INDEX_SEARCH_BATCH_SIZE": "64",
    })

    spec = config.index_spec
    assert (spec.kind, spec.encoding, spec.ivf_min_items, spec.nlist) == ("hnsw", "sq8", 5000, 128)
    assert (spec.nprobe, spec.hnsw_m, spec.ef_search, spec.train_items) == (8, 16, 40, 20000)
    assert config.search_batch_size == 64


@pytest.mark.parametrize(
    ("name", "value"),
    [("KIND", "lsh"), ("ENCODING", "pq"), ("NPROBE", "0"), ("TRAIN_ITEMS", "10"), ("HNSW_M", "1")],
)
def test_from_env_rejects_bad_index_setting(name, value):
    with pytest.raises(ConfigError, match=f"IMGSEARCH_INDEX_{name}"):
        from_env({f"IMGSEARCH_INDEX_{name}": value})
