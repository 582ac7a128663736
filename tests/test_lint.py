"""`ruff check .` passes on the whole tree: the line length pyproject sets (E501) and the complexity bound
(C90, `max-complexity`) among the rules, so `make test` enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")  # the virtualenv's ruff, the version pyproject pins
TIMEOUT_S = 120


def test_ruff_check_passes_on_the_whole_tree():
    assert RUFF.exists(), f"ruff is not installed next to {sys.executable}"
    result = subprocess.run(
        [str(RUFF), "check", ".", "--output-format", "concise", "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_line_length_and_complexity_rules_are_on():
    """A line over line-length and a function over max-complexity are refused under the project's config
    (a config that dropped the rules would pass the check above)."""
    long_line = "x = " + " + ".join(["1"] * 60) + "\n"
    branches = "".join(f"    if n == {n}:\n        return {n}\n" for n in range(14))
    probe = long_line + "\n\ndef branchy(n):\n" + branches + "    return -1\n"
    result = subprocess.run(
        [
            str(RUFF),
            "check",
            "--no-cache",
            "--output-format",
            "concise",
            "--stdin-filename",
            "lint_probe.py",
            "-",
        ],
        cwd=ROOT,
        input=probe,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "E501" in result.stdout, result.stdout
    assert "C901" in result.stdout, result.stdout
