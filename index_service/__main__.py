"""Entry point: python -m index_service [--listen HOST:PORT] [--embed-addr HOST:PORT] [--data-dir DIR]."""

import argparse
import dataclasses
import os
from pathlib import Path

from imgsearch_common.config import ConfigError
from imgsearch_common.logs import configure_logging
from index_service.collection import EmbedModelMismatchError
from index_service.config import IndexConfig, from_env
from index_service.server import run


def parse_args(argv: list[str] | None, config: IndexConfig) -> IndexConfig:
    """Return config with the values given on the command line replacing those from the environment."""
    parser = argparse.ArgumentParser(prog="python -m index_service", description="Run the index service.")
    parser.add_argument("--listen", help=f"host:port to serve on (default {config.listen})")
    parser.add_argument("--embed-addr", help=f"host:port of the embed service (default {config.embed_addr})")
    parser.add_argument("--data-dir", type=Path, help=f"directory of the SQLite store (default {config.data_dir})")
    args = parser.parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    return dataclasses.replace(config, **overrides)


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv, from_env(os.environ))
        configure_logging(config.log_level)
        run(config)
    except ConfigError as error:
        raise SystemExit(f"index_service: invalid configuration: {error}") from None
    except EmbedModelMismatchError as error:
        raise SystemExit(f"index_service: cannot start: {error}") from None


if __name__ == "__main__":
    main()
