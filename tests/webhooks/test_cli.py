"""`tollgate webhooks ...`: the admin API requests each command makes, and what it prints."""

from __future__ import annotations

import contextlib
import json

import httpx
from typer.testing import CliRunner

from tollgate import cli, webhooks_cli

runner = CliRunner()


def served(monkeypatch) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status = 201 if request.method == "POST" and request.url.path.endswith("/webhooks") else 200
        return httpx.Response(status, json={"path": request.url.path})

    @contextlib.contextmanager
    def admin(url, admin_token):
        with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://admin.test") as client:
            yield client

    monkeypatch.setattr(webhooks_cli, "_admin", admin)
    return seen


def test_each_command_calls_its_admin_route(monkeypatch):
    seen = served(monkeypatch)
    commands = [
        [
            "webhooks",
            "create",
            "acme",
            "https://hooks.example/a",
            "--kind",
            "depleted",
            "--kind",
            "recovered",
        ],
        ["webhooks", "list", "acme"],
        ["webhooks", "delete", "we_1"],
        ["webhooks", "rotate-secret", "we_1"],
        ["webhooks", "deliveries", "we_1", "--since", "7", "--limit", "20"],
    ]
    for arguments in commands:
        result = runner.invoke(cli.app, arguments)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["path"] == seen[-1].url.path
    assert [(request.method, request.url.path) for request in seen] == [
        ("POST", "/admin/v1/tenants/acme/webhooks"),
        ("GET", "/admin/v1/tenants/acme/webhooks"),
        ("DELETE", "/admin/v1/webhooks/we_1"),
        ("POST", "/admin/v1/webhooks/we_1/rotate-secret"),
        ("GET", "/admin/v1/webhooks/we_1/deliveries"),
    ]
    assert json.loads(seen[0].content) == {
        "url": "https://hooks.example/a",
        "description": "",
        "alert_kinds": ["depleted", "recovered"],
    }
    assert dict(seen[-1].url.params) == {"since": "7", "limit": "20"}


def test_rotate_secret_sends_the_overlap_in_milliseconds_and_refuses_a_bad_one(monkeypatch):
    seen = served(monkeypatch)
    for overlap, expected in (
        ("24h", 86_400_000),
        ("30m", 1_800_000),
        ("90s", 90_000),
        ("0", 0),
        ("7d", 604_800_000),
        ("1500ms", 1_500),
    ):
        result = runner.invoke(cli.app, ["webhooks", "rotate-secret", "we_1", "--overlap", overlap])
        assert result.exit_code == 0, result.output
        assert json.loads(seen[-1].content) == {"overlap_ms": expected}
    assert runner.invoke(cli.app, ["webhooks", "rotate-secret", "we_1"]).exit_code == 0
    assert seen[-1].content == b""  # no --overlap: the admin API's default
    sent = len(seen)
    for bad in ("a day", "-5m", "2w", "1.5h"):
        result = runner.invoke(cli.app, ["webhooks", "rotate-secret", "we_1", "--overlap", bad])
        assert result.exit_code == 2 and "--overlap" in result.output, (bad, result.output)
    assert len(seen) == sent


def test_an_error_answer_exits_1(monkeypatch):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "endpoint_id: no webhook endpoint"}})

    @contextlib.contextmanager
    def admin(url, admin_token):
        with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://admin.test") as client:
            yield client

    monkeypatch.setattr(webhooks_cli, "_admin", admin)
    result = runner.invoke(cli.app, ["webhooks", "delete", "we_missing"])
    assert result.exit_code == 1 and "no webhook endpoint" in result.output
