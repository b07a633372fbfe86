"""structlog configuration for the server: JSON or console, to stderr.

Stdout stays free for the CLI's own output. The level comes from the
``--log-level`` flag, else ``PAGEDGEN_LOG_LEVEL`` (read by ``common.envs``).
Events are key-value; prompt text is never logged at info level.
"""

from __future__ import annotations

import logging
import sys

import structlog

LOG_FORMATS = ("console", "json")


def default_level() -> str:
    from common import envs

    return envs.log_level()


def configure_logging(fmt: str = "console", level: str | None = None) -> None:
    """Route structlog (and stdlib logging, e.g. grpc's) to stderr."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    level_name = (level or default_level()).upper()
    level_no = logging.getLevelName(level_name)
    if not isinstance(level_no, int):
        raise ValueError(f"unknown log level {level_name!r}")
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), exception_formatter=_no_locals()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if fmt == "json" else _passthrough,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=sys.stderr, level=level_no, format="%(levelname)s %(name)s: %(message)s",
                        force=True)


def _no_locals():
    """Tracebacks without local variables: rich shows them by default, and they hold prompts."""
    if structlog.dev.rich is not None:
        return structlog.dev.RichTracebackFormatter(show_locals=False)
    return structlog.dev.plain_traceback


def _passthrough(logger, method_name, event_dict):
    return event_dict    # the console renderer formats exc_info itself
