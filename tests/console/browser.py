"""Playwright over Debian's chromium (`executable_path`: Playwright's own browser download is not
reachable from CI). `chromium_or_skip()` names the reason when the browser tests cannot run."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    configured = os.environ.get("TOLLGATE_CHROMIUM")
    if configured:
        return configured
    return next((found for name in CHROMIUM_CANDIDATES if (found := shutil.which(name))), None)


def chromium_or_skip() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip(
            "browser tests skipped: the playwright package is not installed (pip install -e '.[dev]')"
        )
    path = chromium_path()
    if path is None:
        pytest.skip(
            "browser tests skipped: no Chromium on this machine (apt-get install chromium, or set "
            "TOLLGATE_CHROMIUM to a Chromium binary); .ci/run installs it"
        )
    return path
