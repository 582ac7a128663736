"""Safety checks: a tenant's policy applied to text before generation (the input) and after (the output,
as it streams), and by /v1/moderations.

A policy (`SafetyPolicy`, stored per tenant in `tenant_policies`, set by the admin API) names what to
find and what to do:

    blocked_terms     words or phrases, matched case-insensitively on word boundaries
    blocked_patterns  regular expressions (Python `re` syntax), each compiled when the policy is set
    pii               any of "email", "phone", "card" (13-19 digits passing the Luhn check) and "iban"
                      (the ISO 13616 mod-97 check): a digit run or code that fails its check is no finding
    input_action      "block": the request is refused (400 `content_policy_violation`) before anything is
                      admitted or generated, so nothing is billed; "redact": each finding is replaced by
                      `[REDACTED:<reason>]` in what the model is sent (and in what is stored); "none":
                      the input is not checked
    output_action     "redact": findings in the generated text are replaced as it streams; "stop": the
                      generation ends at the first finding (the tenant pays for the tokens produced);
                      "none": the output is not checked

Output is checked as it streams by `OutputGuard`: it holds back the last `holdback_chars` characters of
what the model produced (a finding may still grow there) and releases the rest, redacted. A finding no
longer than the hold-back is whole in the buffer by the time any of it could be released, so it is always
caught; a longer one (a blocked pattern matching over 64 characters by default) may be released in part
before it completes. With "stop", the stream stops at the first finding, even one still growing.

Findings say what matched by reason and where (offsets), never the text; logs and metrics carry the
reasons only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PII_KINDS = ("email", "phone", "card", "iban")
BLOCKED_TERM = "blocked_term"
BLOCKED_PATTERN = "blocked_pattern"
REASONS = (BLOCKED_TERM, BLOCKED_PATTERN, *PII_KINDS)
TERMS_MAX = 256  # blocked terms in one policy
PATTERNS_MAX = 64  # blocked patterns in one policy
TERM_CHARS_MAX = 200  # characters of one blocked term or pattern

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().-]{6,18}\d(?!\w)")
PHONE_DIGITS_MIN = 8
PHONE_DIGITS_MAX = 15


class SafetyPolicy(BaseModel):
    """A tenant's safety policy (JSON in `tenant_policies.safety_policy_json`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    blocked_terms: list[str] = Field(default_factory=list, max_length=TERMS_MAX)
    blocked_patterns: list[str] = Field(default_factory=list, max_length=PATTERNS_MAX)
    pii: list[Literal["email", "phone", "card", "iban"]] = Field(default_factory=list)
    input_action: Literal["block", "redact", "none"] = "block"
    output_action: Literal["redact", "stop", "none"] = "redact"

    @field_validator("blocked_terms", "blocked_patterns")
    @classmethod
    def _bounded(cls, values: list[str]) -> list[str]:
        for value in values:
            if not 1 <= len(value) <= TERM_CHARS_MAX:
                raise ValueError(f"each term or pattern is 1 to {TERM_CHARS_MAX} characters")
            if "\x00" in value:
                raise ValueError("a term or pattern must not contain NUL")
        return values

    @field_validator("blocked_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"blocked pattern {pattern!r} does not compile: {error}") from None
        return patterns

    @property
    def checks_anything(self) -> bool:
        return bool(self.blocked_terms or self.blocked_patterns or self.pii)


NO_POLICY = SafetyPolicy()


@dataclass(frozen=True, slots=True)
class Finding:
    reason: str  # one of REASONS
    start: int
    end: int


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_valid(code: str) -> bool:
    """ISO 13616: the first four characters moved to the end, letters as 10..35, the number mod 97 is 1."""
    compact = code.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _digits(text: str) -> str:
    return "".join(char for char in text if char.isdigit())


class Scanner:
    """A policy compiled once: `scan(text)` lists its findings, earliest first, never overlapping."""

    def __init__(self, policy: SafetyPolicy) -> None:
        self.policy = policy
        self._terms = [
            re.compile(rf"(?<!\w){re.escape(term)}(?!\w)", re.IGNORECASE) for term in policy.blocked_terms
        ]
        self._patterns = [re.compile(pattern) for pattern in policy.blocked_patterns]
        self._pii = frozenset(policy.pii)

    def scan(self, text: str) -> list[Finding]:
        found: list[Finding] = []
        found.extend(self._matches(BLOCKED_TERM, self._terms, text))
        found.extend(self._matches(BLOCKED_PATTERN, self._patterns, text))
        # Cards and IBANs first: a card number also looks like a phone number.
        if "card" in self._pii:
            found.extend(
                Finding("card", m.start(), m.end())
                for m in CARD.finditer(text)
                if luhn_valid(_digits(m.group()))
            )
        if "iban" in self._pii:
            found.extend(
                Finding("iban", m.start(), m.end()) for m in IBAN.finditer(text) if iban_valid(m.group())
            )
        if "email" in self._pii:
            found.extend(Finding("email", m.start(), m.end()) for m in EMAIL.finditer(text))
        if "phone" in self._pii:
            found.extend(
                Finding("phone", m.start(), m.end())
                for m in PHONE.finditer(text)
                if PHONE_DIGITS_MIN <= len(_digits(m.group())) <= PHONE_DIGITS_MAX
            )
        return _without_overlaps(found)

    @staticmethod
    def _matches(reason: str, expressions: Iterable[re.Pattern[str]], text: str) -> Iterable[Finding]:
        for expression in expressions:
            for match in expression.finditer(text):
                if match.end() > match.start():
                    yield Finding(reason, match.start(), match.end())


def _without_overlaps(found: list[Finding]) -> list[Finding]:
    """Earliest first; of two that overlap, the one found first (in the order scan() looks) is kept."""
    kept: list[Finding] = []
    for finding in found:
        if all(finding.end <= other.start or finding.start >= other.end for other in kept):
            kept.append(finding)
    return sorted(kept, key=lambda finding: finding.start)


def redact(text: str, findings: list[Finding]) -> str:
    """`text` with each finding (sorted, not overlapping) replaced by [REDACTED:<reason>]."""
    parts = []
    position = 0
    for finding in findings:
        assert finding.start >= position, "findings are sorted and do not overlap"
        parts.append(text[position : finding.start])
        parts.append(f"[REDACTED:{finding.reason}]")
        position = finding.end
    parts.append(text[position:])
    return "".join(parts)


class OutputGuard:
    """The output check of one stream: `feed(delta)` returns the text that may be sent now (redacted) and
    whether the policy stops the stream here; `flush()` releases what was held back at the end."""

    def __init__(self, scanner: Scanner, holdback_chars: int) -> None:
        assert holdback_chars >= 0, "a hold-back is a number of characters"
        self.scanner = scanner
        self.holdback_chars = holdback_chars
        self.pending = ""
        self.released_tail = ""  # the last `holdback_chars` released, unredacted: context for the next scan
        self.findings: list[Finding] = []  # every finding released or stopped at, for metrics
        self.stopped: Finding | None = None

    def feed(self, delta: str) -> str:
        assert self.stopped is None, "a stopped stream is fed nothing more"
        buffer = self.pending + delta
        findings = self._scan(buffer)
        if findings and self.scanner.policy.output_action == "stop":
            self.stopped = findings[0]
            self.findings.append(findings[0])
            self.pending = ""
            return self._release(buffer[: findings[0].start], [])
        cut = max(0, len(buffer) - self.holdback_chars)
        for finding in findings:
            if finding.end > cut:  # may still grow: hold it back whole
                cut = min(cut, finding.start)
        released = [finding for finding in findings if finding.end <= cut]
        self.findings.extend(released)
        self.pending = buffer[cut:]
        return self._release(buffer[:cut], released)

    def _scan(self, buffer: str) -> list[Finding]:
        """The findings in `buffer`, scanned after the tail already released (so a digit run cut at the
        last release is seen whole); one reaching back into released text is kept for its part here."""
        context = self.released_tail
        shifted = []
        for finding in self.scanner.scan(context + buffer):
            start, end = finding.start - len(context), finding.end - len(context)
            if end > 0:
                shifted.append(Finding(finding.reason, max(start, 0), end))
        return shifted

    def _release(self, text: str, findings: list[Finding]) -> str:
        tail = self.released_tail + text
        self.released_tail = tail[len(tail) - self.holdback_chars :] if self.holdback_chars else ""
        return redact(text, findings)

    def flush(self) -> str:
        if self.stopped is not None:
            return ""
        findings = self._scan(self.pending)
        self.findings.extend(findings)
        text = self._release(self.pending, findings)
        self.pending = ""
        return text
