"""The engine ContrastiveSegLib must never import Slicer, Qt, CTK or VTK (it runs outside Slicer too)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "ContrastiveSegLib"
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt", "mrml", "MRMLCore"}


def forbidden_imports(path: Path):
    """``(line, module)`` of every import of a forbidden top-level module, at any depth in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        found += [(node.lineno, name) for name in names if name.split(".")[0] in FORBIDDEN]
    return found


def test_no_engine_file_imports_slicer_qt_ctk_or_vtk():
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) > 5
    offenders = {str(path.relative_to(REPO)): hits for path in files if (hits := forbidden_imports(path))}
    assert not offenders, f"the engine must stay independent of Slicer: {offenders}"


def test_the_scan_catches_nested_and_dynamic_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import vtk.util\n    from slicer import util\n"
                      "    importlib.import_module('qt')\n    import numpy\n")
    assert [name for _, name in forbidden_imports(sample)] == ["vtk.util", "slicer", "qt"]


def test_importing_the_engine_loads_no_slicer_module():
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import pkgutil, importlib\n"
        "import ContrastiveSegLib\n"
        "loaded = []\n"
        "for info in pkgutil.walk_packages(ContrastiveSegLib.__path__, 'ContrastiveSegLib.'):\n"
        "    if info.name.endswith('__main__'):\n"
        "        continue\n"
        "    importlib.import_module(info.name)\n"
        "    loaded.append(info.name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(json.dumps({'loaded': loaded, 'bad': bad}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(REPO),
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "ContrastiveSegLib.cli" in report["loaded"]
    assert report["bad"] == [], f"importing the engine pulled in: {report['bad']}"
