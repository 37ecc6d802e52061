"""structlog set-up, called once from each program's main()."""

import logging
import sys

import structlog


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever sys.stderr is at the time of each record.

    Test runners swap sys.stderr per test; a handler bound to the first stream would write to a
    closed one.
    """

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(level: str = "info", json: bool | None = None, cache_loggers: bool = True) -> None:
    """Send structlog and stdlib records through one processor chain to stderr.

    Output is JSON lines unless stderr is a terminal; pass json to choose explicitly. Tests pass
    cache_loggers=False, because structlog.testing.capture_logs cannot reach a cached logger.
    """
    if json is None:
        json = not sys.stderr.isatty()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    exception_formatter = [structlog.processors.format_exc_info] if json else []

    structlog.configure(
        processors=shared + [structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=cache_loggers,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta]
        + exception_formatter
        + [renderer],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Pillow logs every PNG chunk it reads at debug level.
    logging.getLogger("PIL").setLevel(max(root.level, logging.INFO))
