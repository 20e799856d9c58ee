"""What to install so the engine can run, without ever changing the user's PyTorch, numpy or SimpleITK.

A clinician's Slicer often holds a PyTorch chosen for their graphics driver by
the PyTorch extension (or by TotalSegmentator / nnU-Net).  Installing MONAI
with its dependencies from PyPI would replace it: MONAI 1.6 requires torch >= 2.8
and MONAI 1.5 torch >= 2.4.1.  So the plan has two separate parts:

* torch, only when it is missing or older than :data:`TORCH_REQUIREMENT`, and
  only through the PyTorch extension (``PyTorchUtils``), which picks the build
  for the driver;
* every other package with ``pip install --constraint <file>``, the file pinning
  the torch, numpy and SimpleITK that are installed at that moment
  (:func:`constraint_lines`).  pip then picks, within the bounds of
  ``Resources/requirements.txt``, versions that work with them (e.g. MONAI 1.4
  next to torch 2.4.0) or stops with an error; it cannot change them.

``Testing/Python/test_slicer_installplan.py`` runs pip's resolver on such a plan
in a fresh environment holding an older torch.  No Qt and no Slicer here.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from .commands import EngineRun
from .requirements import TORCH_REQUIREMENT, split_requirement, version_satisfies

# Distributions the module's pip run must leave exactly as they are.
PINNED_DISTRIBUTIONS = ("torch", "numpy", "SimpleITK")

# Size of each package's own wheel on PyPI (newest release at the time of writing, the Windows
# CPython 3.12 wheel where the package has compiled code), in MB; their dependencies come on top.
WHEEL_SIZE_MB: Dict[str, float] = {
    "monai": 2.7,       # monai-1.5.2-py3-none-any.whl: 2 674 844 bytes
    "einops": 0.1,      # einops-0.8.2-py3-none-any.whl: 65 638 bytes
    "nibabel": 3.3,     # nibabel-5.4.2-py3-none-any.whl: 3 300 985 bytes
    "scipy": 36.7,      # scipy-1.18.1-cp312-cp312-win_amd64.whl: 36 658 278 bytes
    "matplotlib": 9.3,  # matplotlib-3.11.2-cp312-cp312-win_amd64.whl: 9 349 409 bytes
    "tqdm": 0.1,        # tqdm-4.70.1-py3-none-any.whl: 80 199 bytes
}


@dataclass
class InstallPlan:
    """What must be installed before the engine can run.

    Attributes:
        torch_requirement: e.g. ``">=2.1"`` when PyTorch must be installed or
            updated through the PyTorch extension; None when the installed one will do.
        torch_installed: the installed torch version, or None.
        packages: requirement lines for pip (bounded, from ``requirements.txt``).
    """

    torch_requirement: Optional[str] = None
    torch_installed: Optional[str] = None
    packages: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing to install."""
        return self.torch_requirement is None and not self.packages

    def package_names(self) -> List[str]:
        return [split_requirement(line)[0] for line in self.packages]

    def download_mb(self) -> float:
        """The packages' own wheels in MB (PyTorch and the packages' dependencies not counted)."""
        return sum(WHEEL_SIZE_MB.get(name.lower(), 0.0) for name in self.package_names())

    def consent_lines(self) -> List[str]:
        """One line per item to install, for the single consent dialog."""
        lines = []
        if self.torch_requirement is not None:
            now = f" (replaces the installed {self.torch_installed})" if self.torch_installed else ""
            lines.append(f"PyTorch torch{self.torch_requirement}{now}, through the PyTorch extension, which chooses "
                         "the build for your graphics card: a large download")
        for line in self.packages:
            name = split_requirement(line)[0]
            size = WHEEL_SIZE_MB.get(name.lower())
            lines.append(f"{line}" + (f" (about {size:.1f} MB)" if size is not None else ""))
        return lines


def make_install_plan(requirements: Sequence[str], installed: Mapping[str, Optional[str]],
                      torch_requirement: str = TORCH_REQUIREMENT) -> InstallPlan:
    """The plan for ``requirements`` (lines of ``requirements.txt``) given the installed versions.

    Args:
        requirements: requirement lines, none of them for a pinned distribution.
        installed: ``{distribution name: installed version or None}``; names compared case-insensitively.
        torch_requirement: the torch range the engine needs (``">=2.1"``).
    """
    versions = {name.lower(): version for name, version in installed.items()}
    for line in requirements:
        if split_requirement(line)[0].lower() in {name.lower() for name in PINNED_DISTRIBUTIONS}:
            raise ValueError(f"{line}: {', '.join(PINNED_DISTRIBUTIONS)} are never installed with pip by the module")
    torch_version = versions.get("torch")
    torch_needed = None
    if torch_version is None or not version_satisfies(torch_version, "torch" + torch_requirement):
        torch_needed = torch_requirement
    packages = [line for line in requirements
                if versions.get(split_requirement(line)[0].lower()) is None
                or not version_satisfies(versions[split_requirement(line)[0].lower()], line)]
    return InstallPlan(torch_requirement=torch_needed, torch_installed=torch_version, packages=packages)


def constraint_lines(installed: Mapping[str, Optional[str]]) -> List[str]:
    """``["torch==2.4.0+cu121", "numpy==1.26.4", "SimpleITK==2.4.0"]``: the installed pinned distributions.

    Written to a constraints file just before pip runs (after PyTorch was installed,
    if it had to be), so pip can neither upgrade nor replace them.
    """
    versions = {name.lower(): version for name, version in installed.items()}
    return [f"{name}=={versions[name.lower()]}" for name in PINNED_DISTRIBUTIONS if versions.get(name.lower())]


def pip_install_arguments(plan: InstallPlan, constraints_path: str) -> List[str]:
    """pip's arguments (after ``python -m pip``) for the plan's packages, under the constraints file."""
    return ["install", "--constraint", str(constraints_path), "--disable-pip-version-check"] + list(plan.packages)


CONSTRAINTS_FILE = "install-constraints.txt"


def pip_install_run(plan: InstallPlan, python_executable: str, folder: str,
                    installed: Mapping[str, Optional[str]]) -> Optional[EngineRun]:
    """The pip run of the plan (None when no package is missing), run like an engine process so the GUI
    shows pip's output and stays responsive.  Writes ``<folder>/install-constraints.txt`` from
    ``installed``, read after PyTorch was installed if it had to be."""
    if not plan.packages:
        return None
    os.makedirs(folder, exist_ok=True)
    constraints = os.path.join(folder, CONSTRAINTS_FILE)
    with open(constraints, "w", encoding="utf-8") as file:
        file.write("# what the module's pip run may not change (ContrastiveSegJob/installplan.py)\n")
        file.write("".join(line + "\n" for line in constraint_lines(installed)))
    return EngineRun("install", [str(python_executable), "-m", "pip"] + pip_install_arguments(plan, constraints))
