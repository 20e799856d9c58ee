"""The module's install plan never touches the user's torch, numpy or SimpleITK (issue 10, defect 1).

pip's own resolver (``pip install --dry-run --report``) runs offline on a fresh
virtual environment that holds an older PyTorch, as the PyTorch extension
installs it for an older driver (``torch 2.4.0+cu121``), with numpy and
SimpleITK as Slicer ships them.  The packages pip may choose from are small stub
wheels in a local folder (``--no-index --find-links``) whose metadata repeat
the real releases' dependency requirements (first level; their own
dependencies are stubs without requirements).  The monai ones:

* 1.6.1: ``torch>=2.8.0``, ``numpy<3.0,>=1.24``, Python >= 3.10 (the wheel's METADATA);
* 1.5.2: ``torch>=2.4.1``, ``numpy<3.0,>=1.24`` (the wheel's METADATA on PyPI);
* 1.4.0: ``torch>=1.9``, ``numpy<2.0,>=1.24`` (MONAI's setup.cfg at that tag).

The old plan (``pip install monai>=1.3 ...`` with its dependencies) upgrades
torch to the newest stub; the module's plan must leave torch, numpy and
SimpleITK as they are and pick a MONAI that works with them.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from ContrastiveSegJob.installplan import (  # noqa: E402
    InstallPlan,
    constraint_lines,
    make_install_plan,
    pip_install_arguments,
)
from ContrastiveSegJob.requirements import read_requirements  # noqa: E402

REQUIREMENTS = REPO / "ContrastiveSeg" / "Resources" / "requirements.txt"
INSTALLED = {"torch": "2.4.0+cu121", "numpy": "1.26.4", "SimpleITK": "2.4.0"}
# What the module installed before the fix: the requirement lines, with their dependencies, no constraints.
OLD_PLAN = ["monai>=1.3", "einops>=0.6", "nibabel>=4.0", "scipy>=1.9", "matplotlib>=3.5", "tqdm>=4.60"]

# name, version, Requires-Dist lines, Requires-Python (None: any)
STUBS = [
    ("torch", "2.13.0", ["filelock", "typing-extensions>=4.10.0", "setuptools>=77.0.3", "sympy>=1.13.3",
                         "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5"], None),
    ("numpy", "2.4.6", [], None),
    ("SimpleITK", "2.5.7", [], None),
    ("monai", "1.6.1", ["torch>=2.8.0", "numpy<3.0,>=1.24"], ">=3.10"),
    ("monai", "1.5.2", ["torch>=2.4.1", "numpy<3.0,>=1.24"], ">=3.9"),
    ("monai", "1.4.0", ["torch>=1.9", "numpy<2.0,>=1.24"], ">=3.9"),
    ("einops", "0.8.2", [], None),
    ("nibabel", "5.4.2", ["importlib-resources>=5.12; python_version < '3.12'", "numpy>=1.25", "packaging>=20",
                          "typing-extensions>=4.6; python_version < '3.13'"], None),
    ("scipy", "1.17.1", ["numpy<2.7,>=1.26.4"], None),
    ("matplotlib", "3.11.2", ["contourpy>=1.0.1", "cycler>=0.10", "fonttools>=4.28.2", "kiwisolver>=1.3.1",
                              "numpy>=1.25", "packaging>=20.0", "pillow>=9", "pyparsing>=3",
                              "python-dateutil>=2.7"], None),
    ("contourpy", "1.3.3", ["numpy>=1.25"], None),
    ("tqdm", "4.70.1", ['colorama; platform_system == "Windows"'], None),
] + [(name, version, [], None) for name, version in [
    ("cycler", "0.12.1"), ("fonttools", "4.68.0"), ("kiwisolver", "1.5.1"), ("pillow", "13.0.0"),
    ("pyparsing", "3.3.3"), ("python-dateutil", "4.0.0"), ("packaging", "26.4"), ("importlib-resources", "7.1.0"),
    ("typing-extensions", "4.16.0"), ("colorama", "0.4.6"), ("filelock", "3.20.0"), ("setuptools", "80.9.0"),
    ("sympy", "1.14.0"), ("networkx", "3.5"), ("jinja2", "3.1.6"), ("fsspec", "2025.9.0")]]


def _metadata(name: str, version: str, requires=(), python=None) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if python:
        lines.append(f"Requires-Python: {python}")
    lines += [f"Requires-Dist: {requirement}" for requirement in requires]
    return "\n".join(lines) + "\n"


def write_stub_wheel(folder: Path, name: str, version: str, requires, python) -> Path:
    """A valid, empty pure-Python wheel carrying only metadata."""
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    dist_info = f"{stem}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{dist_info}/METADATA", _metadata(name, version, requires, python))
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", f"{dist_info}/METADATA,,\n{dist_info}/WHEEL,,\n{dist_info}/RECORD,,\n")
    return path


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())


@pytest.fixture(scope="module")
def older_torch_environment(tmp_path_factory):
    """(python of a fresh venv holding torch 2.4.0+cu121, numpy 1.26.4, SimpleITK 2.4.0; stub wheel folder)."""
    root = tmp_path_factory.mktemp("installplan")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = venv_python(root / "venv")
    packages = site_packages(python)
    for name, version in INSTALLED.items():
        dist_info = packages / f"{name}-{version}.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text(_metadata(name, version), encoding="utf-8")
        (dist_info / "INSTALLER").write_text("pip\n", encoding="utf-8")
        (dist_info / "RECORD").write_text("", encoding="utf-8")
    wheels = root / "wheels"
    wheels.mkdir()
    for name, version, requires, python_requirement in STUBS:
        write_stub_wheel(wheels, name, version, requires, python_requirement)
    return python, wheels


def pip_dry_run(environment, arguments, tmp_path, tag):
    """pip's resolver on ``arguments`` (``install ...``) in the environment; returns ``{name: version}`` to install."""
    python, wheels = environment
    report = tmp_path / f"{tag}.json"
    # --isolated and no PIP_* variables: only the stub folder may be looked at, whatever the machine's pip setup
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "--python", str(python)] + list(arguments)
        + ["--dry-run", "--report", str(report), "--no-index", "--find-links", str(wheels), "--quiet"],
        capture_output=True, text=True, env=environment, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    content = json.loads(report.read_text(encoding="utf-8"))
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in content["install"]}


def test_the_old_plan_would_replace_an_older_torch(older_torch_environment, tmp_path):
    """The guard below can fail: without constraints pip's resolver upgrades torch for MONAI."""
    chosen = pip_dry_run(older_torch_environment, ["install"] + OLD_PLAN, tmp_path, "old")
    assert chosen.get("torch") == "2.13.0"
    assert chosen["monai"] == "1.6.1"


def test_the_module_plan_leaves_torch_numpy_and_simpleitk_untouched(older_torch_environment, tmp_path):
    plan = make_install_plan(read_requirements(REQUIREMENTS), INSTALLED)
    assert plan.torch_requirement is None, "torch 2.4 satisfies the engine: PyTorch must not be reinstalled"
    assert sorted(plan.package_names()) == ["einops", "matplotlib", "monai", "nibabel", "scipy", "tqdm"]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(constraint_lines(INSTALLED)) + "\n", encoding="utf-8")
    chosen = pip_dry_run(older_torch_environment, pip_install_arguments(plan, str(constraints)), tmp_path, "plan")
    assert not {"torch", "numpy", "simpleitk"} & set(chosen), chosen
    assert chosen["monai"] == "1.4.0"  # the newest MONAI whose torch and numpy requirements fit what is installed
    assert set(plan.package_names()) <= set(chosen)


def test_plan_contents():
    requirements = read_requirements(REQUIREMENTS)
    monai = [line for line in requirements if line.startswith("monai")]
    assert monai == ["monai>=1.3,<1.7"], "MONAI must be bounded above"
    nothing = make_install_plan(requirements, dict(INSTALLED, monai="1.4.0", einops="0.8.2", nibabel="5.4.2",
                                                   scipy="1.17.1", matplotlib="3.11.2", tqdm="4.70.1"))
    assert nothing.empty
    too_new = make_install_plan(requirements, dict(INSTALLED, monai="1.7.0"))
    assert "monai>=1.3,<1.7" in too_new.packages
    no_torch = make_install_plan(requirements, {"numpy": "1.26.4"})
    assert no_torch.torch_requirement == ">=2.1" and no_torch.torch_installed is None
    old_torch = make_install_plan(requirements, {"torch": "2.0.1"})
    assert old_torch.torch_requirement == ">=2.1"
    text = "\n".join(old_torch.consent_lines())
    assert "PyTorch extension" in text and "2.0.1" in text and "monai>=1.3,<1.7 (about 2.7 MB)" in text
    assert old_torch.download_mb() == pytest.approx(2.7 + 0.1 + 3.3 + 36.7 + 9.3 + 0.1)
    assert constraint_lines({"torch": "2.4.0+cu121", "numpy": None, "simpleitk": "2.4.0"}) == [
        "torch==2.4.0+cu121", "SimpleITK==2.4.0"]
    with pytest.raises(ValueError):
        make_install_plan(["torch>=2.1"], INSTALLED)
    assert InstallPlan().empty


def test_one_consent_dialog_and_pytorch_is_not_asked_twice(monkeypatch, tmp_path):
    """ContrastiveSegSlicer.dependencies with only the dialog and the PyTorch extension faked (defect 10)."""
    import types

    import slicer
    import slicer.util

    monkeypatch.setitem(sys.modules, "slicer.i18n", types.SimpleNamespace(tr=lambda text: text))
    dialogs, torch_installs = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **options: dialogs.append(text) or True,
                        raising=False)
    installed = {"torch": "2.0.1", "numpy": "1.26.4", "SimpleITK": "2.4.0"}

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            torch_installs.append((askConfirmation, torchVersionRequirement))
            installed["torch"] = "2.4.0+cu121"  # what the extension chose for the driver
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    sys.modules.pop("ContrastiveSegSlicer.dependencies", None)
    import ContrastiveSegSlicer.dependencies as dependencies

    monkeypatch.setattr(dependencies, "installed_versions", lambda path: dict(installed))
    installer = dependencies.SlicerInstaller(str(REQUIREMENTS), lambda: "/opt/Slicer/bin/PythonSlicer")
    run = installer.prepare(str(tmp_path), ask=True)
    assert len(dialogs) == 1
    assert "PyTorch torch>=2.1 (replaces the installed 2.0.1)" in dialogs[0] and "monai>=1.3,<1.7" in dialogs[0]
    assert torch_installs == [(False, ">=2.1")]  # the extension does not ask a second time
    assert run.phase == "install" and run.argv[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "pip", "install"]
    constraints = Path(run.argv[run.argv.index("--constraint") + 1]).read_text().splitlines()
    assert "torch==2.4.0+cu121" in constraints  # pinned after PyTorch was installed
    sys.modules.pop("ContrastiveSegSlicer.dependencies", None)
