"""The console's templates and static files ship in the wheel and sdist: every file under
gateway/console/templates and static matches a package-data pattern of pyproject.toml."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "gateway" / "console"


def test_every_template_and_static_file_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    console_patterns = patterns["gateway.console"]
    files = [
        path.relative_to(CONSOLE).as_posix()
        for folder in ("templates", "static")
        for path in (CONSOLE / folder).rglob("*")
        if path.is_file()
    ]
    assert "static/vendor/uPlot.iife.min.js" in files and "templates/base.html" in files
    missing = [name for name in files if not any(fnmatch.fnmatchcase(name, p) for p in console_patterns)]
    assert missing == []
