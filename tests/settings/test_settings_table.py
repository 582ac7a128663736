"""The README's settings table is generated from the settings classes and cannot go stale."""

from __future__ import annotations

from tollgate import settings_table


def test_the_readme_table_is_what_the_settings_classes_generate():
    readme = settings_table.README.read_text()
    assert settings_table.with_table(readme) == readme, "stale: run python -m tollgate.settings_table"


def test_every_settings_class_and_shared_fact_is_in_the_table():
    table = settings_table.render()
    for variable in (
        "TOLLGATE_ENVIRONMENT",
        "TOLLGATE_ADMIN_TOKEN",
        "TOLLGATE_TIERS",
        "TOLLGATE_MODEL_REGISTRY_PATH",
        "TOLLGATE_GATEWAY_PORT",
        "TOLLGATE_ADMISSION_MODE",
        "TOLLGATE_WORKER_MODEL_NAME",
        "TOLLGATE_WORKER_ENGINE__RUNNING_SEQUENCES_MAX",
        "TOLLGATE_PROCESSOR_BATCH_MAX",
    ):
        assert f"`{variable}`" in table, variable
    for removed in (
        "TOLLGATE_GATEWAY_ADMIN_TOKEN",
        "TOLLGATE_GATEWAY_ENVIRONMENT",
        "TOLLGATE_ADMISSION_TIERS",
        "TOLLGATE_GATEWAY_PRICES",
        "TOLLGATE_WORKER_PRICES",
        "TIER_LEVELS",
    ):
        assert removed not in table, removed


def test_a_changed_setting_makes_the_check_fail(monkeypatch):
    readme = settings_table.README.read_text()
    stale = readme.replace("`TOLLGATE_TIER_DEFAULT`", "`TOLLGATE_TIER_FALLBACK`")
    assert stale != readme
    assert settings_table.with_table(stale) == readme
