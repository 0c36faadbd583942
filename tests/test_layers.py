"""The node's tree shows its data path, and the imports keep to it.

``pacs_node`` is intake -> model -> results -> delivery over a ground floor (config, logs,
metrics, audit, status, codes, files, uids). A step imports the ground floor and the steps
before it; the ground floor imports no step (the wiring, ``node.py`` with the pipeline, the
supervisor and the outcome events, and ``cli.py``, may import every step). A change that makes intake import a writer, or the outbox import the
model, fails here with the offending line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pacs_node"
STEPS = ("intake", "model", "results", "delivery")
#: The wiring (above every step: it may import them all; nothing but the wiring imports it).
WIRING = (
    "pacs_node.node",
    "pacs_node.cli",
    "pacs_node.pipeline",
    "pacs_node.supervisor",
    "pacs_node.outcomes",
    "pacs_node.drift",  # an outcome subscriber, as the audit trail and the counters are
)
#: The ground floor, named: a module placed nowhere fails :func:`test_every_module_has_its_place`.
GROUND = (
    "pacs_node.audit",
    "pacs_node.charsets",
    "pacs_node.codes",
    "pacs_node.config",
    "pacs_node.dimse_reactor",
    "pacs_node.files",
    "pacs_node.health",
    "pacs_node.logs",
    "pacs_node.metrics",
    "pacs_node.status",
    "pacs_node.uids",
    "pacs_node.scale",  # the scale-out mode's storage: connections, the queue, the ledger
)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every project import in ``path``, relative ones resolved."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = (
                [f"{base}.{alias.name}" for alias in node.names]
                if base in ("pacs_node", *(f"pacs_node.{s}" for s in STEPS))
                else [base]
            )
            found += [(node.lineno, name) for name in names if name.startswith("pacs_node")]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name)
                for alias in node.names
                if alias.name.startswith("pacs_node")
            ]
    return found


def _step(module: str) -> int | None:
    """0 for the ground floor, 1-4 for the steps in their order, 5 for the wiring; None for a
    module placed nowhere."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STEPS:
        return STEPS.index(parts[1]) + 1
    if module in WIRING:
        return 5
    if module == "pacs_node" or any(module == g or module.startswith(g + ".") for g in GROUND):
        return 0
    return None


def _crossings() -> list[str]:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        if module in WIRING or module == "pacs_node":
            continue
        own = _step(module)
        assert own is not None, f"{module} is placed nowhere"
        for line, target in _imports(path):
            if (_step(target) or 0) > own:
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} (a later step)"
                )
    return wrong


def test_every_step_has_its_folder():
    assert all((PACKAGE / step / "__init__.py").is_file() for step in STEPS)


def test_every_module_has_its_place():
    """A new module is a step's, the ground floor's or the wiring's: said here, and in the
    package's map (``pacs_node/__init__.py``)."""
    placed = [_module(path) for path in sorted(PACKAGE.rglob("*.py"))]
    assert [module for module in placed if _step(module) is None] == []
    readme = (PACKAGE / "__init__.py").read_text()
    named = [m.split(".")[1] for m in (*GROUND, *WIRING)]
    assert [name for name in named if name not in readme] == []


def test_no_module_imports_a_later_step():
    assert _crossings() == []


def test_the_ground_floor_importing_the_wiring_is_found(tmp_path, monkeypatch):
    fake = tmp_path / "pacs_node"
    fake.mkdir()
    (fake / "metrics.py").write_text("from pacs_node.outcomes import Event\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert _crossings() == ["pacs_node/metrics.py:1 imports pacs_node.outcomes (a later step)"]


def test_a_backward_import_is_found(tmp_path, monkeypatch):
    """The check can fail: an intake module importing a writer is reported with its line."""
    fake = tmp_path / "pacs_node"
    for step in STEPS:
        (fake / step).mkdir(parents=True)
        (fake / step / "__init__.py").write_text("")
    (fake / "intake" / "screen.py").write_text(
        "from pacs_node.results.identity import ResultIdentity\n"
    )
    (fake / "results" / "report.py").write_text("from ..intake import screen\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert _crossings() == [
        "pacs_node/intake/screen.py:1 imports pacs_node.results.identity (a later step)"
    ]


@pytest.mark.parametrize("step", STEPS)
def test_the_readme_of_the_package_names_each_step(step):
    assert f"{step}/" in (PACKAGE / "__init__.py").read_text()
