"""ARCHITECTURE.md's one-way flow, checked on the source: model → capture → accumulators/trajectory → analyses →
tables → report. A new import against the flow fails here, naming the file."""

from __future__ import annotations

import ast
from pathlib import Path

import loopscope

ROOT = Path(loopscope.__file__).parent
# package → the loopscope packages it must never import (the analyses may read capture's data types only)
FORBIDDEN = {
    "models": {"capture", "accumulate", "dynamics", "stages", "report", "experiments", "interventions", "cli"},
    "capture": {"dynamics", "stages", "report", "experiments", "cli"},
    "accumulate": {"dynamics", "stages", "report", "experiments", "cli"},
    "dynamics": {"models", "capture", "experiments", "report", "cli", "interventions"},
    "stages": {"models", "capture", "experiments", "report", "cli", "interventions"},
    "report": {"models", "capture", "accumulate", "dynamics", "stages", "experiments", "interventions"},
}
ANALYSES_MAY_READ = {"loopscope.capture.trajectory"}  # the Trajectory is data, not a model run


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loopscope."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("loopscope.")}
    return found


def test_every_import_follows_the_one_way_flow():
    bad = []
    for path in ROOT.rglob("*.py"):
        package = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for module in imports(path) - (ANALYSES_MAY_READ if package in ("dynamics", "stages") else set()):
            if module.split(".")[1] in FORBIDDEN.get(package, ()):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "imports against the flow:\n" + "\n".join(sorted(bad))


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The rule itself can fail: a report module that imports an analysis is caught."""
    fake = tmp_path / "x.py"
    fake.write_text("from loopscope.dynamics.spectrum import agreement_table\nimport loopscope.stages\n")
    assert imports(fake) == {"loopscope.dynamics.spectrum", "loopscope.stages"}
    assert {m.split(".")[1] for m in imports(fake)} <= FORBIDDEN["report"]


# Reductions that turn measurements into new numbers: the report draws and writes what it is given, so none of these
# is called in `report/` (grouping to draw one line per series is drawing, and stays allowed).
REDUCTIONS = {"mean", "median", "std", "var", "sum", "quantile", "value_counts", "pivot_table", "crosstab", "agg",
              "aggregate", "nanmean", "nanmedian", "corr", "describe"}


def reductions_called(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in REDUCTIONS:
            found.append(f"{path.name}:{node.lineno} .{node.func.attr}()")
    return found


def test_the_report_never_computes():
    bad = [hit for path in sorted((ROOT / "report").glob("*.py")) for hit in reductions_called(path)]
    assert not bad, "the report computes (move it to the experiment that builds the table):\n" + "\n".join(bad)


def test_the_reduction_check_sees_a_mean(tmp_path):
    fake = tmp_path / "section.py"
    fake.write_text("def f(t):\n    return t.groupby('layer')['l2'].mean()\n")
    assert reductions_called(fake) == ["section.py:2 .mean()"]
