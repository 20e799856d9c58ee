"""Which Python packages the engine needs, and which of them are missing or too old.

The list lives in ``Resources/requirements.txt`` (one ``name>=version`` per
line).  torch is not in it: inside Slicer it comes only through the PyTorch
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
    """``"monai>=1.3.0"`` -> ``("monai", "1.3.0")``; only ``>=`` minimums are understood."""
    match = re.match(r"^\s*([A-Za-z0-9_.\-\[\],]+)\s*(?:>=\s*([0-9][0-9A-Za-z.\-+]*))?\s*$", requirement)
    if not match:
        raise ValueError(f"requirement {requirement!r} is not of the form name>=version")
    name = re.sub(r"\[.*\]", "", match.group(1))
    return name, match.group(2)


def installed_version(name: str) -> Optional[str]:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_at_least(installed: str, minimum: str) -> bool:
    """Whether version ``installed`` >= ``minimum`` (numeric parts compared; "2.1.0+cpu" is 2.1.0)."""
    return _numeric(installed) >= _numeric(minimum)


def missing_requirements(requirements: List[str]) -> List[str]:
    """The requirements not satisfied by what is installed."""
    missing = []
    for requirement in requirements:
        name, minimum = split_requirement(requirement)
        version = installed_version(name)
        if version is None or (minimum is not None and not version_at_least(version, minimum)):
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
