"""The installable packages are named once in pyproject.toml; the image copies each of them, and no
top-level package of the source is left out of either (a moved module must not vanish from the image)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_INSTALLED = {"tests", "bench", "scripts"}  # run from a checkout, never installed


def installed_packages() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert all(pattern.endswith("*") for pattern in patterns), patterns
    return {pattern.removesuffix("*") for pattern in patterns}


def copied_into_the_image() -> set[str]:
    return set(re.findall(r"^COPY (\w+) \1$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE))


def test_every_source_package_is_installed_and_copied_into_the_image():
    source_packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - NOT_INSTALLED
    assert "storage" in source_packages
    assert installed_packages() == source_packages
    assert copied_into_the_image() == source_packages
