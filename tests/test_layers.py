"""The package's layers: what may import what (read from the sources, every import statement, nested ones
included)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder, forbidden", [
    ("flock/common", "scheduler"),       # shared types and options: below every component
    ("trainer", "scheduler"),            # a trainer is a client's code: it never reaches into the server
])
def test_no_module_of_a_lower_layer_imports_a_higher_one(folder, forbidden):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, folder
    offenders = {f"{path.relative_to(ROOT)} imports {name}" for path in files for name in imported_modules(path)
                 if name == forbidden or name.startswith(forbidden + ".")}
    assert not offenders, sorted(offenders)


def test_the_layer_check_sees_nested_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from scheduler.state import Scheduler\n    import scheduler.rounds\n")
    assert imported_modules(source) == {"scheduler.state", "scheduler.rounds"}


def test_config_names_every_server_optimizer():
    from flock.common.config import FIELDS, SERVER_OPTIMIZER_NAMES
    from scheduler.optim import SERVER_OPTIMIZERS

    assert set(SERVER_OPTIMIZER_NAMES) == set(SERVER_OPTIMIZERS) == set(FIELDS["server_opt"].metadata["choices"])


def test_config_names_every_builtin_selection():
    from flock.common.config import SELECTIONS
    from scheduler.selection import NAMES

    assert SELECTIONS == NAMES
