"""One definition per shared fact (issue 13): the drift found as a new user, each a regression test.

- tiers: the admin API, admission's rate limits and the workers' queue know the same tiers (`standard`
  was refused by the admin API while admission and the README knew it);
- the admin token: one variable (TOLLGATE_ADMIN_TOKEN), one minimum length, the one compose states;
- environment: one variable (TOLLGATE_ENVIRONMENT), so the production check runs where compose sets it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gateway.admin.settings import AdminSettings, AdminTokenMissing, resolve_admin_token
from gateway.admission.settings import AdmissionSettings
from gateway.settings import GatewaySettings
from inference.settings import EngineSettings, WorkerSettings
from tollgate.common_settings import ADMIN_TOKEN_LENGTH_MIN, SHARED_FIELDS, CommonSettings

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = (GatewaySettings, AdminSettings, AdmissionSettings, WorkerSettings)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("ENVIRONMENT", "ADMIN_TOKEN", "TIERS", "TIER_DEFAULT", "MODEL_REGISTRY_PATH"):
        monkeypatch.delenv(f"TOLLGATE_{name}", raising=False)


def test_every_component_knows_the_same_tiers_and_standard_is_one():
    admin, admission, worker = AdminSettings(), AdmissionSettings(), WorkerSettings()
    assert "standard" in admin.tenant_tiers
    assert set(admin.tenant_tiers) == set(admission.tiers) == set(worker.engine.tier_levels)
    assert worker.engine.tier_levels == EngineSettings().tier_levels  # an engine alone: the default tiers


def test_tiers_set_once_reach_admin_admission_and_the_workers_queue(monkeypatch):
    monkeypatch.setenv(
        "TOLLGATE_TIERS",
        '{"gold": {"requests_per_minute": 7, "tokens_per_minute": 70, "priority_level": 0},'
        ' "tin": {"requests_per_minute": 1, "tokens_per_minute": 10, "priority_level": 5}}',
    )
    monkeypatch.setenv("TOLLGATE_TIER_DEFAULT", "tin")
    assert AdminSettings().tenant_tiers == ("gold", "tin")
    assert AdmissionSettings().limits_of("gold").requests_per_minute == 7
    assert AdmissionSettings().limits_of("unknown").requests_per_minute == 1
    assert WorkerSettings().engine.tier_levels == {"gold": 0, "tin": 5}


@pytest.mark.parametrize(
    "variable",
    [
        "TOLLGATE_ADMISSION_TIERS",
        "TOLLGATE_ADMIN_TENANT_TIERS",
        "TOLLGATE_WORKER_ENGINE__TIER_LEVELS",
        "TOLLGATE_GATEWAY_TIERS",
    ],
)
def test_the_old_per_component_tier_variables_are_gone(monkeypatch, variable):
    monkeypatch.setenv(variable, '{"platinum": {"requests_per_minute": 1, "tokens_per_minute": 1}}')
    for component in COMPONENTS:
        assert "platinum" not in component().tiers, (component.__name__, variable)
    assert "platinum" not in WorkerSettings().engine.tier_levels


@pytest.mark.parametrize("component", COMPONENTS)
def test_shared_facts_have_one_variable_not_the_components_prefixed_one(monkeypatch, component):
    prefix = component.model_config["env_prefix"]
    assert prefix != "TOLLGATE_", "a component's own settings carry its name"
    monkeypatch.setenv(f"{prefix}ENVIRONMENT", "production")
    monkeypatch.setenv(f"{prefix}ADMIN_TOKEN", "p" * ADMIN_TOKEN_LENGTH_MIN)
    settings = component()
    assert settings.environment == "development" and settings.admin_token is None
    monkeypatch.setenv("TOLLGATE_ADMIN_TOKEN", "s" * ADMIN_TOKEN_LENGTH_MIN)
    monkeypatch.setenv("TOLLGATE_ENVIRONMENT", "production")
    settings = component()
    assert settings.environment == "production"
    assert settings.admin_token.get_secret_value() == "s" * ADMIN_TOKEN_LENGTH_MIN


def test_shared_fields_are_defined_only_in_common_settings():
    for component in COMPONENTS:
        own = set(component.__annotations__)
        assert not own & SHARED_FIELDS, f"{component.__name__} redefines {own & SHARED_FIELDS}"


def test_the_gateway_refuses_production_without_a_usable_token(monkeypatch):
    monkeypatch.setenv("TOLLGATE_ENVIRONMENT", "production")
    with pytest.raises(ValueError, match="TOLLGATE_ADMIN_TOKEN must be set in production"):
        GatewaySettings()
    monkeypatch.setenv("TOLLGATE_ADMIN_TOKEN", "x" * (ADMIN_TOKEN_LENGTH_MIN - 1))
    with pytest.raises(ValueError, match=f"at least {ADMIN_TOKEN_LENGTH_MIN} characters"):
        GatewaySettings()
    monkeypatch.setenv("TOLLGATE_ADMIN_TOKEN", "x" * ADMIN_TOKEN_LENGTH_MIN)
    assert GatewaySettings().environment == "production"


def test_the_admin_api_and_the_gateway_apply_the_same_minimum():
    short = "x" * (ADMIN_TOKEN_LENGTH_MIN - 1)
    with pytest.raises(AdminTokenMissing):
        resolve_admin_token(AdminSettings(admin_token=short))
    with pytest.raises(ValueError):
        GatewaySettings(admin_token=short)
    exact = "x" * ADMIN_TOKEN_LENGTH_MIN
    assert resolve_admin_token(AdminSettings(admin_token=exact)) == exact
    assert GatewaySettings(admin_token=exact).admin_token.get_secret_value() == exact


def test_compose_states_the_minimum_length_the_code_enforces():
    compose = (ROOT / "docker-compose.yml").read_text()
    stated = {int(number) for number in re.findall(r"at least (\d+) characters", compose)}
    assert stated == {ADMIN_TOKEN_LENGTH_MIN}, stated


def test_compose_sets_the_shared_environment_and_admin_token_for_the_gateway():
    gateway = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["gateway"]["environment"]
    assert gateway["TOLLGATE_ENVIRONMENT"] == "production"
    assert gateway["TOLLGATE_ADMIN_TOKEN"].startswith("${TOLLGATE_ADMIN_TOKEN:?")
    assert not [
        name for name in gateway if name.endswith(("_ENVIRONMENT", "_ADMIN_TOKEN")) and name.count("_") > 2
    ]


def test_a_default_tier_outside_the_tiers_is_refused():
    with pytest.raises(ValueError, match="tier_default"):
        CommonSettings(tier_default="platinum")


def test_the_cli_offers_the_shared_tiers():
    from typer.testing import CliRunner

    from tollgate.cli import app

    help_text = " ".join(
        CliRunner().invoke(app, ["tenants", "create", "--help"], terminal_width=400).output.split()
    )
    for tier in AdminSettings().tenant_tiers:
        assert tier in help_text, tier
