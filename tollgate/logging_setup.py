"""One logging setup for every entry point: `configure_logging()`.

    TOLLGATE_LOG_LEVEL    DEBUG, INFO (default), WARNING, ...
    TOLLGATE_LOG_FORMAT   json (default: one object per line, for a deployment's log collector) or plain
                          (what `tollgate dev` uses: a person reads it)

JSON lines carry the request id, tenant id and model of the request being served (context variables the
gateway's routes set), so every line of a request can be found. `quiet=True` (`tollgate dev` without
`-v`) keeps only what a person running it needs: warnings and errors, and the dev run's progress lines,
not the libraries' start-up chatter (alembic, pgserver's initdb output, one line per httpx request) nor
the warnings torch and platformdirs print on import.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
import warnings
from typing import Literal

import msgspec
from pydantic_settings import BaseSettings, SettingsConfigDict

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
tenant_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant_id", default=None)
model_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("model", default=None)

_encode = msgspec.json.Encoder().encode
RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Libraries that narrate their normal work at INFO; quiet mode shows only their warnings.
CHATTY_LOGGERS = (
    "alembic",
    "pgserver",
    "httpx",
    "httpcore",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "aiokafka",
    "faust",
    "mode",
    "storage.database",
)
# In quiet mode everything else logs warnings only (no line per request), except these progress lines.
PROGRESS_LOGGERS = ("tollgate.dev",)
# Warnings printed on import that say nothing about this system (torch built without NumPy, no XDG dir).
QUIET_WARNINGS = ("Failed to initialize NumPy", "XDG_RUNTIME_DIR is not set")

LogFormat = Literal["json", "plain"]


class LoggingSettings(BaseSettings):
    """How every component logs. Environment prefix `TOLLGATE_LOG_`."""

    model_config = SettingsConfigDict(env_prefix="TOLLGATE_LOG_", extra="ignore")

    level: str = "INFO"  # log level of every component (DEBUG, INFO, WARNING, ...)
    format: LogFormat = "json"  # json (one object per line) or plain; tollgate dev uses plain


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id_var.get(),
            "tenant_id": tenant_id_var.get(),
            "model": model_var.get(),
        }
        for key, value in record.__dict__.items():
            if key not in RESERVED and not key.startswith("_"):
                line[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encode(line).decode()


def configure_logging(
    level: str | None = None,
    *,
    log_format: LogFormat | None = None,
    quiet: bool = False,
    settings: LoggingSettings | None = None,
) -> LoggingSettings:
    """Replace the root handlers with one stderr handler in the configured format. Arguments given here
    win over the environment (`tollgate dev` says plain). Returns the settings in effect."""
    settings = settings or LoggingSettings()
    effective = settings.model_copy(
        update={k: v for k, v in (("format", log_format), ("level", level)) if v is not None}
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if effective.format == "json" else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(
        max(logging.getLevelName(effective.level.upper()), logging.WARNING)
        if quiet
        else effective.level.upper()
    )
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    for name in PROGRESS_LOGGERS:  # what a person running it follows, kept in quiet mode too
        logging.getLogger(name).setLevel(effective.level.upper() if quiet else logging.NOTSET)
    if quiet:
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{message}")
    logging.captureWarnings(True)  # a warning that does get through is a log line in the same format
    return effective
