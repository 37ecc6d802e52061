"""Run the embed service with settings from IMGSEARCH_EMBED_* environment variables."""

import os

import structlog

from embed_service.config import from_env
from embed_service.server import run
from imgsearch_common.config import ConfigError
from imgsearch_common.logs import configure_logging

log = structlog.get_logger(__name__)


def main() -> None:
    """Read the config, set up logging and serve until SIGTERM or SIGINT.

    Exits with status 2 when a setting is invalid.
    """
    try:
        config = from_env(os.environ)
    except ConfigError as error:
        configure_logging()
        log.error("config_invalid", error=str(error))
        raise SystemExit(2) from None
    configure_logging(config.log_level)
    run(config)


if __name__ == "__main__":
    main()
