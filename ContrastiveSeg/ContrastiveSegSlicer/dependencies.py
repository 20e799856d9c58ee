"""Installing what the engine needs, inside Slicer, when the user first needs it, after asking once.

The plan (``ContrastiveSegJob.installplan``) never changes the installed torch,
numpy or SimpleITK:

* torch, only when missing or too old, through the PyTorch extension
  (``PyTorchUtils.PyTorchUtilsLogic().installTorch``), which picks the build for
  the computer's GPU driver; it asks nothing more (the one dialog below did);
* everything else with ``PythonSlicer -m pip install --constraint <file>``, run
  as the first process of the job, so its output goes to the module's log and
  the GUI stays responsive (the same command ``slicer.util.pip_install`` runs, but
  without blocking and with the constraints file).

One dialog lists everything and its size; no wait cursor covers it.
Nothing here runs at import time or when the module is created.
"""

import importlib
from typing import Dict, Optional

import slicer
from ContrastiveSegJob.commands import EngineRun
from ContrastiveSegJob.installplan import PINNED_DISTRIBUTIONS, InstallPlan, make_install_plan, pip_install_run
from ContrastiveSegJob.requirements import installed_version, read_requirements, split_requirement
from slicer.i18n import tr as _


class DependencyError(RuntimeError):
    """A dependency is missing and was not installed (declined or failed); the message says what to do."""


def installed_versions(requirements_path: str) -> Dict[str, Optional[str]]:
    """Installed versions of the pinned distributions and of the required packages (None: absent)."""
    importlib.invalidate_caches()
    names = list(PINNED_DISTRIBUTIONS) + [split_requirement(line)[0] for line in read_requirements(requirements_path)]
    return {name: installed_version(name) for name in names}


def torch_available() -> bool:
    """Whether torch is installed (without importing it)."""
    return installed_version("torch") is not None


class SlicerInstaller:
    """``prepare(folder, ask)``: the one consent dialog, PyTorch through its extension, then the pip run."""

    def __init__(self, requirements_path: str, python_executable) -> None:
        self.requirements_path = requirements_path
        self.python_executable = python_executable

    def plan(self) -> InstallPlan:
        return make_install_plan(read_requirements(self.requirements_path), installed_versions(self.requirements_path))

    def prepare(self, folder: str, ask: bool) -> Optional[EngineRun]:
        plan = self.plan()
        if plan.empty:
            return None
        if ask and not slicer.util.confirmOkCancelDisplay(
                _("ContrastiveSeg needs these Python packages, which will be downloaded and installed now:\n\n"
                  "{items}\n\nAbout {size:.0f} MB for the packages above, plus their own dependencies{torch}. "
                  "Your PyTorch, numpy and SimpleITK are not changed by this installation.").format(
                      items="\n".join("- " + line for line in plan.consent_lines()), size=plan.download_mb(),
                      torch=_(" and PyTorch") if plan.torch_requirement else ""),
                windowTitle=_("ContrastiveSeg - install Python packages")):
            raise DependencyError(_("Nothing was installed. ContrastiveSeg cannot train or segment without these "
                                    "packages; press Start again to be asked again."))
        if plan.torch_requirement is not None:
            self._install_torch(plan.torch_requirement)
        return pip_install_run(plan, self.python_executable(), folder, installed_versions(self.requirements_path))

    @staticmethod
    def _install_torch(requirement: str) -> None:
        try:
            import PyTorchUtils
        except ImportError as error:
            raise DependencyError(_("ContrastiveSeg needs the PyTorch extension. Open the Extensions Manager, "
                                    "install 'PyTorch', restart Slicer and try again.")) from error
        # The user agreed in the dialog above: PyTorchUtils must not ask a second time.
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=requirement)
        if torch is None:
            raise DependencyError(_("PyTorch could not be installed. Install it from the PyTorch Utils module, "
                                    "then press Start again."))
