"""How the code is laid out: checks a reviewer would otherwise do by hand, kept by CI."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

TRACKED = subprocess.run(
    ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
).stdout.split()
SOURCES = [ROOT / p for p in TRACKED if p.endswith((".py", ".ipynb", ".yaml", ".md", "Makefile"))]


def test_nothing_refers_to_files_outside_the_repo():
    pattern = re.compile(r"DESIGN §|DESIGN\.md|\.\./shared|STYLE\.md")
    this = Path(__file__).resolve()
    offenders = [
        str(p.relative_to(ROOT))
        for p in SOURCES
        if p.resolve() != this and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_the_loop_never_asks_which_estimator_it_runs():
    # Estimators are objects chosen once, by the config's _target_; no string switch.
    switch = re.compile(r"estimator\s*==|estimator\.name\s*==")
    allowed = {"fce/config.py", "fce/sweep_space.py"}  # validation of per-estimator settings
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "fce").rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if switch.search(line) and str(p.relative_to(ROOT)) not in allowed
    ]
    assert offenders == []


def test_the_import_contracts_hold():
    # pyproject.toml's [tool.importlinter]: the layers of docs/architecture.md, the science
    # free of config, command line, tracking and sweep, MLflow named in fce/tracking/ alone.
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " broken" in result.stdout and "0 broken" in result.stdout


def _imports(path: Path) -> set[str]:
    # Every import is an edge, those for type hints only (``if TYPE_CHECKING:``) too: a
    # module that names another's types depends on it.
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fce"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fce")}
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_package_has_no_import_cycles():
    graph = {_module(p): _imports(p) for p in (ROOT / "fce").rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in graph and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {m: {resolve(d) for d in deps} - {m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, path: list[str]) -> bool:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep.startswith(module + "."):
                continue  # a package importing its own modules
            if state.get(dep) == 1:
                cycle.extend([*path, module, dep])
                return True
            if state.get(dep) is None and visit(dep, [*path, module]):
                return True
        state[module] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, []):
            break
    assert cycle == []


def test_torch_free_modules_stay_torch_free():
    # Bad input is reported before torch loads: these modules must not import it.
    for name in (
        "fce/errors.py",
        "fce/names.py",
        "fce/schema.py",
        "fce/config.py",
        "fce/compose.py",
        "fce/preflight.py",
        "fce/cli.py",
        "fce/sweep_space.py",
        "fce/signals.py",
        "fce/tune.py",
    ):
        source = (ROOT / name).read_text()
        assert not re.search(r"^(import torch|from torch)", source, re.M), name
    # ... nor through what they import: the two entries load without torch.
    check = "import sys, fce.cli, fce.tune; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0


def test_no_test_waits_on_a_command_for_less_than_the_hang_guard():
    # A command's work is bounded by its steps and points; a loaded machine only slows it, so a
    # wall-clock limit below the hang guard would fail the suite on a busy machine.
    from tests.helpers import HANG_GUARD_S

    waits = {"run", "communicate", "wait", "run_cli", "ended", "finish", "script", "_wait_for"}
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            for keyword in node.keywords:
                if (
                    name in waits
                    and keyword.arg in ("timeout", "timeout_s")
                    and isinstance(keyword.value, ast.Constant)
                    and isinstance(keyword.value.value, (int, float))
                    and keyword.value.value < HANG_GUARD_S
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_no_module_outside_the_tracking_package_names_the_store_in_code():
    # Its classes, tags (mlflow.parentRunId) and run-id attributes are fce.tracking's; messages
    # to the user may say MLflow. Allowed: the spellings of old configs and checkpoints.
    allowed = {
        ("fce/config.py", "fce.tracking.MLflowTracker"),  # upgrade() of a config saved before
        ("fce/train.py", "mlflow_run_id"),  # the key old checkpoints hold their run under
        ("fce/schema.py", "MLflowTrackingConfig"),  # the tracking group's option's schema
    }
    key = re.compile(r"^mlflow[._]|MLflowTracker")
    offenders = []
    for path in sorted((ROOT / "fce").rglob("*.py")):
        where = str(path.relative_to(ROOT))
        if where.startswith("fce/tracking/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = (
                isinstance(node, ast.Name)
                and "MLflow" in node.id
                and (where, node.id) not in allowed
            ) or (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and key.search(node.value)
                and (where, node.value) not in allowed
            )
            if named:
                offenders.append(f"{where}:{node.lineno}")
    assert offenders == []
