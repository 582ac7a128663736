"""Shared test configuration. Fixtures for real dependencies live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.postgres",
]
