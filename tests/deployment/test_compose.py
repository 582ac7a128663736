"""docker-compose.yml: the distributed deployment's shape, and `docker compose config` where a compose
client is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
TOLLGATE_SERVICES = {"migrate", "streams", "projector", "worker", "gateway"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_every_component_is_a_service_with_a_health_check(compose):
    services = compose["services"]
    assert {"kafka", "postgres"} | TOLLGATE_SERVICES <= set(services)
    for name, service in services.items():
        if name != "migrate":
            assert "healthcheck" in service, f"{name} has no health check"


def test_gateways_processors_and_workers_are_replicated(compose):
    for name in ("gateway", "streams", "worker"):
        assert compose["services"][name]["deploy"]["replicas"] >= 2, name


def test_migrations_run_once_before_the_tollgate_processes(compose):
    services = compose["services"]
    assert services["migrate"]["restart"] == "no"
    for name in TOLLGATE_SERVICES - {"migrate"}:
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name


def test_settings_come_from_the_environment(compose):
    for name in TOLLGATE_SERVICES:
        environment = compose["services"][name]["environment"]
        assert environment["TOLLGATE_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert environment["DATABASE_URL"].startswith("postgresql://")


def test_workers_accept_only_the_gateways_and_are_not_published(compose):
    services = compose["services"]
    for name in ("gateway", "worker"):
        token = services[name]["environment"]["TOLLGATE_INTERNAL_TOKEN"]
        assert token.startswith("${TOLLGATE_INTERNAL_TOKEN:?"), f"{name}: the shared secret is required"
    assert "ports" not in services["worker"], "a worker is reachable on the compose network only"
    for name in TOLLGATE_SERVICES - {"gateway", "worker"}:
        assert "TOLLGATE_INTERNAL_TOKEN" not in services[name]["environment"], (
            f"{name} does not need the secret"
        )


def test_compose_config_validates():
    client = (["docker", "compose"] if _docker_compose_plugin() else None) or (
        ["docker-compose"] if shutil.which("docker-compose") else None
    )
    if client is None:
        pytest.skip("no docker compose client installed (apt-get install docker-compose to run this check)")
    result = subprocess.run(
        [*client, "-f", str(COMPOSE_FILE), "config", "-q"],
        env={**os.environ, "TOLLGATE_ADMIN_TOKEN": "x" * 32, "TOLLGATE_INTERNAL_TOKEN": "y" * 32},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _docker_compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


COMPOSE_TOKENS = {"TOLLGATE_ADMIN_TOKEN": "x" * 32, "TOLLGATE_INTERNAL_TOKEN": "y" * 32}
_REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")


def gateway_environment(compose: dict, tokens: dict[str, str]) -> dict[str, str]:
    """The gateway service's environment as compose sets it, `${VAR:?...}` filled from `tokens` (a
    variable missing from `tokens` is left out, as compose would refuse it)."""
    environment = {}
    for name, value in compose["services"]["gateway"]["environment"].items():
        required = _REQUIRED.fullmatch(str(value))
        if required is None:
            environment[name] = str(value)
        elif required.group(1) in tokens:
            environment[name] = tokens[required.group(1)]
    return environment


def run_with(environment: dict[str, str], *arguments: str) -> subprocess.CompletedProcess:
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("TOLLGATE_")}
    return subprocess.run(
        [sys.executable, *arguments],
        env={**inherited, **environment},
        cwd=COMPOSE_FILE.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_gateway_passes_the_production_check_with_the_compose_environment(compose):
    environment = gateway_environment(compose, COMPOSE_TOKENS)
    assert environment["TOLLGATE_ENVIRONMENT"] == "production"
    checked = run_with(
        environment,
        "-c",
        "from gateway.settings import GatewaySettings; print(GatewaySettings().environment)",
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == "production"


@pytest.mark.parametrize("token", [None, "x" * 31], ids=["missing", "short"])
def test_the_gateway_process_refuses_to_start_in_compose_without_a_usable_token(compose, token):
    tokens = {**COMPOSE_TOKENS}
    del tokens["TOLLGATE_ADMIN_TOKEN"]
    if token is not None:
        tokens["TOLLGATE_ADMIN_TOKEN"] = token
    started = run_with(gateway_environment(compose, tokens), "-m", "gateway")
    assert started.returncode != 0
    assert "TOLLGATE_ADMIN_TOKEN" in started.stderr
