"""Installing what the engine needs, inside Slicer, when the user first needs it, after asking.

* torch: only through the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch``),
  which picks the build for the computer's GPU driver;
* everything else (``Resources/requirements.txt``): ``slicer.packaging.pip_ensure``
  on Slicer 5.12+ (it asks, installs with progress, offers a restart), else
  ``slicer.util.pip_install`` after a confirmation dialog.

Nothing here runs at import time or when the module is created.
"""

import importlib
import logging

import slicer
from ContrastiveSegJob.requirements import (
    TORCH_REQUIREMENT,
    installed_version,
    missing_requirements,
    read_requirements,
    split_requirement,
    version_at_least,
)
from slicer.i18n import tr as _

REQUESTER = "ContrastiveSeg"


class DependencyError(RuntimeError):
    """A dependency is missing and was not installed (declined or failed); the message says what to do."""


def torch_available() -> bool:
    """Whether torch is installed (without importing it)."""
    return installed_version("torch") is not None


def ensure_torch(ask: bool = True, requirement: str = TORCH_REQUIREMENT) -> None:
    """Make sure torch (at least ``requirement``) is installed, via the PyTorch extension."""
    _, minimum = split_requirement("torch" + requirement)
    version = installed_version("torch")
    if version is not None and (minimum is None or version_at_least(version, minimum)):
        return
    try:
        import PyTorchUtils
    except ImportError as error:
        raise DependencyError(_("ContrastiveSeg needs the PyTorch extension. Open the Extensions Manager, "
                                "install 'PyTorch', restart Slicer and try again.")) from error
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if version is not None and ask and not slicer.util.confirmOkCancelDisplay(
            _("PyTorch {version} is installed but ContrastiveSeg needs torch{requirement}. "
              "Update PyTorch now (a large download)?").format(version=version, requirement=requirement)):
        raise DependencyError(_("PyTorch was not updated. Update it in the PyTorch Utils module."))
    torch = torch_logic.installTorch(askConfirmation=ask, torchVersionRequirement=requirement)
    if torch is None:
        raise DependencyError(_("PyTorch is required and was not installed. Install it from the "
                                "PyTorch Utils module, or accept the installation."))


def ensure_packages(requirements_path: str, ask: bool = True) -> None:
    """Make sure the packages of ``requirements_path`` are installed with their minimum versions."""
    requirements = read_requirements(requirements_path)
    missing = missing_requirements(requirements)
    if not missing:
        return
    if _has_pip_ensure():
        try:
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirements_path),
                                        prompt_install=ask, requester=REQUESTER)
        except RuntimeError as error:
            raise DependencyError(_("Python packages needed by ContrastiveSeg were not installed: {packages}. "
                                    "{reason}").format(packages=", ".join(missing), reason=error)) from error
        return
    if ask and not slicer.util.confirmOkCancelDisplay(
            _("ContrastiveSeg needs these Python packages, which will be downloaded and installed now:\n\n"
              "{packages}\n\nThis can take a few minutes.").format(packages="\n".join(missing)),
            windowTitle=_("ContrastiveSeg - install Python packages")):
        raise DependencyError(_("Python packages were not installed: {packages}.").format(
            packages=", ".join(missing)))
    logging.info("ContrastiveSeg: installing %s", " ".join(missing))
    slicer.util.pip_install(" ".join(missing))
    importlib.invalidate_caches()
    still_missing = missing_requirements(requirements)
    if still_missing:
        raise DependencyError(_("Installing {packages} failed; see the Python console for pip's messages.").format(
            packages=", ".join(still_missing)))


def ensure_all(requirements_path: str, ask: bool = True) -> None:
    """torch first (its installer is the larger download), then the other packages."""
    ensure_torch(ask)
    ensure_packages(requirements_path, ask)


def _has_pip_ensure() -> bool:
    """Whether ``slicer.packaging.pip_ensure`` exists (Slicer 5.12 and later)."""
    try:
        importlib.import_module("slicer.packaging")
    except ImportError:
        return False
    return hasattr(slicer.packaging, "pip_ensure") and hasattr(slicer.packaging, "load_requirements")
