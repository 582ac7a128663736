"""`tollgate alerts ...` and `tollgate top-up ...`: the admin API request each command makes (method, path,
body), what it prints, and a refused request's exit status."""

from __future__ import annotations

import contextlib
import json

import httpx
from typer.testing import CliRunner

from tollgate import cli, rules_cli

runner = CliRunner()


def served(monkeypatch, status: int = 200) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json={"path": request.url.path})

    @contextlib.contextmanager
    def admin(url, admin_token):
        with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://admin.test") as client:
            yield client

    monkeypatch.setattr(rules_cli, "_admin", admin)
    return seen


def test_each_command_calls_its_admin_route_with_its_body(monkeypatch):
    seen = served(monkeypatch)
    commands = [
        ["alerts", "set", "acme", "low", "--kind", "balance_below", "--threshold", "100"],
        ["alerts", "set", "acme", "soon", "--kind", "grant_expiring", "--window-ms", "86400000"],
        ["alerts", "list", "acme"],
        ["alerts", "remove", "acme", "low"],
        [
            "top-up",
            "set",
            "acme",
            "auto",
            "--threshold",
            "50",
            "--target",
            "500",
            "--price",
            "450",
            "--currency",
            "USD",
            "--monthly-count-max",
            "3",
        ],  # fmt: skip
        ["top-up", "list", "acme"],
        ["top-up", "remove", "acme", "auto"],
    ]
    for arguments in commands:
        result = runner.invoke(cli.app, arguments)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["path"] == seen[-1].url.path
    assert [(request.method, request.url.path) for request in seen] == [
        ("PUT", "/admin/v1/tenants/acme/alert-rules/low"),
        ("PUT", "/admin/v1/tenants/acme/alert-rules/soon"),
        ("GET", "/admin/v1/tenants/acme/alert-rules"),
        ("DELETE", "/admin/v1/tenants/acme/alert-rules/low"),
        ("PUT", "/admin/v1/tenants/acme/top-up-rules/auto"),
        ("GET", "/admin/v1/tenants/acme/top-up-rules"),
        ("DELETE", "/admin/v1/tenants/acme/top-up-rules/auto"),
    ]
    assert json.loads(seen[0].content) == {"kind": "balance_below", "threshold": 100}
    assert json.loads(seen[1].content) == {"kind": "grant_expiring", "window_ms": 86_400_000}
    assert json.loads(seen[4].content) == {
        "threshold": 50, "target": 500, "category": "paid", "price": 450, "currency": "USD",
        "monthly_count_max": 3,
    }  # fmt: skip


def test_a_refused_request_exits_1(monkeypatch):
    served(monkeypatch, status=422)
    result = runner.invoke(cli.app, ["alerts", "set", "acme", "low", "--kind", "balance_below"])
    assert result.exit_code == 1
