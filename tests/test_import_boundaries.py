"""Import boundaries between the packages, checked in fresh interpreters (what `sys.modules` holds after
the import) and, for the modules that must stay small, on the source too (an import inside a function
runs only when called, so the source is what says it can never happen).

    gateway     the HTTP side: reads the topics' wire records (streams.records), never the processor
    migrations  imports only storage (every table is there), never gateway or streams
    storage     the tables and the database access: nothing from gateway or streams
    ledger      the pure domain: the standard library and msgspec only
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Imports every module named on the command line in order and prints, as JSON, the modules each one
# added to sys.modules (so a violation names the module that brought it in).
_PROBE = """
import importlib, json, sys
added = {}
for name in sys.argv[1:]:
    before = set(sys.modules)
    importlib.import_module(name)
    added[name] = sorted(set(sys.modules) - before)
print(json.dumps(added))
"""


def modules_added_by(names: list[str]) -> dict[str, list[str]]:
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE, *names], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def package_modules(package: str) -> list[str]:
    """Every module of a package by its files (`__main__` left out: it runs on import)."""
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def imported_top_levels(path: Path) -> set[str]:
    """The top-level packages a source file imports anywhere in it (relative imports left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def offenders(added: dict[str, list[str]], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for name, modules in added.items():
        bad = [
            module
            for module in modules
            if module in forbidden or module.startswith(tuple(f + "." for f in forbidden))
        ]
        if bad:
            found[name] = bad
    return found


def test_package_modules_lists_the_modules_of_a_package():
    gateway_modules = package_modules("gateway")
    assert "gateway.app" in gateway_modules
    assert "gateway.admin.router" in gateway_modules
    assert "gateway" in gateway_modules
    assert "gateway.__main__" not in gateway_modules


def test_offenders_names_the_module_that_brought_a_forbidden_one_in():
    added = {"a": ["json", "streams.processor"], "b": ["streams.records", "gateway"], "c": ["gatewayish"]}
    assert offenders(added, ("streams.processor", "gateway")) == {
        "a": ["streams.processor"],
        "b": ["gateway"],
    }


def test_gateway_does_not_import_the_processor():
    names = ["gateway.app", *package_modules("gateway")]
    added = modules_added_by(names)
    assert set(added) == set(names)
    assert offenders(added, ("streams.processor",)) == {}


def test_migrations_import_only_storage():
    added = modules_added_by(["migrations.models"])
    assert "storage" in added["migrations.models"]
    assert offenders(added, ("gateway", "streams")) == {}
    for path in sorted((ROOT / "migrations").rglob("*.py")):
        project_imports = imported_top_levels(path) & {
            "gateway",
            "streams",
            "inference",
            "ledger",
            "tollgate",
            "bench",
        }
        assert project_imports == set(), f"{path.relative_to(ROOT)} imports {sorted(project_imports)}"


def test_storage_imports_nothing_from_gateway_or_streams():
    added = modules_added_by(package_modules("storage"))
    assert offenders(added, ("gateway", "streams")) == {}


def test_ledger_imports_only_the_standard_library_and_msgspec():
    allowed = set(sys.stdlib_module_names) | {"ledger", "msgspec"}
    for path in sorted((ROOT / "ledger").glob("*.py")):
        outside = imported_top_levels(path) - allowed
        assert outside == set(), f"{path.relative_to(ROOT)} imports {sorted(outside)}"
    added = modules_added_by(
        ["msgspec", *package_modules("ledger")]
    )  # msgspec first: what it loads is its own
    loaded_outside = {
        name: [module for module in modules if module.split(".")[0] not in allowed]
        for name, modules in added.items()
        if name != "msgspec"
    }
    assert {name: modules for name, modules in loaded_outside.items() if modules} == {}
