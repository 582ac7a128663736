"""Operating errors are one line that names the cause and the setting to change, never a traceback; the
CLI finds the gateway through --url, TOLLGATE_URL, .tollgate/demo.json, else the local default."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.processes import free_port
from tollgate.cli import DEFAULT_GATEWAY_URL, admin_target
from tollgate.operating_errors import describe

CLI_TIMEOUT_S = 60


def tollgate(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`tollgate ARGS` as a newcomer runs it: in `cwd`, with no TOLLGATE_* or DATABASE_URL but `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_") and k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "tollgate", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def test_balance_without_a_gateway_is_one_line_naming_the_url_and_the_setting(tmp_path):
    """The defect: 233 lines of traceback for a refused connection to a URL it never named."""
    url = f"http://127.0.0.1:{free_port()}"
    result = tollgate("balance", "tn_x", cwd=tmp_path, TOLLGATE_URL=url, TOLLGATE_ADMIN_TOKEN="t" * 32)
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert url in line and "TOLLGATE_URL" in line and "Traceback" not in line


def test_the_url_option_wins_over_the_environment(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = tollgate(
        "balance",
        "tn_x",
        "--url",
        url,
        cwd=tmp_path,
        TOLLGATE_URL="http://127.0.0.1:1",
        TOLLGATE_ADMIN_TOKEN="t" * 32,
    )
    assert result.returncode == 1 and url in result.stderr


def test_no_admin_token_is_one_line_naming_the_setting(tmp_path):
    result = tollgate("balance", "tn_x", cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "TOLLGATE_ADMIN_TOKEN" in line


def test_the_gateway_url_comes_from_demo_json_else_the_local_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert admin_target(None, None) == (DEFAULT_GATEWAY_URL, None)
    (tmp_path / ".tollgate").mkdir()
    (tmp_path / ".tollgate" / "demo.json").write_text(
        json.dumps({"base_url": "http://h:1/v1", "admin_token": "a"})
    )
    assert admin_target(None, None) == ("http://h:1", "a")
    assert admin_target("http://other:2/", "b") == ("http://other:2", "b")


def test_dev_on_a_taken_port_is_one_line_naming_the_option(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = tollgate(
            "dev",
            "--port",
            str(port),
            "--worker-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / ".tollgate"),
            cwd=tmp_path,
        )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("tollgate dev:") and f"127.0.0.1:{port}" in line and "--port" in line


def test_migrate_without_a_database_is_one_line_naming_database_url(tmp_path):
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    result = tollgate("migrate", cwd=tmp_path, DATABASE_URL=url, TOLLGATE_CONNECT_ATTEMPTS_MAX="1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("tollgate migrate: database unreachable") and "DATABASE_URL" in last


@pytest.mark.parametrize(
    ("error", "setting"),
    [
        (OSError(errno.EADDRINUSE, "Address already in use"), "TOLLGATE_GATEWAY_PORT"),
        ("kafka", "TOLLGATE_KAFKA_BOOTSTRAP_SERVERS"),
        ("database", "DATABASE_URL"),
        ("spool", "TOLLGATE_SPOOL_PATH"),
    ],
)
def test_each_operating_error_names_its_setting_even_when_wrapped(error, setting, tmp_path):
    from aiokafka.errors import KafkaConnectionError

    from storage.database import DatabaseUnavailable
    from streams.spool import Spool, SpoolError

    if error == "kafka":
        error = KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")
    elif error == "database":
        error = DatabaseUnavailable("database did not answer after 1 attempts: connection refused")
    elif error == "spool":
        held = Spool(tmp_path / "s.sqlite3", 1024)
        try:
            Spool(tmp_path / "s.sqlite3", 1024)
        except SpoolError as locked:
            error = locked
        finally:
            held.close()
    wrapper = RuntimeError("while starting")
    wrapper.__cause__ = error
    line = describe(wrapper)
    assert line is not None and setting in line and "\n" not in line


def test_a_bug_is_not_an_operating_error():
    assert describe(ValueError("a programming error keeps its traceback")) is None
