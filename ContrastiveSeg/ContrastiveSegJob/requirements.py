"""Which Python packages the engine needs, and which of them are missing or too old.

The list lives in ``Resources/requirements.txt`` (one ``name>=version[,<version]``
per line).  torch is not in it: inside Slicer it comes only through the PyTorch
extension (``PyTorchUtils``), which picks the build that fits the GPU driver.
SimpleITK and numpy ship with Slicer and must not be replaced.
"""

import importlib.metadata
import re
from pathlib import Path
from typing import List, Optional, Tuple

TORCH_REQUIREMENT = ">=2.1"
# Never installed or upgraded by this module: Slicer ships them (or the PyTorch extension does).
NEVER_INSTALL = ("torch", "simpleitk", "numpy", "vtk")


def read_requirements(path) -> List[str]:
    """The requirement lines of a requirements.txt (comments, blank lines and options skipped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def split_requirement(requirement: str) -> Tuple[str, Optional[str]]:
    """``"monai>=1.3.0,<1.7"`` -> ``("monai", "1.3.0")``: the name and the minimum version.

    Only ``>=`` minimums and ``<`` upper bounds are understood (an upper bound is
    what keeps a future release of a package from being installed untested).
    """
    name, minimum, _ = parse_requirement(requirement)
    return name, minimum


def parse_requirement(requirement: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``"monai[x]>=1.3,<1.7"`` -> ``("monai", "1.3", "1.7")``: name, minimum (``>=``), upper bound (``<``)."""
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*?)\s*$", requirement)
    if not match:
        raise ValueError(f"requirement {requirement!r} is not of the form name>=version[,<version]")
    name, specifiers = match.group(1), match.group(2)
    minimum = upper = None
    for specifier in [part.strip() for part in specifiers.split(",") if part.strip()]:
        bound = re.match(r"^(>=|<)\s*([0-9][0-9A-Za-z.\-+]*)$", specifier)
        if not bound:
            raise ValueError(f"requirement {requirement!r}: only '>=' minimums and '<' upper bounds are understood")
        if bound.group(1) == ">=":
            minimum = bound.group(2)
        else:
            upper = bound.group(2)
    return name, minimum, upper


def installed_version(name: str) -> Optional[str]:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_at_least(installed: str, minimum: str) -> bool:
    """Whether version ``installed`` >= ``minimum`` (numeric parts compared; "2.1.0+cpu" is 2.1.0)."""
    return _numeric(installed) >= _numeric(minimum)


def version_satisfies(version: str, requirement: str) -> bool:
    """Whether ``version`` is inside the range of ``requirement`` (its minimum and upper bound)."""
    _, minimum, upper = parse_requirement(requirement)
    if minimum is not None and not version_at_least(version, minimum):
        return False
    return upper is None or not version_at_least(version, upper)


def missing_requirements(requirements: List[str]) -> List[str]:
    """The requirements not satisfied by what is installed (absent, too old or too new)."""
    missing = []
    for requirement in requirements:
        version = installed_version(split_requirement(requirement)[0])
        if version is None or not version_satisfies(version, requirement):
            missing.append(requirement)
    return missing


def _numeric(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in re.split(r"[.+\-]", version):
        match = re.match(r"^(\d+)", piece)
        if not match:
            break
        parts.append(int(match.group(1)))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)
