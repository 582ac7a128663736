"""What `make run` prints: the progress, the banner with the key, and nothing a person has to wade
through: no alembic plugin lines, no pgserver initdb dump, no line per httpx request, no NumPy or
platformdirs warnings, no traceback on Ctrl-C. `tollgate dev -v` brings the libraries' lines back."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest

from tests.fixtures.processes import free_port
from tests.test_dev_smoke import start_dev, stop, wait_for_demo
from tollgate.logging_setup import CHATTY_LOGGERS, PROGRESS_LOGGERS, configure_logging

NOISE = ("alembic", "pgserver", "initdb", "HTTP Request:", "NumPy", "UserWarning", "RuntimeDirWarning",
         "XDG_RUNTIME_DIR", "Traceback", "pip install", "[notice]", "setuptools", "DeprecationWarning")


@pytest.mark.slow
def test_the_console_shows_the_banner_and_no_noise_from_start_to_ctrl_c(tmp_path):
    data_dir, log_path = tmp_path / ".tollgate", tmp_path / "dev.log"
    process = start_dev(data_dir, free_port(), free_port(), log_path)  # a first start: initdb runs
    try:
        demo = wait_for_demo(process, data_dir / "demo.json", log_path, time.time() - 1)
        response = httpx.post(
            f"{demo['base_url']}/chat/completions", headers={"Authorization": f"Bearer {demo['api_key']}"},
            json={"model": "tollgate-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert response.status_code == 200, response.text
    finally:
        code = stop(process)
    console = log_path.read_text()
    assert code == 0, console[-4000:]
    assert "Tollgate is running" in console and demo["api_key"] in console
    noisy = [line for line in console.splitlines() if any(word in line for word in NOISE)]
    assert noisy == [], console[-6000:]
    assert json.loads((data_dir / "demo.json").read_text())["api_key"] == demo["api_key"]


def test_quiet_mode_silences_the_chatty_libraries_and_verbose_brings_them_back():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(log_format="plain", quiet=True)
        assert all(logging.getLogger(name).level == logging.WARNING for name in CHATTY_LOGGERS)
        assert not logging.getLogger("alembic").isEnabledFor(logging.INFO)
        assert logging.getLogger("tollgate.dev").isEnabledFor(logging.INFO), "its own progress stays"
        assert not logging.getLogger("gateway.completions").isEnabledFor(logging.INFO), "no line per request"
        configure_logging(log_format="plain", quiet=False)
        assert logging.getLogger("alembic").isEnabledFor(logging.INFO)
        assert logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("gateway.completions").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name in CHATTY_LOGGERS + PROGRESS_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
