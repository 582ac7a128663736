"""Choosing the mode, and the metrics in the default registry and in the gateway's own."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest

from gateway.admission.factory import build_admission
from gateway.admission.fast import FastAdmission
from gateway.admission.metrics import default_metrics
from gateway.admission.settings import AdmissionSettings
from gateway.metrics import GatewayMetrics
from tests.gateway.admission.helpers import new_view


def test_fast_is_the_default_and_strict_needs_a_database():
    assert isinstance(build_admission(AdmissionSettings(), new_view()), FastAdmission)
    with pytest.raises(ValueError, match="database engine"):
        build_admission(AdmissionSettings(mode="strict"), new_view())


def test_settings_refuse_a_default_tier_that_does_not_exist():
    with pytest.raises(ValueError, match="tier_default"):
        AdmissionSettings(tier_default="platinum")


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TOLLGATE_ADMISSION_MODE", "strict")
    monkeypatch.setenv("TOLLGATE_TIERS", '{"free": {"requests_per_minute": 5, "tokens_per_minute": 50}}')
    settings = AdmissionSettings()
    assert settings.mode == "strict"
    assert settings.limits_of("anything").requests_per_minute == 5


def test_metrics_are_in_the_default_registry_and_can_join_the_gateways():
    metrics = default_metrics()
    assert default_metrics() is metrics
    metrics.rejections.labels(reason="credit_balance_exhausted").inc()
    assert (
        REGISTRY.get_sample_value(
            "tollgate_admission_rejections_total", {"reason": "credit_balance_exhausted"}
        )
        >= 1
    )
    gateway = GatewayMetrics(collectors=metrics.collectors())
    exposition = generate_latest(gateway.registry).decode()
    for name in (
        "tollgate_admission_reservations_open",
        "tollgate_ledger_view_lag_records",
        "tollgate_ledger_view_staleness_seconds",
    ):
        assert name in exposition
