"""``ContrastiveSegLogic``: the Qt-free logic wired to the running Slicer, with the module's parameter node."""

from ContrastiveSegLogic.logic import JobLogic
from ContrastiveSegSlicer.sampledata import load_sample_data
from ContrastiveSegSlicer.wiring import MODULE_DIR, slicer_services
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .parameters import ContrastiveSegParameterNode


class ContrastiveSegLogic(ScriptedLoadableModuleLogic, JobLogic):
    """Training, prediction and Dice, usable from the GUI and from the Python console.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("ContrastiveSeg")
        volume, segmentation = logic.loadSampleData()
        result = logic.train(scenePairs=[(volume, segmentation)], organs="liver, spleen", model="unet",
                             modelSize="small", patchSize="64,64,32", spacing=3.0, maxSteps=200, wait=True)
        prediction = logic.predict(volume, result.run_dir, wait=True)
        table = logic.computeDice(prediction, segmentation)

    Args:
        runnerFactory: makes process runners (default: ``launchConsoleProcess`` on 5.12+, ``QProcess`` before).
        scheduler: timers (default: ``QTimer``).
    """

    def __init__(self, runnerFactory=None, scheduler=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        JobLogic.__init__(self, slicer_services(runnerFactory, scheduler))

    def getParameterNode(self) -> ContrastiveSegParameterNode:
        return ContrastiveSegParameterNode(super().getParameterNode())

    def loadSampleData(self):
        """Load the sample CT and its organ segmentation into the scene; returns (volume, segmentation)."""
        return load_sample_data(MODULE_DIR, self.scene)
