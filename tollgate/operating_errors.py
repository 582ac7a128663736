"""Operating errors as one line: what failed, and the setting to change. Not a traceback.

An operating error is the world, not the code: a broker or database that does not answer, a port another
process holds, a spool file another process owns, a missing secret. `operating_errors(component)` wraps
a command; when one of these escapes it, the command prints `tollgate <component>: <line>` on stderr and
exits with status 1. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator

EXIT_OPERATING_ERROR = 1


class OperatingError(RuntimeError):
    """An operating error whose message already names the cause and the setting to change."""


class PortInUse(OperatingError):
    """A port this process must listen on is taken."""


def describe(error: BaseException) -> str | None:
    """One line naming the cause and the setting, or None when `error` is not an operating error.
    Looks through the chain of causes (a driver's error is often wrapped)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        line = _describe_one(current)
        if line is not None:
            return line
        current = current.__cause__ or current.__context__
    return None


def _describe_one(error: BaseException) -> str | None:
    from aiokafka.errors import KafkaConnectionError
    from psycopg import OperationalError

    from inference.internal_auth import InternalTokenMissing
    from storage.database import DatabaseUnavailable
    from streams.spool import SpoolError

    if isinstance(error, OperatingError):
        return _first_line(error)
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        return (
            f"address already in use ({error}): stop the process that holds the port, or set another "
            "(TOLLGATE_GATEWAY_PORT, TOLLGATE_WORKER_PORT, or --port for tollgate dev)"
        )
    if isinstance(error, DatabaseUnavailable | OperationalError):
        return (
            f"database unreachable ({_first_line(error)}): set DATABASE_URL to a running PostgreSQL, "
            "or unset it to use the embedded one"
        )
    if isinstance(error, KafkaConnectionError):
        return (
            f"Kafka broker unreachable ({_first_line(error)}): start it, or set "
            "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS to where it runs"
        )
    if isinstance(error, SpoolError | InternalTokenMissing):
        return _first_line(error)
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def operating_errors(component: str) -> Iterator[None]:
    """Turn an operating error escaping the block into one line on stderr and exit status 1."""
    try:
        yield
    except Exception as error:
        line = describe(error)
        if line is None:
            raise
        print(f"tollgate {component}: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_OPERATING_ERROR) from None
