"""The admin token: configured, generated in development, refused when missing or short elsewhere."""

import pytest

from gateway.admin.models import parse_time_ms
from gateway.admin.settings import AdminSettings, AdminTokenMissing, resolve_admin_token


def test_configured_token_is_used(monkeypatch):
    monkeypatch.setenv("TOLLGATE_ADMIN_TOKEN", "a" * 32)
    assert resolve_admin_token(AdminSettings()) == "a" * 32


def test_development_generates_and_prints_a_random_token(monkeypatch, capsys):
    monkeypatch.delenv("TOLLGATE_ADMIN_TOKEN", raising=False)
    first = resolve_admin_token(AdminSettings(environment="development"))
    second = resolve_admin_token(AdminSettings(environment="development"))

    assert first != second and len(first) >= 32
    assert first in capsys.readouterr().err


@pytest.mark.parametrize("token", [None, "short"])
def test_production_refuses_a_missing_or_short_token(monkeypatch, token):
    monkeypatch.delenv("TOLLGATE_ADMIN_TOKEN", raising=False)
    with pytest.raises(AdminTokenMissing, match="TOLLGATE_ADMIN_TOKEN"):
        resolve_admin_token(AdminSettings(environment="production", admin_token=token))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        ("1700000000123", 1_700_000_000_123),
        ("2023-11-14T22:13:20.123Z", 1_700_000_000_123),
        ("2023-11-15T00:13:20.123+02:00", 1_700_000_000_123),
    ],
)
def test_times_parse_to_epoch_ms(value, expected):
    assert parse_time_ms(value) == expected


@pytest.mark.parametrize(
    "value", [True, 1.5, "2023-11-14T22:13:20", "2023-11-14T22:13:20.0001Z", -1, 10**20, "soon"]
)
def test_bad_times_are_refused(value):
    with pytest.raises(ValueError):
        parse_time_ms(value)
