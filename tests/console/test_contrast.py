"""The console's colours meet WCAG 2.1 AA contrast (4.5:1 for text) in every pairing its stylesheet uses:
text, muted text, links, signed amounts and errors on the page and panel backgrounds, and white text on
the header, buttons and the danger button. Read from the stylesheet itself, so a palette change that
breaks it fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gateway.console

CSS = Path(gateway.console.__file__).parent / "static" / "console.css"
AA_TEXT_MIN = 4.5
WHITE = "#fff"

PAIRS = [  # (text colour, background), as the stylesheet's rules combine them
    ("--fg", "--bg"),
    ("--fg", "--panel"),
    ("--muted", "--bg"),
    ("--muted", "--panel"),
    ("--link", "--bg"),
    ("--link", "--panel"),
    ("--neg", "--bg"),
    ("--neg", "--panel"),
    ("--pos", "--bg"),
    ("--pos", "--panel"),
    (WHITE, "--fg"),  # header, skip link
    (WHITE, "--link"),  # buttons
    (WHITE, "--neg"),  # danger buttons
    ("#e6e9ee", "--fg"),  # who is signed in, in the header
    ("--fg", "#e6f4ea"),  # the "done" notice
]


def palette() -> dict[str, str]:
    root = re.search(r":root\s*\{([^}]*)\}", CSS.read_text()).group(1)
    return dict(re.findall(r"(--[a-z-]+):\s*(#[0-9a-fA-F]{3,6})", root))


def luminance(colour: str) -> float:
    digits = colour.lstrip("#")
    if len(digits) == 3:
        digits = "".join(d * 2 for d in digits)
    channels = [int(digits[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_the_contrast_formula_matches_wcag():
    assert contrast("#000", "#fff") == pytest.approx(21)
    assert contrast("#777", "#fff") == pytest.approx(4.48, abs=0.01)  # the classic just-below-AA grey


@pytest.mark.parametrize(("text", "background"), PAIRS)
def test_text_colours_meet_aa_on_their_backgrounds(text, background):
    colours = palette()
    pair = colours.get(text, text), colours.get(background, background)
    assert contrast(*pair) >= AA_TEXT_MIN, f"{text} on {background}: {contrast(*pair):.2f}:1"
